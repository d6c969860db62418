-- Put one dead worker's fetched messages back on their queue (RequeueAcks), as
-- Dramatiq's own maintenance does: only those whose payload still exists. Returns how
-- many were put back.
local moved = 0
for _, id in ipairs(redis.call('SMEMBERS', K.acks)) do
    if redis.call('HEXISTS', K.messages, id) == 1 then
        redis.call('RPUSH', K.queue, id)
        moved = moved + 1
    end
end
redis.call('DEL', K.acks)
return moved
