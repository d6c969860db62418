"""When to try a charge again: a few numbers, one function.

Exponential backoff with full jitter between ``RETRY_BACKOFF_MIN_S`` and a cap that
doubles with each attempt up to ``RETRY_BACKOFF_MAX_S``; a ``Retry-After`` from the
provider is a floor, never shortened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from payq.settings import Settings

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int
    backoff_min_s: float
    backoff_max_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.retry_max_attempts,
            backoff_min_s=settings.retry_backoff_min_s,
            backoff_max_s=settings.retry_backoff_max_s,
        )

    def exhausted(self, attempts_made: int) -> bool:
        return attempts_made >= self.max_attempts

    def delay_s(
        self,
        attempts_made: int,
        retry_after_s: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """The wait before attempt ``attempts_made + 1``."""
        exponent = min(max(attempts_made - 1, 0), 32)
        cap = min(self.backoff_max_s, self.backoff_min_s * 2**exponent)
        delay = (rng or random).uniform(self.backoff_min_s, cap)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay
