-- The breaker's rules (payq/gate/breaker.py tells them in prose).
-- K.breaker: the state hash. A.rules: BreakerRules. A.window: the prefix of the
-- window's per-second buckets (calls, failures, slow).

local function breaker_open(R, now, reason)
    redis.call('HSET', K.breaker, 'state', 'open', 'until', now + R.open_ms,
               'changed_at', now, 'reason', reason)
    redis.call('HINCRBY', K.breaker, 'opened', 1)
    return {'open', reason}
end

-- May a call go ahead? Returns {decision, state, wait_ms, changed_to}, decision one of
-- allow | probe | deny.
local function breaker_admit(R, now)
    local state = redis.call('HGET', K.breaker, 'state') or 'closed'
    local changed = ''
    if state == 'open' then
        local wait = tonumber(redis.call('HGET', K.breaker, 'until')) - now
        if wait > 0 then return {'deny', 'open', wait, ''} end
        redis.call('HSET', K.breaker, 'state', 'half_open', 'probes', 0, 'passed', 0,
                   'failed', 0, 'half_open_at', now, 'changed_at', now,
                   'reason', 'open time over: probing')
        state, changed = 'half_open', 'half_open'
    end
    if state == 'half_open' then
        local probes = tonumber(redis.call('HGET', K.breaker, 'probes'))
        local since = tonumber(redis.call('HGET', K.breaker, 'half_open_at'))
        if probes >= R.probes and now - since > R.probe_timeout_ms then
            -- Probes that never reported (their worker died): let new ones through.
            redis.call('HSET', K.breaker, 'probes', 0, 'passed', 0, 'failed', 0,
                       'half_open_at', now)
            probes = 0
        end
        if probes < R.probes then
            redis.call('HINCRBY', K.breaker, 'probes', 1)
            return {'probe', 'half_open', 0, changed}
        end
        return {'deny', 'half_open', math.max(0, since + R.probe_timeout_ms - now), changed}
    end
    return {'allow', 'closed', 0, ''}
end

-- Give back a probe that made no call (its charge needed none, or no slot was free).
local function breaker_return_probe()
    if redis.call('HGET', K.breaker, 'state') == 'half_open'
       and tonumber(redis.call('HGET', K.breaker, 'probes') or 0) > 0 then
        redis.call('HINCRBY', K.breaker, 'probes', -1)
    end
end

-- Count calls, of them failures and slow ones, in this second's bucket.
local function breaker_count(R, now, calls, failures, slow)
    local bucket = A.window .. math.floor(now / 1000)
    redis.call('HINCRBY', bucket, 'calls', calls)
    if failures > 0 then redis.call('HINCRBY', bucket, 'failures', failures) end
    if slow > 0 then redis.call('HINCRBY', bucket, 'slow', slow) end
    redis.call('EXPIRE', bucket, R.window_s + 2)
end

-- The window's sums: calls, failures, slow calls over the last R.window_s seconds.
local function breaker_window(R, now)
    local sec = math.floor(now / 1000)
    local calls, failures, slows = 0, 0, 0
    for s = sec - R.window_s + 1, sec do
        local v = redis.call('HMGET', A.window .. s, 'calls', 'failures', 'slow')
        calls = calls + (tonumber(v[1]) or 0)
        failures = failures + (tonumber(v[2]) or 0)
        slows = slows + (tonumber(v[3]) or 0)
    end
    return calls, failures, slows
end

-- Open a closed breaker whose window is over a rate. Returns {changed_to, reason}.
local function breaker_judge(R, now)
    if (redis.call('HGET', K.breaker, 'state') or 'closed') ~= 'closed' then return {'', ''} end
    local calls, failures, slows = breaker_window(R, now)
    if calls < R.min_calls then return {'', ''} end
    if failures / calls >= R.failure_rate then
        return breaker_open(R, now, string.format(
            '%d of %d calls failed in %d s', failures, calls, R.window_s))
    end
    if slows / calls >= R.slow_rate then
        return breaker_open(R, now, string.format(
            '%d of %d calls were slow in %d s', slows, calls, R.window_s))
    end
    return {'', ''}
end

-- One finished call: outcome success | failure | neutral; slow and probe booleans.
-- A probe is judged at once; any other call is only counted (the caller judges the
-- window once for everything it counted). Returns {changed_to, reason}.
local function breaker_record(R, now, outcome, slow, probe)
    local state = redis.call('HGET', K.breaker, 'state') or 'closed'
    if probe and state == 'half_open' then
        -- The probes are judged like the window: by the failure rate. One unlucky probe
        -- among healthy ones (a provider's everyday 5xx) must not hold the fleet off again.
        local n = R.probes
        if outcome == 'failure' then
            local failed = redis.call('HINCRBY', K.breaker, 'failed', 1)
            if failed / n >= R.failure_rate then
                return breaker_open(R, now, string.format(
                    '%d of %d half-open probes failed', failed, n))
            end
            return {'', ''}
        end
        local passed = redis.call('HINCRBY', K.breaker, 'passed', 1)
        if (n - passed) / n < R.failure_rate then
            local reason = string.format('%d of %d half-open probes succeeded', passed, n)
            redis.call('HSET', K.breaker, 'state', 'closed', 'changed_at', now, 'reason', reason)
            -- A fresh window: failures from before the outage must not reopen it.
            local sec = math.floor(now / 1000)
            for s = sec - R.window_s, sec do redis.call('DEL', A.window .. s) end
            return {'closed', reason}
        end
        return {'', ''}
    end
    breaker_count(R, now, 1, outcome == 'failure' and 1 or 0, slow and 1 or 0)
    return {'', ''}
end
