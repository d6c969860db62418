-- One heartbeat (BeatArgs): the process's last beat in K.beats, by the server's clock
-- (A.holder empty: a witness, such as the relay, that only keeps the run of beats), and
-- its Dramatiq worker id in K.aliases.
-- Beats older than A.keep_ms are dropped. Returns the server's time.
heard(now)
if A.holder ~= '' then
    redis.call('ZADD', K.beats, now, A.holder)
    if A.alias ~= '' then
        redis.call('HSET', K.aliases, A.holder, A.alias)
    end
end
redis.call('ZREMRANGEBYSCORE', K.beats, '-inf', now - A.keep_ms)
return now
