-- Whether Redis has heard from the fleet without a gap: K.heard's 'last' is the last
-- time a process beat or the relay looked, 'since' the start of the run of beats and
-- looks no more than A.gap_ms apart. Silence from one process proves something only
-- within such a run: after Redis was down or cut off, nobody's silence counts.
local function heard(now)
    local last = tonumber(redis.call('HGET', K.heard, 'last'))
    if not last or now - last > A.gap_ms then
        redis.call('HSET', K.heard, 'since', now)
    end
    redis.call('HSET', K.heard, 'last', now)
    return tonumber(redis.call('HGET', K.heard, 'since'))
end
