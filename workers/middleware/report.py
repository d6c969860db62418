"""The process's report in Redis: what ``payq status`` shows and ``payq health`` judges
pools by, kept for three report intervals after the last write."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from payq import db, metrics
from payq.broker import get_broker
from payq.constants import redis_key
from payq.routing import get_provider
from payq.settings import get_settings
from workers.middleware.busy import BusyCount

__all__ = ["REPORT_INTERVAL_S", "ProcessReport"]

REPORT_INTERVAL_S = 5.0


class ProcessReport:
    def __init__(self, busy: BusyCount) -> None:
        self.busy = busy
        self.started = time.time()
        self.key = ""

    def open(self, namespace: str) -> None:
        self.key = redis_key(namespace, "workers", f"{get_settings().host}:{os.getpid()}")

    def figures(self) -> dict[str, Any]:
        pool: Any = db.get_engine().pool
        provider = get_provider()
        return {
            "host": get_settings().host,
            "pid": os.getpid(),
            "group": os.getppid(),
            "threads": self.busy.threads,
            "busy": self.busy.busy,
            "processed": self.busy.processed,
            "http_in_use": provider.in_flight,
            "http_size": provider.pool_size,
            "db_in_use": int(pool.checkedout()),
            "db_size": int(pool.size()),
            "deferred": _deferrals(),
            "started_at": self.started,
            "reported_at": time.time(),
        }

    def publish(self, **extra: Any) -> dict[str, Any]:
        """Write this process's figures (and ``extra``) where ``payq status`` reads them."""
        figures = {**self.figures(), **extra}
        get_broker().client.set(self.key, json.dumps(figures), ex=int(REPORT_INTERVAL_S * 3))
        return figures

    def remove(self) -> None:
        if self.key:
            get_broker().client.delete(self.key)


def _deferrals() -> dict[str, int]:
    """This process's ``payq_deferrals_total`` by cause, for its report to ``payq status``."""
    counts: dict[str, int] = {}
    for family in metrics.DEFERRALS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                counts[sample.labels["cause"]] = int(sample.value)
    return counts
