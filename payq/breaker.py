"""The provider's circuit breaker, shared by every worker process on every host.

    closed ──(failure rate or slow-call rate over the window, min calls)──► open
    open ──(BREAKER_OPEN_S later, on the next call)──► half_open
    half_open ──(BREAKER_HALF_OPEN_PROBES probe calls, judged by the failure rate)──►
                closed, or open again

Its state lives in Redis so the fleet opens and closes as one: a provider that is
down is cut off by every process at once, not by each after its own 20 failures.
The window is one Redis hash per second (calls, failures, slow calls) kept for
``BREAKER_WINDOW_S``. Timeouts, connection errors, 5xx and 429 are failures; a
decline or another 4xx is the provider working as it should, so it counts as a call
but not a failure. A call is slow when it took ``BREAKER_SLOW_CALL_MS`` or more.

Libraries considered: pybreaker keeps state in Redis but opens after N consecutive
failures in one process's counting (no rate, no window, no slow calls, no fleet-wide
probe count); purgatory and aiobreaker are asyncio and count-based too. So this is
ours: three Lua scripts, each atomic on the Redis server and timed by its clock
(``TIME``), so that hosts with different clocks agree on when the breaker may half-open.

A probe whose worker died never reports; after ``probe_timeout_ms`` without a verdict
the half-open state admits new probes, so the breaker cannot stick half-open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from payq.constants import LUA_NOW, redis_key
from payq.settings import Settings

__all__ = ["Admission", "BreakerSnapshot", "BreakerState", "CallOutcome", "FleetBreaker"]

log = logging.getLogger("payq.breaker")


# KEYS: state. ARGV: probes, probe_timeout_ms.
# Returns {decision, state, wait_ms, changed_to}; decision is allow | probe | deny.
ADMIT_LUA_FN = """
local function breaker_admit(K, A, now)
    local state = redis.call('HGET', K[1], 'state') or 'closed'
    local changed = ''
    if state == 'open' then
        local wait = tonumber(redis.call('HGET', K[1], 'until')) - now
        if wait > 0 then return {'deny', 'open', wait, ''} end
        redis.call('HSET', K[1], 'state', 'half_open', 'probes', 0, 'passed', 0, 'failed', 0,
                   'half_open_at', now, 'changed_at', now, 'reason', 'open time over: probing')
        state, changed = 'half_open', 'half_open'
    end
    if state == 'half_open' then
        local probes = tonumber(redis.call('HGET', K[1], 'probes'))
        local since = tonumber(redis.call('HGET', K[1], 'half_open_at'))
        if probes >= tonumber(A[1]) and now - since > tonumber(A[2]) then
            -- Probes that never reported (their worker died): let new ones through.
            redis.call('HSET', K[1], 'probes', 0, 'passed', 0, 'failed', 0, 'half_open_at', now)
            probes = 0
        end
        if probes < tonumber(A[1]) then
            redis.call('HINCRBY', K[1], 'probes', 1)
            return {'probe', 'half_open', 0, changed}
        end
        return {'deny', 'half_open', math.max(0, since + tonumber(A[2]) - now), changed}
    end
    return {'allow', 'closed', 0, ''}
end
"""
_ADMIT = LUA_NOW + ADMIT_LUA_FN + "return breaker_admit(KEYS, ARGV, now)"

# KEYS: state. ARGV: bucket prefix, outcome (success|failure|neutral), slow (0/1),
# probe (0/1), window_s, min_calls, failure_rate, slow_rate, open_ms, probes.
# Returns {changed_to, reason}. ``later`` (the gate's batches): a call counted while the
# breaker is closed returns {'', '', 1} instead of judging the window, and the caller
# judges it once for the batch (``breaker_judge``, same arguments).
RECORD_LUA_FN = """
local function breaker_open(K, A, now, reason)
    redis.call('HSET', K[1], 'state', 'open', 'until', now + tonumber(A[9]),
               'changed_at', now, 'reason', reason)
    redis.call('HINCRBY', K[1], 'opened', 1)
    return {'open', reason}
end

-- Count calls (of them failures and slow ones) in the window's bucket for this second.
local function breaker_count(K, A, now, calls, failures, slow)
    local bucket = A[1] .. math.floor(now / 1000)
    redis.call('HINCRBY', bucket, 'calls', calls)
    if failures > 0 then redis.call('HINCRBY', bucket, 'failures', failures) end
    if slow > 0 then redis.call('HINCRBY', bucket, 'slow', slow) end
    redis.call('EXPIRE', bucket, tonumber(A[5]) + 2)
end

