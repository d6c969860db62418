"""One background thread per worker process: its report, pool and gate gauges every
``REPORT_INTERVAL_S``, the health checks every ``HEALTH_CHECK_INTERVAL_S``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from dramatiq.middleware import Middleware

from payq.settings import Settings
from workers.middleware.busy import BusyCount
from workers.middleware.gauges import set_gate_gauges
from workers.middleware.health import HealthChecks
from workers.middleware.pools import PoolWatch
from workers.middleware.report import REPORT_INTERVAL_S, ProcessReport

__all__ = ["Reporter"]

log = logging.getLogger("payq.worker")


class Reporter(Middleware):
    def __init__(self, settings: Settings, busy: BusyCount) -> None:
        self.settings = settings
        self.report = ProcessReport(busy)
        self.pools = PoolWatch(settings)
        self.health = HealthChecks(settings)
        self._stop = threading.Event()

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.report.open(broker.namespace)
        threading.Thread(target=self._run, name="payq-report", daemon=True).start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()
        try:
            self.report.remove()
        except Exception:  # shutting down anyway: the report expires on its own
            log.debug("could not remove the worker report", exc_info=True)

    def _run(self) -> None:
        next_health = time.monotonic() + self.settings.health_check_interval_s
        while True:
            try:
                self.pools(self.report.publish())
                set_gate_gauges()
                if time.monotonic() >= next_health:
                    next_health = time.monotonic() + self.settings.health_check_interval_s
                    self.health()
            except Exception:  # the report must never take the worker down
                log.warning("worker report failed", exc_info=True)
            if self._stop.wait(REPORT_INTERVAL_S):
                return
