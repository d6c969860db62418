"""The core's calls (SQLAlchemy, redis-py) are blocking: each runs in a worker thread,
and never more at once than the database pool holds.

The pool has ``DATABASE_POOL_MAX_CONNECTIONS`` connections and no overflow. Were every
request given a thread, a burst would park dozens of threads inside the pool's
checkout, each holding a thread for up to ``DB_TIMEOUT_MS``. Here a request first waits,
on the event loop and holding nothing, for one of as many slots as the pool has
connections; it waits at most ``DB_TIMEOUT_MS`` (the pool's own checkout timeout), and
then the answer is 503 with nothing written. A thread that has a slot always finds a
connection free. (Invariant 3: pools are never exceeded, by construction.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from payq.errors import ServiceUnavailable

__all__ = ["Blocking"]

T = TypeVar("T")


class Blocking:
    def __init__(self, slots: int, wait_s: float) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self._limiter = anyio.CapacityLimiter(slots)

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` in a worker thread once a slot is free; ``ServiceUnavailable`` if
        none frees up within ``wait_s``."""
        try:
            with anyio.fail_after(self.wait_s):
                await self._limiter.acquire()
        except TimeoutError:
            raise ServiceUnavailable(
                f"all {self.slots} database slots stayed busy for {self.wait_s:g} s"
            ) from None
        try:
            # Not cancellable: a client that hangs up does not free the slot while the
            # thread still holds its connection.
            return await anyio.to_thread.run_sync(call)
        finally:
            self._limiter.release()
