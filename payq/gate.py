"""The way to the provider: the fleet's circuit breaker, then a fleet concurrency slot.

A worker asks ``enter()`` before it claims a charge. It gets either a ``Pass`` (a slot
held, maybe as a half-open probe) or a ``Wait`` saying why not and for how long; a
``Wait`` becomes a delayed message and costs the charge no attempt (DESIGN.md,
invariant 4). After the call, ``leave()`` frees the slot and tells the breaker how the
call went.

A busy process skips both round trips. While the breaker was closed when this process
last read it (within ``REUSE_FOR_S``), a call that did not fail leaves its slot here for
the process's next call, and is counted here; one thread per process sends the counts
and gives back the slots that no call took within ``REUSE_FOR_S``, one round trip every
``KEEP_EVERY_S`` while there is something to send. So:

* the fleet limit holds as before: a slot kept here is still held in Redis, renewed, and
  used by one call at a time;
* a failure, a probe, and any call while the breaker is not known to be closed go the
  way they always did: at once, in one round trip, with the counts not yet sent;
* a breaker opened elsewhere in the fleet stops this process's calls within
  ``REUSE_FOR_S``, and successes reach its window at most ``KEEP_EVERY_S`` late.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from payq.breaker import (
    ADMIT_LUA_FN,
    RECORD_LUA_FN,
    RETURN_PROBE_LUA_FN,
    BreakerState,
    CallOutcome,
    FleetBreaker,
)
from payq.constants import LUA_NOW, DeferralCause
from payq.errors import IdempotencyKeyInUse, ProviderError, RetryableProviderError
from payq.fleet import ACQUIRE_LUA_FN, FleetLimit, SlotRefused, reset_after_fork
from payq.provider import ProviderCharge
from payq.settings import Settings, get_settings

__all__ = [
    "KEEP_EVERY_S",
    "REUSE_FOR_S",
    "Pass",
    "ProviderGate",
    "Wait",
    "call_outcome",
    "get_gate",
    "jitter_ms",
]

log = logging.getLogger("payq.gate")

#: How long this process trusts a closed breaker it read from Redis, and keeps a slot no
#: call took, before asking Redis again or giving the slot back.
REUSE_FOR_S = 0.25
#: How often the process's gate thread sends what it counted and gives back idle slots.
KEEP_EVERY_S = 0.1


@dataclass(frozen=True, slots=True)
class Pass:
    token: str  # the fleet slot
    probe: bool  # a half-open breaker's probe


@dataclass(frozen=True, slots=True)
class Wait:
    cause: DeferralCause
    delay_ms: int
    detail: str


def call_outcome(outcome: ProviderCharge | ProviderError) -> CallOutcome:
    """What one call says about the provider's health (not about the charge)."""
    if isinstance(outcome, ProviderCharge):
        return CallOutcome.SUCCESS
    # 409 "key in use" means our own earlier call is still running there: not sick.
    if isinstance(outcome, RetryableProviderError) and not isinstance(outcome, IdempotencyKeyInUse):
        return CallOutcome.FAILURE
    return CallOutcome.NEUTRAL


def jitter_ms(low_ms: int, high_ms: int) -> int:
    """A random delay in the range: deferred messages spread out instead of arriving at once."""
    return random.randint(low_ms, max(low_ms, high_ms))


