-- The fleet's epoch (K.epoch): "<ms> <run id>", when the slots' set began and the
-- Redis server process that began it. A marker that is missing, or that another server
-- wrote (a replica promoted by a failover, or a server restarted from its dump: either
-- may lack the last slots granted), begins a fresh epoch now: its grace lets the
-- renewers put their slots back before any slot is granted (fleet.py).
local function server_run_id()
    return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end

-- The epoch's start (ms), beginning a fresh one if need be.
local function fleet_epoch(now)
    local run_id = server_run_id()
    local marker = redis.call('GET', K.epoch)
    if marker then
        local began, by = string.match(marker, '^(%d+) (%x+)$')
        if by == run_id then return tonumber(began) end
    end
    redis.call('SET', K.epoch, now .. ' ' .. run_id)
    return now
end
