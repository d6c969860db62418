-- Is A.token's slot still held (ConfirmArgs)? Extends it if its lease has not run out
-- (1); else removes it (0): once expired, its room may be someone else's already.
local score = redis.call('ZSCORE', K.slots, A.token)
if score and tonumber(score) > now then
    redis.call('ZADD', K.slots, now + A.lease_ms, A.token)
    return 1
end
redis.call('ZREM', K.slots, A.token)
return 0