class ProviderGate:
    def __init__(self, breaker: FleetBreaker, fleet: FleetLimit, settings: Settings) -> None:
        self.breaker = breaker
        self.fleet = fleet
        self.settings = settings
        self._enter = fleet.client.register_script(_ENTER)
        self._settle = fleet.client.register_script(_SETTLE)
        # The breaker's record arguments; outcome, slow and probe are filled in per call.
        self._template = breaker.record_args(CallOutcome.NEUTRAL, 0, probe=False)
        self._reuse = _Reuse(fleet)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> ProviderGate:
        ns = settings.payq_namespace
        return cls(
            FleetBreaker(client, ns, settings),
            FleetLimit(
                client,
                ns,
                limit=settings.payment_max_concurrency,
                lease_s=settings.fleet_slot_lease_s,
            ),
            settings,
        )

    def enter(self) -> Pass | Wait:
        """A slot to call the provider now, or how long to wait. Never blocks.

        One round trip: the breaker's admission and the fleet's slot in one script (a
        probe that finds the fleet full is given back there too). None at all when this
        process keeps a free slot and knows the breaker closed (module docstring).
        """
        kept = self._reuse.take()
        if kept is not None:
            return Pass(kept, probe=False)
        breaker, fleet = self.breaker, self.fleet
        token = fleet.register()
        asked_at = time.monotonic()
        try:
            answer = self._enter(
                keys=[breaker.state_key, *fleet.acquire_keys()],
                args=[*breaker.admit_args(), *fleet.acquire_args(token)],
            )
        except redis.RedisError as exc:
            fleet.forget(token)
            detail = f"Redis did not answer ({type(exc).__name__})"
            return Wait(DeferralCause.REDIS, jitter_ms(1000, 3000), detail)
        admission = breaker.admission(answer[:4])
        self._reuse.seen(admission.state, asked_at)
        if not admission.allowed:
            fleet.forget(token)
            if admission.wait_ms > 0 and admission.state is BreakerState.OPEN:
                # Everyone deferred to the same moment would arrive at once: spread
                # them over a few seconds after it (only the probes go through).
                spread = min(3000, self.settings.breaker_open_s * 250)
                return Wait(
                    DeferralCause.BREAKER_OPEN,
                    admission.wait_ms + jitter_ms(0, spread),
                    "the fleet's circuit breaker is open",
                )
            return Wait(
                DeferralCause.BREAKER_HALF_OPEN,
                jitter_ms(500, 2000),
                "the circuit breaker is half-open and its probes are out",
            )
        slot = fleet.settle(token, answer[4:], asked_at)
        if isinstance(slot, SlotRefused):
            if slot.starting:
                return Wait(
                    DeferralCause.FLEET_STARTING,
                    slot.wait_ms + jitter_ms(0, 500),
                    "fleet slots are being registered (a new or emptied Redis): a moment's grace",
                )
            kept = self._reuse.take()  # one of this process's calls may just have ended
            if kept is not None:
                return Pass(kept, probe=False)
            return Wait(
                DeferralCause.FLEET_FULL,
                jitter_ms(200, 1000),
                f"all {slot.limit} fleet slots (PAYMENT_MAX_CONCURRENCY) are in use",
            )
        return Pass(slot, admission.probe)

    def confirm(self, passed: Pass) -> bool:
        """Whether the slot is still this process's, right before its call: after a freeze
        longer than its lease it may be someone else's (``FleetLimit.confirm``). Without
        Redis it cannot be told: no."""
        try:
            return self.fleet.confirm(passed.token)
        except redis.RedisError:
            return False

    def leave(
        self, passed: Pass, outcome: ProviderCharge | ProviderError | None, latency_ms: int = 0
    ) -> None:
        """Free the slot and tell the breaker how the call went (``None``: no call was made).

        A call that did not fail, while the breaker is known closed, leaves its slot and
        its count with this process (module docstring); anything else is sent at once,
        with the counts not yet sent. If Redis does not answer, the slot's lease frees it.
        """
        call = None if outcome is None else call_outcome(outcome)
        slow = call is not None and self.breaker.slow(latency_ms)
        keepable = not passed.probe and call is not CallOutcome.FAILURE
        if keepable and self._reuse.keep(passed.token, counted=call is not None, slow=slow):
            self._reuse.start_keeping(self._keep_forever)
            return
        self.fleet.forget(passed.token)
        outcome_arg = "none" if call is None else call.value
        release = (passed.token, outcome_arg, int(slow), int(passed.probe))
        calls, slow_calls = self._reuse.take_counts()
        try:
            self._send(release, [], calls, slow_calls)
        except redis.RedisError as exc:
            log.warning(
                "fleet slot not released nor the breaker told (%s); the slot frees itself "
                "within FLEET_SLOT_LEASE_S",
                type(exc).__name__,
            )

    def stop_keeping(self) -> None:
        """Stop the gate thread (tests); ``flush()`` first to give the slots back."""
        self._reuse.stopped.set()

    def flush(self) -> None:
        """Send what this process counted and give back every slot it keeps (a worker
        shutting down; tests). If Redis does not answer, the leases free the slots."""
        self._give_back(kept_since=time.monotonic())

    def _give_back(self, kept_since: float) -> None:
        """Send the counts, and give back the slots kept since before ``kept_since``."""
        idle, calls, slow = self._reuse.due(kept_since)
        if not idle and not calls:
            return
        for token in idle:
            self.fleet.forget(token)
        try:
            self._send(None, idle, calls, slow)
        except redis.RedisError as exc:
            log.warning(
                "counted calls not sent to the breaker nor kept fleet slots given back (%s); "
                "the slots free themselves within FLEET_SLOT_LEASE_S",
                type(exc).__name__,
            )

    def _send(
        self, release: tuple[Any, ...] | None, idle: list[str], calls: int, slow: int
    ) -> None:
        """One round trip: counts, a call's release and record, idle slots given back."""
        args = [*self._template, calls, slow, *(release or ("", "", 0, 0)), *idle]
        asked_at = time.monotonic()
        state, changed, reason = self._settle(
            keys=[self.breaker.state_key, self.fleet.slots_key], args=args
        )
        self.breaker.change([changed, reason])
        state = state.decode() if isinstance(state, bytes) else state
        self._reuse.seen(BreakerState(state), asked_at)

    def _keep_forever(self) -> None:
        """The gate thread: counts out and idle slots back, every ``KEEP_EVERY_S``.

        Each round trip also reads the breaker's state: while the process is busy, that is
        what keeps it trusting a closed breaker. Counts it could not send are dropped: the
        breaker then sees fewer successes, so it can only open sooner, never later.
        """
        while not self._reuse.stopped.wait(KEEP_EVERY_S):
            try:
                now = time.monotonic()
                # Slots no call took for a while go back; all of them once the breaker is
                # not known closed (a call would ask Redis for a slot of its own).
                self._give_back(now - REUSE_FOR_S if self._reuse.trusted(now) else now)
            except Exception:  # the thread must go on
                log.exception("the gate thread failed a round; it goes on")


