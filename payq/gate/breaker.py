"""The provider's circuit breaker, one for every worker process on every host.

    closed ──(failure rate or slow-call rate over the window, min calls)──► open
    open ──(BREAKER_OPEN_S later, on the next call)──► half_open (probes)
    half_open ──(BREAKER_HALF_OPEN_PROBES probes, judged by the failure rate)──► closed | open

The state and a window of per-second counts live in Redis, and the rules run there
(``lua/_breaker.lua``, inside the gate's scripts), so the fleet opens and closes as
one. Timeouts, connection errors, 5xx and 429 are failures; a decline or another 4xx
is a call but not a failure; a call of ``BREAKER_SLOW_CALL_MS`` or more is slow. A
probe that never reports (its worker died) is replaced after ``probe_timeout_ms``.
This module holds the thresholds, reads the scripts' answers, logs and alerts on a
change, and takes the snapshot status shows. (pybreaker, purgatory and aiobreaker
count consecutive failures per process: no rate, no window, no fleet-wide probes.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from payq.constants import redis_key
from payq.gate.scripts import BreakerRules, SnapshotArgs
from payq.redis_scripts import Scripts
from payq.settings import Settings

__all__ = ["Admission", "BreakerSnapshot", "BreakerState", "CallOutcome", "FleetBreaker"]

log = logging.getLogger("payq.breaker")


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

    def __init__(
        self, scripts: Scripts, namespace: str, settings: Settings, scope: tuple[str, ...] = ()
    ) -> None:
        self.scripts = scripts
        self.state_key = redis_key(namespace, *scope, "breaker")
        self.window_prefix = redis_key(namespace, *scope, "breaker", "w") + ":"
        self.slow_call_ms = settings.breaker_slow_call_ms
        self.rules = BreakerRules(
            window_s=settings.breaker_window_s,
            min_calls=settings.breaker_min_calls,
            failure_rate=settings.breaker_failure_rate,
            slow_rate=settings.breaker_slow_call_rate,
            open_ms=settings.breaker_open_s * 1000,
            probes=settings.breaker_half_open_probes,
            # A probe reports within one call's deadline; give it that and a margin.
            probe_timeout_ms=settings.payment_timeout_ms + 2000,
        )

    def slow(self, latency_ms: int) -> bool:
        """Whether a call this long counts as slow (``BREAKER_SLOW_CALL_MS``)."""
        return latency_ms >= self.slow_call_ms

    def admission(self, answer: list[Any]) -> Admission:
        """The enter script's breaker answer, ``{decision, state, wait_ms, changed_to}``;
        logs a change."""
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

    def change(self, changed: Any, reason: Any) -> BreakerState | None:
        """The settle script's ``changed_to, reason``: the new state if any; logs it."""
        if not _text(changed):
            return None
        state = BreakerState(_text(changed))
        _log_change(state, _text(reason))
        return state

    def snapshot(self) -> BreakerSnapshot:
        """Raises ``redis.RedisError`` if Redis does not answer."""
        now, raw, calls, failures, slow = self.scripts.run(
            SnapshotArgs(breaker=self.state_key, window=self.window_prefix, rules=self.rules)
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
