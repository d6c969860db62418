"""The way to the provider: the fleet's circuit breaker, then a fleet concurrency slot.

A worker asks ``enter()`` before it claims a charge. It gets either a ``Pass`` (a slot
held, maybe as a half-open probe) or a ``Wait`` saying why not and for how long; a
``Wait`` becomes a delayed message and costs the charge no attempt (DESIGN.md,
invariant 4). After the call, ``leave()`` frees the slot at once and tells the breaker
how the call went.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass

import redis

from payq.breaker import BreakerState, CallOutcome, FleetBreaker
from payq.errors import IdempotencyKeyInUse, ProviderError, RetryableProviderError
from payq.fleet import FleetLimit, SlotRefused
from payq.provider import ProviderCharge
from payq.settings import Settings, get_settings

__all__ = ["Pass", "ProviderGate", "Wait", "call_outcome", "get_gate", "jitter_ms"]

log = logging.getLogger("payq.gate")


@dataclass(frozen=True, slots=True)
class Pass:
    token: str  # the fleet slot
    probe: bool  # a half-open breaker's probe


@dataclass(frozen=True, slots=True)
class Wait:
    cause: str  # breaker_open | breaker_half_open | fleet_full | fleet_starting | redis
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
        """A slot to call the provider now, or how long to wait. Never blocks."""
        try:
            admission = self.breaker.admit()
            if not admission.allowed:
                if admission.wait_ms > 0 and admission.state is BreakerState.OPEN:
                    # Everyone deferred to the same moment would arrive at once: spread
                    # them over a few seconds after it (only the probes go through).
                    spread = min(3000, self.settings.breaker_open_s * 250)
                    return Wait(
                        "breaker_open",
                        admission.wait_ms + jitter_ms(0, spread),
                        "the fleet's circuit breaker is open",
                    )
                return Wait(
                    "breaker_half_open",
                    jitter_ms(500, 2000),
                    "the circuit breaker is half-open and its probes are out",
                )
            slot = self.fleet.try_acquire()
        except redis.RedisError as exc:
            detail = f"Redis did not answer ({type(exc).__name__})"
            return Wait("redis", jitter_ms(1000, 3000), detail)
        if isinstance(slot, SlotRefused):
            if admission.probe:
                self._return_probe()
            if slot.starting:
                return Wait(
                    "fleet_starting",
                    slot.wait_ms + jitter_ms(0, 500),
                    "fleet slots are being registered (a new or emptied Redis): a moment's grace",
                )
            return Wait(
                "fleet_full",
                jitter_ms(200, 1000),
                f"all {slot.limit} fleet slots (PAYMENT_MAX_CONCURRENCY) are in use",
            )
        return Pass(slot, admission.probe)

    def leave(
        self, passed: Pass, outcome: ProviderCharge | ProviderError | None, latency_ms: int = 0
    ) -> None:
        """Free the slot; tell the breaker how the call went (``None``: no call was made)."""
        self.fleet.release(passed.token)
        try:
            if outcome is None:
                if passed.probe:
                    self.breaker.return_probe()
            else:
                self.breaker.record(call_outcome(outcome), latency_ms, probe=passed.probe)
        except redis.RedisError as exc:
            log.warning("circuit breaker not told of a call (%s)", type(exc).__name__)

    def _return_probe(self) -> None:
        try:
            self.breaker.return_probe()
        except redis.RedisError as exc:
            log.warning("half-open probe not given back (%s)", type(exc).__name__)


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
