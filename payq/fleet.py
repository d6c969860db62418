"""The fleet-wide provider concurrency limit: ``PAYMENT_MAX_CONCURRENCY`` slots in Redis.

Every provider call holds a slot: a member of one sorted set whose score is the
moment its lease runs out. A slot's lease is short (``FLEET_SLOT_LEASE_S``) and one
thread per process renews the slots its process holds every third of a lease, so a
call of any length keeps its slot while a SIGKILLed worker's slot comes back within
one lease: seconds, not the minutes Dramatiq's ``ConcurrentRateLimiter`` keeps it
(its ``ttl`` is not renewed, so it must outlast the longest call), and a refusal here
costs no attempt: the caller defers the message instead of raising.

No library does "a counting semaphore over Redis with renewed leases" (redis-py's
``Lock`` is a mutex; ``ConcurrentRateLimiter`` is the one described above), so this
is ours: two short Lua scripts, atomic on the server, timed by the server's clock
(``TIME``) so hosts whose clocks differ still agree on what has expired.

Redis losing its data also loses the set while calls are in flight. The renewers
put their slots back within a third of a lease; until then the set under-counts. So
when the set's epoch marker is missing (a new or wiped Redis) no slot is granted for
a grace of one renewal interval plus a margin, while the renewers re-register.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from payq.constants import LUA_NOW, redis_key

__all__ = ["FleetLimit", "SlotRefused", "reset_after_fork"]

log = logging.getLogger("payq.fleet")

# KEYS: slots, epoch. ARGV: token, limit, lease_ms, grace_ms.
# Returns {granted (0/1), wait_ms, in_use}.
ACQUIRE_LUA_FN = """
local function fleet_acquire(K, A, now)
    local epoch = redis.call('GET', K[2])
    if not epoch then
        redis.call('SET', K[2], now)
        epoch = now
    end
    local open_at = tonumber(epoch) + tonumber(A[4])
    if now < open_at then
        return {0, open_at - now, redis.call('ZCARD', K[1])}
    end
    redis.call('ZREMRANGEBYSCORE', K[1], '-inf', now)
    local in_use = redis.call('ZCARD', K[1])
    if in_use < tonumber(A[2]) then
        redis.call('ZADD', K[1], now + tonumber(A[3]), A[1])
        return {1, 0, in_use + 1}
    end
    local first = redis.call('ZRANGE', K[1], 0, 0, 'WITHSCORES')
    return {0, math.max(0, tonumber(first[2]) - now), in_use}
end
"""
_ACQUIRE = LUA_NOW + ACQUIRE_LUA_FN + "return fleet_acquire(KEYS, ARGV, now)"

# KEYS: slots, epoch. ARGV: lease_ms, grace_ms, tokens... Returns {restored, lost}.
# Inside the grace after a fresh epoch, slots Redis lost are put back; after it, a slot
# that is gone stays gone (it was released meanwhile, or its lease ran out) and is
# reported as lost.
_RENEW = (
    LUA_NOW
    + """
redis.call('SET', KEYS[2], now, 'NX')
local restoring = now < tonumber(redis.call('GET', KEYS[2])) + tonumber(ARGV[2])
local restored, lost = 0, {}
for i = 3, #ARGV do
    if restoring then
        restored = restored + redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
    elseif redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i]) == 0 then
        table.insert(lost, ARGV[i])
    end
end
return {restored, lost}
"""
)

# KEYS: slots. ARGV: lease_ms, token. Extends the slot if its lease has not run out
# (1); else removes it (0): once expired, its room may be someone else's already.
_CONFIRM = (
    LUA_NOW
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
    return 1
end
redis.call('ZREM', KEYS[1], ARGV[2])
return 0
"""
)

# KEYS: slots. Returns the slots whose lease has not run out.
_IN_USE = (
    LUA_NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)


@dataclass(frozen=True, slots=True)
class SlotRefused:
    """No slot: all are taken (or Redis came back empty); try again in ``wait_ms``."""

    wait_ms: int
    in_use: int
    limit: int
    starting: bool  # refused because the set's epoch is fresh, not because it is full


