-- now: milliseconds by the Redis server's clock, so hosts whose clocks differ agree on
-- who has been silent how long (as in payq.gate's scripts).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
