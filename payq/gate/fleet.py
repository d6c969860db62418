"""The fleet-wide provider concurrency limit: ``PAYMENT_MAX_CONCURRENCY`` slots in Redis.

Every provider call holds a slot: a member of one sorted set scored by the moment its
lease runs out. Leases are short (``FLEET_SLOT_LEASE_S``) and one thread per process
renews its slots every third of a lease (at most every second), so a call of any length
keeps its slot and a SIGKILLed worker's slot comes back within one lease (Dramatiq's
``ConcurrentRateLimiter`` does not renew, so its ttl must outlast the longest call).
When the set's epoch marker is missing (a new or wiped Redis, maybe with calls in
flight), or was written by another Redis server process (a replica that a failover
promoted, or a restart from a dump: either may lack the last slots granted), no slot is
granted for one renewal interval and a 1 s margin (2 s with the defaults), while the
renewers put their slots back.
The scripts are ``lua/_fleet.lua`` (the grant, inside the gate's enter), ``_epoch.lua``
and ``lua/fleet_*.lua``, timed by the server's clock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import redis

from payq.constants import redis_key
from payq.gate.scripts import ConfirmArgs, InUseArgs, RenewArgs
from payq.redis_scripts import Scripts

__all__ = ["FleetLimit", "SlotRefused", "reset_after_fork"]

log = logging.getLogger("payq.fleet")


#: The longest wait between two renewals of a process's slots.
RENEW_EVERY_MAX_S = 1.0
#: ``confirm`` asks Redis to extend a slot unless its request has this long to leave.
MIN_SEND_S = 1.0


@dataclass(frozen=True, slots=True)
class SlotRefused:
    """No slot: all are taken (or Redis came back empty); try again in ``wait_ms``."""

    wait_ms: int
    in_use: int
    limit: int
    starting: bool  # refused because the set's epoch is fresh, not because it is full


class FleetLimit:
    """At most ``limit`` provider calls at once across every process that shares Redis."""

    def __init__(
        self,
        scripts: Scripts,
        client: redis.Redis,
        namespace: str,
        *,
        limit: int,
        lease_s: float,
        scope: tuple[str, ...] = (),
    ) -> None:
        self.scripts = scripts
        self.client = client
        self.limit = limit
        self.lease_ms = int(lease_s * 1000)
        # At most a second between renewals: the grace of a fresh epoch (a renewal and a
        # margin) is then 2 s with the default 5 s lease, not 2.7.
        self.renew_every_s = min(lease_s / 3, RENEW_EVERY_MAX_S)
        self.grace_ms = int(self.renew_every_s * 1000) + 1000
        self.slots_key = redis_key(namespace, *scope, "fleet", "slots")
        self.epoch_key = redis_key(namespace, *scope, "fleet", "epoch")
        self._held: set[str] = set()
        # token -> time.monotonic() before which its lease surely still runs: taken just
        # before the request that set the lease, so it errs on the early side.
        self._valid_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        reset_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: it holds none of its parent's slots, so renews none."""
        self._held = set()
        self._valid_until = {}
        self._lock = threading.Lock()
        self._renewer = None

    def register(self) -> str:
        """A new token, renewed from now on: registered before it is granted, so a renewal
        racing the grant cannot miss it."""
        token = uuid.uuid4().hex
        with self._lock:
            self._held.add(token)
        return token

    def granted(self, token: str, answer: list[Any], asked_at: float) -> str | SlotRefused:
        """The enter script's fleet answer, ``{granted, wait_ms, in_use}``: the token or
        why not. ``asked_at``: ``time.monotonic()`` just before the script was sent."""
        granted, wait_ms, in_use = (int(a) for a in answer[:3])
        if not granted:
            self.forget(token)
            return SlotRefused(wait_ms, in_use, self.limit, starting=in_use < self.limit)
        with self._lock:
            self._valid_until[token] = asked_at + self.lease_ms / 1000
        self.start_renewing()
        return token

    def confirm(self, token: str, call_s: float = 0.0) -> float | None:
        """By when (``time.monotonic()``) a request on this slot must leave so that the
        slot's lease still runs ``call_s`` after it; ``None`` if this process no longer
        holds the slot. Known locally while that leaves at least ``MIN_SEND_S``; else
        asked of Redis, which extends the lease, or drops the slot if it had expired (a
        process frozen past its lease: its room may be someone else's already). Raises
        ``redis.RedisError`` if Redis must be asked and does not answer."""
        with self._lock:
            if token not in self._held:
                return None
            send_by = self._valid_until.get(token, 0.0) - call_s
            if send_by > time.monotonic() + MIN_SEND_S:
                return send_by
        asked_at = time.monotonic()
        asked = ConfirmArgs(slots=self.slots_key, lease_ms=self.lease_ms, token=token)
        if int(self.scripts.run(asked)):
            with self._lock:
                if token in self._held:
                    self._valid_until[token] = asked_at + self.lease_ms / 1000
                    return self._valid_until[token] - call_s
            return None
        log.warning(
            "fleet slot expired while held: this process stalled longer than "
            "FLEET_SLOT_LEASE_S (%g s); the call waits for another slot",
            self.lease_ms / 1000,
        )
        self.forget(token)
        return None

    def in_use(self) -> int:
        """Slots held across the fleet right now."""
        return int(self.scripts.run(InUseArgs(slots=self.slots_key)))

    def mark_settled(self) -> None:
        """Declare that no call is in flight (a new namespace): no grace for the first slot.

        For a system started from nothing (tests, a fresh demo); never after Redis lost
        its data while workers were running.
        """
        run_id = self.client.info("server")["run_id"]
        self.client.set(self.epoch_key, f"0 {run_id}")

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def holds(self, token: str) -> bool:
        """Whether this process still holds the slot (not released, refused or lost)."""
        with self._lock:
            return token in self._held

    def renew(self) -> None:
        """Extend this process's slots (and put back any that Redis lost with its data)."""
        with self._lock:
            tokens = list(self._held)
        asked_at = time.monotonic()
        restored, lost_tokens = self.scripts.run(
            RenewArgs(
                slots=self.slots_key,
                epoch=self.epoch_key,
                lease_ms=self.lease_ms,
                grace_ms=self.grace_ms,
                tokens=tokens,
            )
        )
        if restored:
            log.warning(
                "fleet slots put back after Redis lost them (%d of %d held here)",
                restored,
                len(tokens),
                extra={"restored": int(restored), "held": len(tokens)},
            )
        with self._lock:  # a slot released while this ran is not lost
            lost = [t for t in map(_text, lost_tokens) if t in self._held]
            # Not ours any more: others may have the room. A call running under one ends
            # as it is; a slot kept for the next call is dropped (``holds``).
            self._held.difference_update(lost)
            for token in lost:
                self._valid_until.pop(token, None)
            until = asked_at + self.lease_ms / 1000
            for token in tokens:
                if token in self._held:
                    self._valid_until[token] = until
        if lost:
            log.warning(
                "fleet slots expired while held (%d): this process stalled longer than "
                "FLEET_SLOT_LEASE_S (%g s)",
                len(lost),
                self.lease_ms / 1000,
                extra={"lost": len(lost)},
            )

    def start_renewing(self) -> None:
        """Start this process's renewal thread (once; again after a fork)."""
        if self._renewer is not None and self._renewer.is_alive():
            return
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._stop.clear()
            self._renewer = threading.Thread(
                target=self._renew_forever, name="payq-fleet-renewer", daemon=True
            )
            self._renewer.start()

    def stop_renewing(self, wait_s: float = 0.0) -> None:
        """Stop the renewal thread; ``wait_s``: wait that long for a renewal under way."""
        self._stop.set()
        renewer = self._renewer
        if wait_s and renewer is not None and renewer.is_alive():
            renewer.join(wait_s)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except redis.RedisError:
                # A restarted Redis first fails the pooled connection that redis-py then
                # drops: a second try right away goes over a new one.
                try:
                    self.renew()
                except redis.RedisError as exc:
                    log.warning(
                        "fleet slots not renewed (%s); trying again in %.1f s",
                        type(exc).__name__,
                        self.renew_every_s,
                    )

    def forget(self, token: str) -> None:
        """Stop renewing a slot (released, refused, or given up)."""
        with self._lock:
            self._held.discard(token)
            self._valid_until.pop(token, None)


def reset_after_fork(obj: Any) -> None:
    """Call ``obj.after_fork()`` in every forked child, for as long as ``obj`` lives."""
    ref = weakref.ref(obj)

    def reset() -> None:
        live = ref()
        if live is not None:
            live.after_fork()

    os.register_at_fork(after_in_child=reset)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