class _Reuse:
    """This process's kept slots and uncounted calls, and how long it trusts the breaker."""

    def __init__(self, fleet: FleetLimit) -> None:
        self.fleet = fleet
        self.after_fork()
        reset_after_fork(self)

    def after_fork(self) -> None:
        """A fresh state (also in a forked child: it holds none of its parent's slots,
        and runs no thread yet)."""
        self._lock = threading.Lock()
        self._trusted_until = 0.0  # monotonic: the breaker was closed when last read
        self._distrusted_at = 0.0  # when a read last found it not closed
        self._free: list[tuple[str, float]] = []  # (token, monotonic time it was freed)
        self._calls = 0  # calls kept here, not yet counted in Redis
        self._slow = 0
        self._keeper: threading.Thread | None = None
        self.stopped = threading.Event()

    def seen(self, state: BreakerState, asked_at: float) -> None:
        """The breaker's state as read by a request sent at ``asked_at`` (monotonic).

        Answers can be handled out of order (threads): a closed read older than the
        last read that found the breaker open or half-open trusts nothing.
        """
        with self._lock:
            if state is not BreakerState.CLOSED:
                self._trusted_until = 0.0
                self._distrusted_at = max(self._distrusted_at, asked_at)
            elif asked_at > self._distrusted_at:
                self._trusted_until = max(self._trusted_until, asked_at + REUSE_FOR_S)

    def trusted(self, now: float) -> bool:
        return now < self._trusted_until

    def take(self) -> str | None:
        """A kept slot for a call, if the breaker is trusted closed."""
        with self._lock:
            if time.monotonic() >= self._trusted_until:
                return None
            while self._free:
                token = self._free.pop()[0]  # the last one freed: the others age out
                if self.fleet.holds(token):  # not lost (fleet.renew)
                    return token
            return None

    def keep(self, token: str, *, counted: bool, slow: bool) -> bool:
        """Keep a slot (and count its call) here, if the breaker is trusted closed."""
        with self._lock:
            now = time.monotonic()
            if now >= self._trusted_until or not self.fleet.holds(token):
                return False
            self._free.append((token, now))
            self._calls += counted
            self._slow += slow
            return True

    def take_counts(self) -> tuple[int, int]:
        with self._lock:
            counts = self._calls, self._slow
            self._calls = self._slow = 0
            return counts

    def due(self, freed_before: float) -> tuple[list[str], int, int]:
        """Slots freed before then (taken out), and the counts (reset)."""
        with self._lock:
            idle = [token for token, at in self._free if at < freed_before]
            self._free = [(token, at) for token, at in self._free if at >= freed_before]
            counts = self._calls, self._slow
            self._calls = self._slow = 0
            return idle, *counts

    def start_keeping(self, target: Any) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        with self._lock:
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=target, name="payq-gate", daemon=True)
                self._keeper.start()


