"""The gate's Lua scripts (``lua/``) and, for each, its arguments by name.

``enter`` and ``settle`` are the gate's two round trips; both call the breaker's rules
(``_breaker.lua``), ``enter`` also the fleet's grant (``_fleet.lua``). Every script
starts from ``_now.lua``: the Redis server's clock, so hosts agree on time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import redis

from payq.redis_scripts import KEY, ScriptArgs, Scripts

__all__ = [
    "BreakerRules",
    "ConfirmArgs",
    "EnterArgs",
    "GateScript",
    "InUseArgs",
    "LookupEnterArgs",
    "Release",
    "RenewArgs",
    "SettleArgs",
    "SnapshotArgs",
    "gate_scripts",
]


class GateScript(ScriptArgs):
    package: ClassVar[str] = "payq.gate"
    uses: ClassVar[tuple[str, ...]] = ("_now",)


@dataclass(frozen=True, slots=True)
class BreakerRules:
    """The breaker's thresholds (from the settings), as the scripts read them."""

    window_s: int
    min_calls: int
    failure_rate: float
    slow_rate: float
    open_ms: int
    probes: int
    probe_timeout_ms: int


@dataclass(frozen=True, slots=True)
class Release:
    """One call's slot given back: ``outcome`` success | failure | neutral, or none (no
    call was made: a probe is given back)."""

    token: str
    outcome: str
    slow: bool
    probe: bool


@dataclass(frozen=True, slots=True)
class EnterArgs(GateScript):
    script: ClassVar[str] = "enter"
    uses: ClassVar[tuple[str, ...]] = ("_now", "_epoch", "_breaker", "_fleet")

    breaker: str = field(metadata=KEY)
    slots: str = field(metadata=KEY)
    epoch: str = field(metadata=KEY)
    window: str  # the prefix of the breaker window's per-second buckets
    rules: BreakerRules
    token: str  # the slot asked for
    limit: int
    lease_ms: int
    grace_ms: int


@dataclass(frozen=True, slots=True)
class LookupEnterArgs(GateScript):
    script: ClassVar[str] = "enter_lookup"
    uses: ClassVar[tuple[str, ...]] = ("_now", "_epoch", "_fleet")

    slots: str = field(metadata=KEY)
    epoch: str = field(metadata=KEY)
    token: str
    limit: int
    lease_ms: int
    grace_ms: int


@dataclass(frozen=True, slots=True)
class SettleArgs(GateScript):
    script: ClassVar[str] = "settle"
    uses: ClassVar[tuple[str, ...]] = ("_now", "_breaker")

    breaker: str = field(metadata=KEY)
    slots: str = field(metadata=KEY)
    window: str
    rules: BreakerRules
    calls: int  # calls counted in the process, not yet in the window
    slow: int  # of them slow
    release: Release | None
    idle: list[str]  # kept slots no call took: given back


@dataclass(frozen=True, slots=True)
class SnapshotArgs(GateScript):
    script: ClassVar[str] = "breaker_snapshot"
    uses: ClassVar[tuple[str, ...]] = ("_now", "_breaker")

    breaker: str = field(metadata=KEY)
    window: str
    rules: BreakerRules


@dataclass(frozen=True, slots=True)
class RenewArgs(GateScript):
    script: ClassVar[str] = "fleet_renew"
    uses: ClassVar[tuple[str, ...]] = ("_now", "_epoch")

    slots: str = field(metadata=KEY)
    epoch: str = field(metadata=KEY)
    lease_ms: int
    grace_ms: int
    tokens: list[str]


@dataclass(frozen=True, slots=True)
class ConfirmArgs(GateScript):
    script: ClassVar[str] = "fleet_confirm"

    slots: str = field(metadata=KEY)
    lease_ms: int
    token: str


@dataclass(frozen=True, slots=True)
class InUseArgs(GateScript):
    script: ClassVar[str] = "fleet_in_use"

    slots: str = field(metadata=KEY)


def gate_scripts(client: redis.Redis) -> Scripts:
    """The gate's scripts, registered on this client."""
    return Scripts(client, GATE_SCRIPTS)


GATE_SCRIPTS: tuple[type[GateScript], ...] = (
    EnterArgs,
    LookupEnterArgs,
    SettleArgs,
    SnapshotArgs,
    RenewArgs,
    ConfirmArgs,
    InUseArgs,
)
