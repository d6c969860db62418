-- Which of A.holders are known dead (DeadArgs): each registered (it beat once), silent
-- for over A.dead_after_ms, and its last beat inside the current run of beats (so Redis
-- was hearing the fleet all along; _heard.lua). A holder never heard of is not dead.
local since = heard(now)
local dead = {}
for _, holder in ipairs(A.holders) do
    local last = tonumber(redis.call('ZSCORE', K.beats, holder))
    if last and now - last > A.dead_after_ms and last >= since then
        table.insert(dead, holder)
    end
end
return dead