# KEYS: breaker state, fleet slots, fleet epoch. ARGV: the breaker's admit arguments
# (2), then the fleet's acquire arguments (4). Returns the breaker's answer (4), then
# the fleet's (3; zeros when the breaker refused).
_ENTER = (
    LUA_NOW
    + ADMIT_LUA_FN
    + RETURN_PROBE_LUA_FN
    + ACQUIRE_LUA_FN
    + """
local a = breaker_admit({KEYS[1]}, {ARGV[1], ARGV[2]}, now)
if a[1] == 'deny' then return {a[1], a[2], a[3], a[4], 0, 0, 0} end
local s = fleet_acquire({KEYS[2], KEYS[3]}, {ARGV[3], ARGV[4], ARGV[5], ARGV[6]}, now)
if s[1] == 0 and a[1] == 'probe' then breaker_return_probe({KEYS[1]}, {}, now) end
return {a[1], a[2], a[3], a[4], s[1], s[2], s[3]}
"""
)

# KEYS: breaker state, fleet slots. ARGV: the breaker's record arguments (10; outcome,
# slow and probe among them are placeholders); calls counted in the process and of
# them slow; one call's release (token, outcome: 'none' when no call was made, slow,
# probe; an empty token when there is none); then idle slots to give back.
# Returns the breaker's state after, then its change {changed_to, reason}.
_SETTLE = (
    LUA_NOW
    + RECORD_LUA_FN
    + RETURN_PROBE_LUA_FN
    + """
local A = {}
for i = 1, 10 do A[i] = ARGV[i] end
local calls, slow = tonumber(ARGV[11]), tonumber(ARGV[12])
local token, outcome, call_slow, probe = ARGV[13], ARGV[14], ARGV[15], ARGV[16]
for i = 17, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
local judge = false
if calls > 0 then
    breaker_count({KEYS[1]}, A, now, calls, 0, slow)
    judge = true
end
local r = {'', ''}
if token ~= '' then
    redis.call('ZREM', KEYS[2], token)
    if outcome == 'none' then
        if probe == '1' then breaker_return_probe({KEYS[1]}, {}, now) end
    else
        A[2], A[3], A[4] = outcome, call_slow, probe
        r = breaker_record({KEYS[1]}, A, now, true)
        if r[3] then judge = true end
    end
end
if judge and r[1] == '' then r = breaker_judge({KEYS[1]}, A, now) end
return {redis.call('HGET', KEYS[1], 'state') or 'closed', r[1], r[2]}
"""
)


_lock = threading.Lock()
_gate: ProviderGate | None = None


def get_gate() -> ProviderGate:
    """This process's gate, over the broker's Redis connection pool."""
    global _gate
    if _gate is None:
        with _lock:
            if _gate is None:
                from payq.broker import get_broker

                _gate = ProviderGate.from_settings(get_broker().client, get_settings())
    return _gate
