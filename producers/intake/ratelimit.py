"""How many requests one token may make per second: ``SERVE_RATE_LIMIT_PER_S``.

A moving window from ``limits`` (a well-kept library), in this process's memory. Per
process, on purpose: the intake must go on taking charges while Redis is away (the
relay publishes them later), so its limiter cannot need Redis on every request. With
N ``payq serve`` processes behind a load balancer a token may make up to N times the
rate; size the setting (or the fleet) with that in mind.
"""

from __future__ import annotations

import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

__all__ = ["TokenRateLimit"]


class TokenRateLimit:
    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self._item = RateLimitItemPerSecond(per_s)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def check(self, key: str) -> float | None:
        """Count one request for ``key``: ``None`` if it may go on, else the seconds
        until it may try again."""
        if self._limiter.hit(self._item, key):
            return None
        stats = self._limiter.get_window_stats(self._item, key)
        return max(0.0, stats.reset_time - time.time())
