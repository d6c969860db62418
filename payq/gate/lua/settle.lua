-- The way out (SettleArgs): calls counted in the process (A.calls, of them A.slow),
-- one call's release (A.release: token, outcome, slow, probe; outcome 'none' when no
-- call was made) and idle slots given back (A.idle), in one round trip; then the
-- window judged once. Returns the breaker's state after, and {changed_to, reason}.
for _, token in ipairs(A.idle) do redis.call('ZREM', K.slots, token) end
local judge = false
if A.calls > 0 then
    breaker_count(A.rules, now, A.calls, 0, A.slow)
    judge = true
end
local r = {'', ''}
local release = A.release
if release ~= cjson.null then
    redis.call('ZREM', K.slots, release.token)
    if release.outcome == 'none' then
        if release.probe then breaker_return_probe() end
    else
        r = breaker_record(A.rules, now, release.outcome, release.slow, release.probe)
        judge = true
    end
end
if judge and r[1] == '' then r = breaker_judge(A.rules, now) end
return {redis.call('HGET', K.breaker, 'state') or 'closed', r[1], r[2]}
