-- What status and health show (SnapshotArgs): the server's now, the state hash, and
-- the window's sums {now, hash, calls, failures, slow}.
local calls, failures, slows = breaker_window(A.rules, now)
return {now, redis.call('HGETALL', K.breaker), calls, failures, slows}
