"""The slots and counts one process keeps between calls, and how long it trusts the breaker.

While the breaker read closed within ``REUSE_FOR_S``, a call that did not fail leaves
its slot here for the process's next call and its count here for the gate thread to
send, so a busy process skips both round trips (``payq.gate.gate``). The slots stay
held and renewed in Redis: the fleet limit holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from payq.gate.breaker import BreakerState
from payq.gate.fleet import FleetLimit, reset_after_fork

__all__ = ["KEEP_EVERY_S", "REUSE_FOR_S", "KeptSlots"]

#: How long this process trusts a closed breaker it read from Redis, and keeps a slot no
#: call took, before asking Redis again or giving the slot back.
REUSE_FOR_S = 0.25
#: How often the process's gate thread sends what it counted and gives back idle slots.
KEEP_EVERY_S = 0.1


class KeptSlots:
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

    def start_keeping(self, target: Callable[[], None]) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        with self._lock:
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=target, name="payq-gate", daemon=True)
                self._keeper.start()
