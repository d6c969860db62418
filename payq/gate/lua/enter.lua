-- The way in (EnterArgs): the breaker's admission, then a fleet slot; a probe that
-- finds the fleet full is given back. Returns the breaker's answer (4 values), then
-- the fleet's (3; zeros when the breaker refused).
local a = breaker_admit(A.rules, now)
if a[1] == 'deny' then return {a[1], a[2], a[3], a[4], 0, 0, 0} end
local s = fleet_acquire(now)
if s[1] == 0 and a[1] == 'probe' then breaker_return_probe() end
return {a[1], a[2], a[3], a[4], s[1], s[2], s[3]}
