-- Move one dead letter back onto its queue (RequeueDead): its payload to the queue's
-- messages, its id to the queue's end. Returns 1, or 0 if it is not a dead letter.
local payload = redis.call('HGET', K.dead_messages, A.message_id)
if not payload then return 0 end
redis.call('HSET', K.messages, A.message_id, payload)
redis.call('RPUSH', K.queue, A.message_id)
redis.call('ZREM', K.dead, A.message_id)
redis.call('HDEL', K.dead_messages, A.message_id)
return 1
