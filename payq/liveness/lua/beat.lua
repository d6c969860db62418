-- One heartbeat (BeatArgs): the process's last beat in K.beats, by the server's clock
-- (A.holder empty: a witness, such as the relay, that only keeps the run of beats).
-- Beats older than A.keep_ms are dropped. Returns the server's time.
heard(now)
if A.holder ~= '' then
    redis.call('ZADD', K.beats, now, A.holder)
end
redis.call('ZREMRANGEBYSCORE', K.beats, '-inf', now - A.keep_ms)
return now