local function breaker_judge(K, A, now)
    if (redis.call('HGET', K[1], 'state') or 'closed') ~= 'closed' then return {'', ''} end
    local window_s, sec = tonumber(A[5]), math.floor(now / 1000)
    local calls, failures, slows = 0, 0, 0
    for s = sec - window_s + 1, sec do
        local v = redis.call('HMGET', A[1] .. s, 'calls', 'failures', 'slow')
        calls = calls + (tonumber(v[1]) or 0)
        failures = failures + (tonumber(v[2]) or 0)
        slows = slows + (tonumber(v[3]) or 0)
    end
    if calls < tonumber(A[6]) then return {'', ''} end
    if failures / calls >= tonumber(A[7]) then
        local reason = string.format('%d of %d calls failed in %d s', failures, calls, window_s)
        return breaker_open(K, A, now, reason)
    end
    if slows / calls >= tonumber(A[8]) then
        local reason = string.format('%d of %d calls were slow in %d s', slows, calls, window_s)
        return breaker_open(K, A, now, reason)
    end
    return {'', ''}
end

local function breaker_record(K, A, now, later)
    local state = redis.call('HGET', K[1], 'state') or 'closed'
    local outcome, slow, probe = A[2], A[3] == '1', A[4] == '1'
    local window_s = tonumber(A[5])
    local sec = math.floor(now / 1000)


    if probe and state == 'half_open' then
        -- The probes are judged like the window: by the failure rate. One unlucky probe
        -- among healthy ones (a provider's everyday 5xx) must not hold the fleet off again.
        local n, rate = tonumber(A[10]), tonumber(A[7])
        if outcome == 'failure' then
            local failed = redis.call('HINCRBY', K[1], 'failed', 1)
            if failed / n >= rate then
                local reason = string.format('%d of %d half-open probes failed', failed, n)
                return breaker_open(K, A, now, reason)
            end
            return {'', ''}
        end
        local passed = redis.call('HINCRBY', K[1], 'passed', 1)
        if (n - passed) / n < rate then
            local reason = string.format('%d of %d half-open probes succeeded', passed, n)
            redis.call('HSET', K[1], 'state', 'closed', 'changed_at', now, 'reason', reason)
            -- A fresh window: failures from before the outage must not reopen it.
            for s = sec - window_s, sec do redis.call('DEL', A[1] .. s) end
            return {'closed', reason}
        end
        return {'', ''}
    end

    breaker_count(K, A, now, 1, outcome == 'failure' and 1 or 0, slow and 1 or 0)
    if state ~= 'closed' then return {'', ''} end
    if later then return {'', '', 1} end
    return breaker_judge(K, A, now)
end
"""
_RECORD = LUA_NOW + RECORD_LUA_FN + "return breaker_record(KEYS, ARGV, now)"

# KEYS: state. Give back a probe that made no call (its charge was not claimable).
RETURN_PROBE_LUA_FN = """
local function breaker_return_probe(K, A, now)
    if redis.call('HGET', K[1], 'state') == 'half_open'
       and tonumber(redis.call('HGET', K[1], 'probes') or 0) > 0 then
        redis.call('HINCRBY', K[1], 'probes', -1)
    end
    return 0
end
"""
_RETURN_PROBE = LUA_NOW + RETURN_PROBE_LUA_FN + "return breaker_return_probe(KEYS, ARGV, now)"

# KEYS: state. ARGV: bucket prefix, window_s. Returns the state and the window's sums.
_SNAPSHOT = (
    LUA_NOW
    + """
local h = redis.call('HGETALL', KEYS[1])
local sec = math.floor(now / 1000)
local calls, failures, slows = 0, 0, 0
for s = sec - tonumber(ARGV[2]) + 1, sec do
    local v = redis.call('HMGET', ARGV[1] .. s, 'calls', 'failures', 'slow')
    calls = calls + (tonumber(v[1]) or 0)
    failures = failures + (tonumber(v[2]) or 0)
    slows = slows + (tonumber(v[3]) or 0)
end
return {now, h, calls, failures, slows}
"""
)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CallOutcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # timeouts, connection errors, 5xx, 429
    NEUTRAL = "neutral"  # the provider answered as it should: a decline, another 4xx


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether one call may go ahead, and as what."""

    allowed: bool
    probe: bool
    state: BreakerState
    wait_ms: int  # when refused: how long until it is worth asking again
    changed_to: BreakerState | None  # this admission moved the breaker (open → half_open)


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What ``payq status`` and ``payq health`` show."""

    state: BreakerState
    reason: str
    open_for_ms: int  # while open: until it may half-open
    changed_ago_s: float | None
    opened: int  # times opened since Redis last lost its data
    window_calls: int
    window_failures: int
    window_slow: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "open_for_s": round(self.open_for_ms / 1000, 1),
            "changed_ago_s": self.changed_ago_s,
            "opened": self.opened,
            "window": {
                "calls": self.window_calls,
                "failures": self.window_failures,
                "slow": self.window_slow,
            },
        }


class FleetBreaker:
    """One breaker for the provider, its state in Redis under the payq namespace."""

    def __init__(self, client: redis.Redis, namespace: str, settings: Settings) -> None:
        self.settings = settings
        self.state_key = redis_key(namespace, "breaker")
        self.bucket_prefix = redis_key(namespace, "breaker", "w") + ":"
        # A probe reports within one call's deadline; give it that and a margin.
        self.probe_timeout_ms = settings.payment_timeout_ms + 2000
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)
        self._return_probe = client.register_script(_RETURN_PROBE)
        self._snapshot = client.register_script(_SNAPSHOT)

    def admit(self) -> Admission:
        """May a call go ahead? Raises ``redis.RedisError`` if Redis does not answer."""
        return self.admission(self._admit(keys=[self.state_key], args=self.admit_args()))

    def admit_args(self) -> list[Any]:
        return [self.settings.breaker_half_open_probes, self.probe_timeout_ms]

    def admission(self, answer: list[Any]) -> Admission:
        """The admit script's answer, ``{decision, state, wait_ms, changed_to}``; logs a change."""
        decision, state, wait_ms, changed = (_text(a) for a in answer[:4])
        admission = Admission(
            allowed=decision != "deny",
            probe=decision == "probe",
            state=BreakerState(state),
            wait_ms=int(wait_ms),
            changed_to=BreakerState(changed) if changed else None,
        )
        if admission.changed_to is not None:
            _log_change(admission.changed_to, "open time over: probing")
        return admission

    def record(self, outcome: CallOutcome, latency_ms: int, *, probe: bool) -> BreakerState | None:
        """Count one finished call; return the new state if it moved the breaker."""
        answer = self._record(
            keys=[self.state_key], args=self.record_args(outcome, latency_ms, probe=probe)
        )
        return self.change(answer)

    def slow(self, latency_ms: int) -> bool:
        """Whether a call this long counts as slow (``BREAKER_SLOW_CALL_MS``)."""
        return latency_ms >= self.settings.breaker_slow_call_ms

    def record_args(self, outcome: CallOutcome, latency_ms: int, *, probe: bool) -> list[Any]:
        s = self.settings
        return [
            self.bucket_prefix,
            outcome.value,
            int(self.slow(latency_ms)),
            int(probe),
            s.breaker_window_s,
            s.breaker_min_calls,
            s.breaker_failure_rate,
            s.breaker_slow_call_rate,
            s.breaker_open_s * 1000,
            s.breaker_half_open_probes,
        ]

    def change(self, answer: list[Any]) -> BreakerState | None:
        """The record script's answer, ``{changed_to, reason}``; logs a change."""
        changed, reason = _text(answer[0]), _text(answer[1])
        if not changed:
            return None
        state = BreakerState(changed)
        _log_change(state, reason)
        return state

    def return_probe(self) -> None:
        """A probe admitted but not used (its charge needed no call): let another through."""
        self._return_probe(keys=[self.state_key])

    def snapshot(self) -> BreakerSnapshot:
        now, raw, calls, failures, slow = self._snapshot(
            keys=[self.state_key], args=[self.bucket_prefix, self.settings.breaker_window_s]
        )
        h = {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}
        state = BreakerState(h.get("state", "closed"))
        changed_at = int(h["changed_at"]) if "changed_at" in h else None
        return BreakerSnapshot(
            state=state,
            reason=h.get("reason", ""),
            open_for_ms=(
                max(0, int(h.get("until", 0)) - int(now)) if state is BreakerState.OPEN else 0
            ),
            changed_ago_s=None if changed_at is None else round((int(now) - changed_at) / 1000, 1),
            opened=int(h.get("opened", 0)),
            window_calls=int(calls),
            window_failures=int(failures),
            window_slow=int(slow),
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _log_change(state: BreakerState, reason: str) -> None:
    # Imported here: metrics and alerts are the worker's concern, and the breaker is
    # also read by `payq status`, which should not load Sentry.
    from payq import metrics

    metrics.BREAKER_TRANSITIONS.labels(state.value).inc()
    extra = {"breaker_state": state.value, "reason": reason}
    if state is BreakerState.OPEN:
        from payq.sentry import alert

        message = f"circuit breaker opened: {reason}; provider calls deferred"
        alert(log, message, logging.ERROR, breaker_state=state.value)
    else:
        log.warning("circuit breaker %s: %s", state.value.replace("_", "-"), reason, extra=extra)
