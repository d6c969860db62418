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
from payq.constants import LUA_NOW
from payq.errors import IdempotencyKeyInUse, ProviderError, RetryableProviderError
from payq.fleet import ACQUIRE_LUA_FN, FleetLimit, SlotRefused
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
        self._enter = fleet.client.register_script(_ENTER)
        self._leave = fleet.client.register_script(_LEAVE)

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
        probe that finds the fleet full is given back there too).
        """
        breaker, fleet = self.breaker, self.fleet
        token = fleet.register()
        try:
            answer = self._enter(
                keys=[breaker.state_key, *fleet.acquire_keys()],
                args=[*breaker.admit_args(), *fleet.acquire_args(token)],
            )
        except redis.RedisError as exc:
            fleet.forget(token)
            detail = f"Redis did not answer ({type(exc).__name__})"
            return Wait("redis", jitter_ms(1000, 3000), detail)
        admission = breaker.admission(answer[:4])
        if not admission.allowed:
            fleet.forget(token)
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
        slot = fleet.settle(token, answer[4:])
        if isinstance(slot, SlotRefused):
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
        """Free the slot and tell the breaker how the call went (``None``: no call was made),
        in one round trip. If Redis does not answer, the slot's lease frees it instead."""
        self.fleet.forget(passed.token)
        record: list[Any]
        if outcome is None:
            record = ["none", 0, int(passed.probe)]
        else:
            args = self.breaker.record_args(call_outcome(outcome), latency_ms, probe=passed.probe)
            record = args[1:]
        try:
            answer = self._leave(
                keys=[self.breaker.state_key, self.fleet.slots_key],
                args=[passed.token, self.breaker.bucket_prefix, *record],
            )
        except redis.RedisError as exc:
            log.warning(
                "fleet slot not released nor the breaker told (%s); the slot frees itself "
                "within FLEET_SLOT_LEASE_S",
                type(exc).__name__,
            )
            return
        self.breaker.change(answer)


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

# KEYS: breaker state, fleet slots. ARGV: token, then the breaker's record arguments
# (outcome 'none' when no call was made: only a probe is given back).
_LEAVE = (
    LUA_NOW
    + RECORD_LUA_FN
    + RETURN_PROBE_LUA_FN
    + """
redis.call('ZREM', KEYS[2], ARGV[1])
local args = {}
for i = 2, #ARGV do args[i - 1] = ARGV[i] end
if args[2] == 'none' then
    if args[4] == '1' then breaker_return_probe({KEYS[1]}, {}, now) end
    return {'', ''}
end
return breaker_record({KEYS[1]}, args, now)
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
