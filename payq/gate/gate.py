"""The way to the provider: the fleet's circuit breaker, then a fleet concurrency slot.

A caller asks ``enter()`` before it claims a charge (or looks one up, or probes the
provider's health) and gets a ``Pass`` (a slot held, maybe as a half-open probe) or a
``Wait`` saying why not and for how long; a ``Wait`` becomes a delayed message and costs
the charge no attempt (DESIGN.md, invariant 4). After the call, ``leave()`` frees the
slot and tells the breaker how the call went. Each is one round trip (``lua/enter.lua``,
``lua/settle.lua``), or none: while the breaker is known closed, a call that did not
fail leaves its slot and count with the process (``payq.gate.kept``), and the gate
thread sends the counts and gives idle slots back every ``KEEP_EVERY_S``. A failure, a
probe, and any call while the breaker is not known closed are sent at once; a breaker
opened elsewhere stops this process's calls within ``REUSE_FOR_S``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import redis

from payq.constants import DeferralCause
from payq.errors import IdempotencyKeyInUse, ProviderError, RetryableProviderError
from payq.gate.breaker import BreakerState, CallOutcome, FleetBreaker
from payq.gate.fleet import FleetLimit, SlotRefused
from payq.gate.kept import KEEP_EVERY_S, REUSE_FOR_S, KeptSlots
from payq.gate.scripts import EnterArgs, LookupEnterArgs, Release, SettleArgs, gate_scripts
from payq.provider import HANG_UP_GRACE_S, ProviderCharge
from payq.settings import Settings

__all__ = ["Pass", "ProviderGate", "Wait", "call_outcome", "jitter_ms", "slot_lease_s"]

log = logging.getLogger("payq.gate")


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


#: A slot's lease is at least a call's whole length at the provider (timeout and hang-up
#: grace) plus this: one renewal interval, and 2 s for the request to connect and leave.
CALL_MARGIN_S = 3.0


def slot_lease_s(settings: Settings) -> float:
    """The fleet slots' lease: ``FLEET_SLOT_LEASE_S``, or longer where a call is longer.

    A frozen process cannot renew its slot, and its request, once out, counts at the
    provider until answered or timed out; so the lease must cover a call from the latest
    moment its request may leave (``confirm``). 8.2 s with the defaults."""
    call_s = settings.payment_timeout_s + HANG_UP_GRACE_S
    return max(settings.fleet_slot_lease_s, call_s + CALL_MARGIN_S)


def jitter_ms(low_ms: int, high_ms: int) -> int:
    """A random delay in the range: deferred messages spread out instead of arriving at once."""
    return random.randint(low_ms, max(low_ms, high_ms))


class ProviderGate:
    """The breaker and the fleet's slots for one process: ``enter``, ``confirm``, ``leave``."""

    def __init__(self, client: redis.Redis, settings: Settings, scope: str | None = None) -> None:
        """``settings``: the endpoint's (its limit and breaker); ``scope``: where its keys
        go under the namespace (``Endpoint.key_scope``; ``None``: one endpoint's place)."""
        parts = tuple(scope.split(":")) if scope else ()
        #: Whose breaker a wait names: the fleet's, or one endpoint's (``ep:<name>``).
        self.whose = f"endpoint {parts[-1]}'s" if parts else "the fleet's"
        self.settings = settings
        self.scripts = gate_scripts(client)
        self.breaker = FleetBreaker(self.scripts, settings.payq_namespace, settings, scope=parts)
        self.fleet = FleetLimit(
            self.scripts,
            client,
            settings.payq_namespace,
            scope=parts,
            limit=settings.payment_max_concurrency,
            lease_s=slot_lease_s(settings),
        )
        #: How long a call may count at the provider from the moment its request leaves:
        #: its timeout and the hang-up grace (``confirm``).
        self.call_s = settings.payment_timeout_s + HANG_UP_GRACE_S
        self._kept = KeptSlots(self.fleet)

    def enter(self) -> Pass | Wait:
        """A slot to call the provider now, or how long to wait. Never blocks.

        One round trip: the breaker's admission and the fleet's slot in one script (a
        probe that finds the fleet full is given back there too). None at all when this
        process keeps a free slot and knows the breaker closed (module docstring).
        """
        kept = self._kept.take()
        if kept is not None:
            return Pass(kept, probe=False)
        token = self.fleet.register()
        asked_at = time.monotonic()
        try:
            answer = self.scripts.run(self._enter_args(token))
        except redis.RedisError as exc:
            self.fleet.forget(token)
            detail = f"Redis did not answer ({type(exc).__name__})"
            return Wait(DeferralCause.REDIS, jitter_ms(1000, 3000), detail)
        admission = self.breaker.admission(answer[:4])
        self._kept.seen(admission.state, asked_at)
        if not admission.allowed:
            self.fleet.forget(token)
            return self._refused_by_breaker(admission.state, admission.wait_ms)
        slot = self.fleet.granted(token, answer[4:], asked_at)
        if isinstance(slot, SlotRefused):
            return self._refused_by_fleet(slot)
        return Pass(slot, admission.probe)

    def enter_lookup(self) -> Pass | Wait:
        """A fleet slot for a lookup by key, whatever the breaker says: a lookup charges
        nothing, and may prove that a charge pinned here can go elsewhere. Leave it with
        ``leave(passed, None, keep=False)``: the breaker is told nothing."""
        token = self.fleet.register()
        asked_at = time.monotonic()
        fleet = self.fleet
        try:
            answer = self.scripts.run(
                LookupEnterArgs(
                    slots=fleet.slots_key,
                    epoch=fleet.epoch_key,
                    token=token,
                    limit=fleet.limit,
                    lease_ms=fleet.lease_ms,
                    grace_ms=fleet.grace_ms,
                )
            )
        except redis.RedisError as exc:
            self.fleet.forget(token)
            detail = f"Redis did not answer ({type(exc).__name__})"
            return Wait(DeferralCause.REDIS, jitter_ms(1000, 3000), detail)
        slot = self.fleet.granted(token, answer, asked_at)
        if isinstance(slot, SlotRefused):
            return self._refused_by_fleet(slot)
        return Pass(slot, probe=False)

    def _enter_args(self, token: str) -> EnterArgs:
        fleet = self.fleet
        return EnterArgs(
            breaker=self.breaker.state_key,
            slots=fleet.slots_key,
            epoch=fleet.epoch_key,
            window=self.breaker.window_prefix,
            rules=self.breaker.rules,
            token=token,
            limit=fleet.limit,
            lease_ms=fleet.lease_ms,
            grace_ms=fleet.grace_ms,
        )

    def _refused_by_breaker(self, state: BreakerState, wait_ms: int) -> Wait:
        if wait_ms > 0 and state is BreakerState.OPEN:
            # Everyone deferred to the same moment would arrive at once: spread them
            # over a few seconds after it (only the probes go through).
            spread = min(3000, self.settings.breaker_open_s * 250)
            return Wait(
                DeferralCause.BREAKER_OPEN,
                wait_ms + jitter_ms(0, spread),
                f"{self.whose} circuit breaker is open",
            )
        return Wait(
            DeferralCause.BREAKER_HALF_OPEN,
            jitter_ms(500, 2000),
            "the circuit breaker is half-open and its probes are out",
        )

    def _refused_by_fleet(self, slot: SlotRefused) -> Pass | Wait:
        if slot.starting:
            return Wait(
                DeferralCause.FLEET_STARTING,
                slot.wait_ms + jitter_ms(0, 500),
                "fleet slots are being registered (a new, emptied or promoted Redis): "
                "a moment's grace",
            )
        kept = self._kept.take()  # one of this process's calls may just have ended
        if kept is not None:
            return Pass(kept, probe=False)
        return Wait(
            DeferralCause.FLEET_FULL,
            jitter_ms(200, 1000),
            f"all {slot.limit} fleet slots (PAYMENT_MAX_CONCURRENCY) are in use",
        )

    def confirm(self, passed: Pass) -> float | None:
        """The moment (``time.monotonic()``) by which the call's request must leave, right
        before the call, so that the slot's lease outlasts the call at the provider even if
        this process freezes with the request out; ``None`` if the slot is no longer this
        process's (after a freeze longer than its lease it may be someone else's:
        ``FleetLimit.confirm``), or Redis cannot tell."""
        try:
            return self.fleet.confirm(passed.token, self.call_s)
        except redis.RedisError:
            return None

    def leave(
        self,
        passed: Pass,
        outcome: ProviderCharge | ProviderError | None,
        latency_ms: int = 0,
        *,
        keep: bool = True,
    ) -> None:
        """Free the slot and tell the breaker how the call went (``None``: no call was made).

        A call that did not fail, while the breaker is known closed, leaves its slot and
        its count with this process (module docstring) unless ``keep`` is false (a process
        about to exit); anything else is sent at once, with the counts not yet sent. If
        Redis does not answer, the slot's lease frees it.
        """
        call = None if outcome is None else call_outcome(outcome)
        slow = call is not None and self.breaker.slow(latency_ms)
        keepable = keep and not passed.probe and call is not CallOutcome.FAILURE
        if keepable and self._kept.keep(passed.token, counted=call is not None, slow=slow):
            self._kept.start_keeping(self._keep_forever)
            return
        self.fleet.forget(passed.token)
        outcome_arg = "none" if call is None else call.value
        release = Release(passed.token, outcome_arg, slow, passed.probe)
        calls, slow_calls = self._kept.take_counts()
        try:
            self._send(release, [], calls, slow_calls)
        except redis.RedisError as exc:
            log.warning(
                "fleet slot not released nor the breaker told (%s); the slot frees itself "
                "within FLEET_SLOT_LEASE_S",
                type(exc).__name__,
            )

    def close(self) -> None:
        """Give back what this process keeps and stop its threads (shutdown; tests)."""
        self.flush()
        self.stop_keeping()
        self.fleet.stop_renewing()

    def stop_keeping(self) -> None:
        """Stop the gate thread (tests); ``flush()`` first to give the slots back."""
        self._kept.stopped.set()

    def flush(self) -> None:
        """Send what this process counted and give back every slot it keeps (a worker
        shutting down; tests). If Redis does not answer, the leases free the slots."""
        self._give_back(kept_since=time.monotonic())

    def _give_back(self, kept_since: float) -> None:
        """Send the counts, and give back the slots kept since before ``kept_since``."""
        idle, calls, slow = self._kept.due(kept_since)
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

    def _send(self, release: Release | None, idle: list[str], calls: int, slow: int) -> None:
        """One round trip: counts, a call's release and record, idle slots given back."""
        asked_at = time.monotonic()
        state, changed, reason = self.scripts.run(
            SettleArgs(
                breaker=self.breaker.state_key,
                slots=self.fleet.slots_key,
                window=self.breaker.window_prefix,
                rules=self.breaker.rules,
                calls=calls,
                slow=slow,
                release=release,
                idle=idle,
            )
        )
        self.breaker.change(changed, reason)
        state = state.decode() if isinstance(state, bytes) else state
        self._kept.seen(BreakerState(state), asked_at)

    def _keep_forever(self) -> None:
        """The gate thread: counts out and idle slots back, every ``KEEP_EVERY_S``.

        Each round trip also reads the breaker's state: while the process is busy, that is
        what keeps it trusting a closed breaker. Counts it could not send are dropped: the
        breaker then sees fewer successes, so it can only open sooner, never later.
        """
        while not self._kept.stopped.wait(KEEP_EVERY_S):
            try:
                now = time.monotonic()
                # Slots no call took for a while go back; all of them once the breaker is
                # not known closed (a call would ask Redis for a slot of its own).
                self._give_back(now - REUSE_FOR_S if self._kept.trusted(now) else now)
            except Exception:  # the thread must go on
                log.exception("the gate thread failed a round; it goes on")
