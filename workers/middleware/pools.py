"""The pool gauges, and an alert when a pool stays busier than ``HEALTH_POOL_UTILIZATION``
for a whole health interval."""

from __future__ import annotations

import logging
import time
from typing import Any

from payq import metrics
from payq.sentry import alert
from payq.settings import Settings

__all__ = ["PoolWatch"]

log = logging.getLogger("payq.worker")


class PoolWatch:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._hot_since: float | None = None

    def __call__(self, figures: dict[str, Any]) -> None:
        """Read a report's figures (``ProcessReport.figures``)."""
        for pool in ("http", "db"):
            metrics.POOL_IN_USE.labels(pool).set(figures[f"{pool}_in_use"])
            metrics.POOL_SIZE.labels(pool).set(figures[f"{pool}_size"])
        use = max(
            figures["http_in_use"] / max(1, figures["http_size"]),
            figures["db_in_use"] / max(1, figures["db_size"]),
        )
        if use <= self.settings.health_pool_utilization:
            self._hot_since = None
            return
        now = time.monotonic()
        interval = self.settings.health_check_interval_s
        if self._hot_since is None:
            self._hot_since = now
        elif now - self._hot_since >= interval:
            alert(
                log,
                f"pool utilization {use:.0%} for over {interval} s "
                f"(HTTP {figures['http_in_use']}/{figures['http_size']}, database "
                f"{figures['db_in_use']}/{figures['db_size']}): add workers or raise the pools",
                logging.WARNING,
                check="pools",
            )
            self._hot_since = now