class FleetLimit:
    """At most ``limit`` provider calls at once across every process that shares Redis."""

    def __init__(self, client: redis.Redis, namespace: str, *, limit: int, lease_s: float) -> None:
        self.client = client
        self.limit = limit
        self.lease_ms = int(lease_s * 1000)
        self.renew_every_s = lease_s / 3
        self.grace_ms = int(self.renew_every_s * 1000) + 1000
        self.slots_key = redis_key(namespace, "fleet", "slots")
        self.epoch_key = redis_key(namespace, "fleet", "epoch")
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._in_use = client.register_script(_IN_USE)
        self._confirm = client.register_script(_CONFIRM)
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

    def try_acquire(self) -> str | SlotRefused:
        """A slot's token, or why not. Raises ``redis.RedisError`` if Redis does not answer."""
        token = self.register()
        asked_at = time.monotonic()
        try:
            answer = self._acquire(keys=self.acquire_keys(), args=self.acquire_args(token))
        except BaseException:
            self.forget(token)
            raise
        return self.settle(token, answer, asked_at)

    def register(self) -> str:
        """A new token, renewed from now on: registered before it is granted, so a renewal
        racing the grant cannot miss it."""
        token = uuid.uuid4().hex
        with self._lock:
            self._held.add(token)
        return token

    def acquire_keys(self) -> list[str]:
        return [self.slots_key, self.epoch_key]

    def acquire_args(self, token: str) -> list[Any]:
        return [token, self.limit, self.lease_ms, self.grace_ms]

    def settle(self, token: str, answer: list[Any], asked_at: float) -> str | SlotRefused:
        """The acquire script's answer, ``{granted, wait_ms, in_use}``: the token or why not.
        ``asked_at``: ``time.monotonic()`` just before the script was sent."""
        granted, wait_ms, in_use = (int(a) for a in answer[:3])
        if not granted:
            self.forget(token)
            return SlotRefused(wait_ms, in_use, self.limit, starting=in_use < self.limit)
        with self._lock:
            self._valid_until[token] = asked_at + self.lease_ms / 1000
        self.start_renewing()
        return token

    def confirm(self, token: str) -> bool:
        """Whether this process still holds the slot now, and will while its renewer
        renews it: known locally while its lease surely runs for a renewal interval more;
        else asked of Redis, which extends it, or drops it if it had expired (a process
        frozen past its lease: its room may be someone else's already). Raises
        ``redis.RedisError`` if Redis must be asked and does not answer."""
        with self._lock:
            if token not in self._held:
                return False
            if self._valid_until.get(token, 0.0) > time.monotonic() + self.renew_every_s:
                return True
        asked_at = time.monotonic()
        if int(self._confirm(keys=[self.slots_key], args=[self.lease_ms, token])):
            with self._lock:
                if token in self._held:
                    self._valid_until[token] = asked_at + self.lease_ms / 1000
                    return True
            return False
        log.warning(
            "fleet slot expired while held: this process stalled longer than "
            "FLEET_SLOT_LEASE_S (%g s); the call waits for another slot",
            self.lease_ms / 1000,
        )
        self.forget(token)
        return False

    def release(self, token: str) -> None:
        """Give the slot back. If Redis does not answer, its lease runs out instead."""
        self.forget(token)
        try:
            self.client.zrem(self.slots_key, token)
        except redis.RedisError as exc:
            log.warning(
                "fleet slot not released (%s); it frees itself within %g s",
                type(exc).__name__,
                self.lease_ms / 1000,
            )

    @contextmanager
    def slot(self) -> Iterator[str | SlotRefused]:
        """``with limit.slot() as got:`` holds a slot for the block when ``got`` is a str."""
        got = self.try_acquire()
        try:
            yield got
        finally:
            if isinstance(got, str):
                self.release(got)

    def in_use(self) -> int:
        """Slots held across the fleet right now."""
        return int(self._in_use(keys=[self.slots_key]))

    def mark_settled(self) -> None:
        """Declare that no call is in flight (a new namespace): no grace for the first slot.

        For a system started from nothing (tests, a fresh demo); never after Redis lost
        its data while workers were running.
        """
        self.client.set(self.epoch_key, 0)

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
        restored, lost_tokens = self._renew(
            keys=[self.slots_key, self.epoch_key], args=[self.lease_ms, self.grace_ms, *tokens]
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
