-- Extend this process's slots (RenewArgs). Inside the grace after a fresh epoch, slots
-- Redis lost are put back; after it, a slot that is gone stays gone (released
-- meanwhile, or its lease ran out) and is reported lost. Returns {restored, lost}.
local restoring = now < fleet_epoch(now) + A.grace_ms
local restored, lost = 0, {}
for _, token in ipairs(A.tokens) do
    if restoring then
        restored = restored + redis.call('ZADD', K.slots, now + A.lease_ms, token)
    elseif redis.call('ZADD', K.slots, 'XX', 'CH', now + A.lease_ms, token) == 0 then
        table.insert(lost, token)
    end
end
return {restored, lost}
