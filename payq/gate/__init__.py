"""The way to the provider: the fleet's circuit breaker and concurrency slots.

gate.py     ProviderGate: enter() → Pass | Wait, confirm(), leave() (one per endpoint:
            payq.routing)
breaker.py  the breaker's thresholds, its answers read, its changes logged; snapshot
fleet.py    the fleet's slots: tokens held, renewed by one thread, confirmed
kept.py     slots and counts a busy process keeps between calls
scripts.py  each Lua script's arguments by name, and the scripts registered
lua/        the scripts: enter, settle (the gate's two round trips), the breaker's
            snapshot, the fleet's renew, confirm and in-use; _breaker.lua and
            _fleet.lua hold the rules both of the gate's scripts call
"""

from payq.gate.breaker import BreakerSnapshot, BreakerState, CallOutcome, FleetBreaker
from payq.gate.fleet import FleetLimit, SlotRefused
from payq.gate.gate import Pass, ProviderGate, Wait, call_outcome, jitter_ms
from payq.gate.kept import KEEP_EVERY_S, REUSE_FOR_S

__all__ = [
    "KEEP_EVERY_S",
    "REUSE_FOR_S",
    "BreakerSnapshot",
    "BreakerState",
    "CallOutcome",
    "FleetBreaker",
    "FleetLimit",
    "Pass",
    "ProviderGate",
    "SlotRefused",
    "Wait",
    "call_outcome",
    "jitter_ms",
]
