"""Which worker processes are alive: a heartbeat in Redis, and positive proof of death.

Each worker process has an identity, its holder (host, pid and a random start nonce), and
beats every ``WORKER_HEARTBEAT_S``: one script that writes the Redis server's time of the
beat into one sorted set. A claim names its holder on the charge row while the process
beats, so the relay can end the lease of a dead process's charges at once
(``producers.takeover``) rather than after ``CHARGE_LEASE_S``; the same idempotency key
makes the second call safe, and the lease stays the bound for a live but stuck process.
The messages a dead process had fetched but not started (Dramatiq's ack sets, under its
worker id: the holder's alias) go back on the queue in the same pass.

Dead must be proven, never guessed: a holder is dead when it beat once, has been silent
for ``TAKEOVER_AFTER_S``, and Redis heard the fleet (other processes' beats, the relay's
looks) without a gap of two heartbeats since its last beat. A process that never beat,
a Redis that lost its data, was down or was cut off from everyone: nobody's silence
counts, and the lease decides as before. A process cut off from Redis alone, or frozen
(a VM pause, SIGSTOP), is taken for dead: its call is fenced like one past its lease,
and its answer still settles the charge (``payq.ledger``).

Own code: Dramatiq's worker heartbeat is written when a process fetches messages (a
busy one may go quiet for a while), stamped by each host's clock, and says nothing about
a gap in Redis itself.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar

import redis

from payq.constants import redis_key
from payq.redis_scripts import KEY, ScriptArgs, Scripts
from payq.settings import Settings

__all__ = ["Heartbeat", "dead_aliases", "holder", "known_dead"]

log = logging.getLogger("payq.liveness")


class _LivenessScript(ScriptArgs):
    package: ClassVar[str] = "payq.liveness"
    uses: ClassVar[tuple[str, ...]] = ("_now", "_heard")


@dataclass(frozen=True, slots=True)
class BeatArgs(_LivenessScript):
    script: ClassVar[str] = "beat"

    beats: str = field(metadata=KEY)
    heard: str = field(metadata=KEY)
    aliases: str = field(metadata=KEY)
    holder: str  # empty: a witness
    alias: str  # the process's Dramatiq worker id (empty: none)
    gap_ms: int
    keep_ms: int


@dataclass(frozen=True, slots=True)
class DeadArgs(_LivenessScript):
    script: ClassVar[str] = "known_dead"

    beats: str = field(metadata=KEY)
    heard: str = field(metadata=KEY)
    holders: list[str]
    gap_ms: int
    dead_after_ms: int


@dataclass(frozen=True, slots=True)
class DeadAliasesArgs(_LivenessScript):
    script: ClassVar[str] = "dead_aliases"

    beats: str = field(metadata=KEY)
    heard: str = field(metadata=KEY)
    aliases: str = field(metadata=KEY)
    gap_ms: int
    dead_after_ms: int


def _keys(namespace: str) -> dict[str, str]:
    return {
        "beats": redis_key(namespace, "liveness", "beats"),
        "heard": redis_key(namespace, "liveness", "heard"),
    }


def _aliases(namespace: str) -> str:
    """Each holder's Dramatiq worker id (its broker's ``broker_id``): whose ack sets
    hold the messages it had fetched."""
    return redis_key(namespace, "liveness", "aliases")


def _gap_ms(settings: Settings) -> int:
    """The longest silence of the whole fleet that is not yet a gap: two heartbeats."""
    return int(2 * settings.worker_heartbeat_s * 1000)


class Heartbeat:
    """This process's beat, from ``start`` to ``stop``; ``witness=True`` for a process
    that claims nothing (the relay) but keeps the run of beats going."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        settings: Settings,
        *,
        witness: bool = False,
        alias: str = "",
    ) -> None:
        self.client = client
        self.settings = settings
        self.holder = "" if witness else _new_holder(settings.host)
        self._scripts = Scripts(client, (BeatArgs,))
        self._args = BeatArgs(
            **_keys(namespace),
            aliases=_aliases(namespace),
            holder=self.holder,
            alias=alias,
            gap_ms=_gap_ms(settings),
            # A silent holder stays listed while its charges' leases may still run.
            keep_ms=int(2 * (settings.charge_lease_s + settings.takeover_after_s) * 1000),
        )
        self._pid = os.getpid()
        self._beat_at = float("-inf")  # time.monotonic() of the last beat Redis took
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """One beat; raises ``redis.RedisError`` if Redis does not answer."""
        self._scripts.run(self._args)
        self._beat_at = time.monotonic()

    def start(self) -> None:
        global _current
        self._thread = threading.Thread(target=self._run, name="payq-heartbeat", daemon=True)
        self._thread.start()
        if self.holder:
            _current = self

    def stop(self, wait_s: float = 0.0) -> None:
        """No more beats; ``wait_s``: wait that long for a beat under way."""
        global _current
        self._stop.set()
        if _current is self:
            _current = None
        if wait_s and self._thread is not None:
            self._thread.join(wait_s)

    def current_holder(self) -> str | None:
        """The holder, while its last beat is recent: a claim names it only then (a
        process whose beats fail is never taken for dead on them)."""
        recent = time.monotonic() - self._beat_at < self.settings.worker_heartbeat_s * 2
        alive = self._thread is not None and self._thread.is_alive()
        return self.holder or None if recent and alive and os.getpid() == self._pid else None

    def _run(self) -> None:
        every_s = self.settings.worker_heartbeat_s
        while True:
            try:
                self.beat()
            except Exception as exc:  # the beat must never stop: the next one may pass
                log.warning("heartbeat not written (%s); trying again", type(exc).__name__)
            if self._stop.wait(every_s):
                return


_current: Heartbeat | None = None


def holder() -> str | None:
    """This process's holder for a claim, or ``None`` (it does not beat, or not lately)."""
    beating = _current
    return beating.current_holder() if beating is not None else None


def known_dead(
    client: redis.Redis, namespace: str, holders: list[str], settings: Settings
) -> list[str]:
    """Those of ``holders`` proven dead (module docstring). Raises ``redis.RedisError``
    if Redis does not answer: then nobody is."""
    if not holders:
        return []
    args = DeadArgs(
        **_keys(namespace),
        holders=holders,
        gap_ms=_gap_ms(settings),
        dead_after_ms=int(settings.takeover_after_s * 1000),
    )
    return [
        h.decode() if isinstance(h, bytes) else str(h)
        for h in Scripts(client, (DeadArgs,)).run(args)
    ]


def dead_aliases(client: redis.Redis, namespace: str, settings: Settings) -> list[str]:
    """The Dramatiq worker ids of processes proven dead since last asked, each once.
    Raises ``redis.RedisError`` if Redis does not answer."""
    args = DeadAliasesArgs(
        **_keys(namespace),
        aliases=_aliases(namespace),
        gap_ms=_gap_ms(settings),
        dead_after_ms=int(settings.takeover_after_s * 1000),
    )
    found = Scripts(client, (DeadAliasesArgs,)).run(args)
    return [a.decode() if isinstance(a, bytes) else str(a) for a in found]


def _new_holder(host: str) -> str:
    """host:pid:nonce, at most 128 characters (the charge row's column)."""
    return f"{host[:100]}:{os.getpid()}:{secrets.token_hex(4)}"
