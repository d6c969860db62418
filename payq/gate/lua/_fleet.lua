-- The fleet's slots: one sorted set (K.slots), each member a token scored by the
-- moment its lease runs out, and an epoch marker (K.epoch, _epoch.lua).

-- A slot for A.token if fewer than A.limit leases run; none during the grace after a
-- fresh epoch (a new, wiped or promoted Redis: the renewers are still putting their
-- slots back). Returns {granted (0/1), wait_ms, in_use}.
local function fleet_acquire(now)
    local open_at = fleet_epoch(now) + A.grace_ms
    if now < open_at then
        return {0, open_at - now, redis.call('ZCARD', K.slots)}
    end
    redis.call('ZREMRANGEBYSCORE', K.slots, '-inf', now)
    local in_use = redis.call('ZCARD', K.slots)
    if in_use < A.limit then
        redis.call('ZADD', K.slots, now + A.lease_ms, A.token)
        return {1, 0, in_use + 1}
    end
    local first = redis.call('ZRANGE', K.slots, 0, 0, 'WITHSCORES')
    return {0, math.max(0, tonumber(first[2]) - now), in_use}
end
