"""The worker's middleware: refuse unsafe pool settings, and report on itself.

``WorkerReport`` runs one background thread per worker process. Every few seconds it
writes the process's figures to Redis (what ``payq status`` shows, and what
``payq health`` judges pools by) and sets the breaker-state and fleet-slot gauges;
every ``HEALTH_CHECK_INTERVAL_S`` it runs the health checks (the fleet-wide ones in
one process of the fleet at a time), logs a snapshot, and raises an alert (a
WARNING/ERROR line, and a Sentry event when Sentry is on) when a pool stays busier
than ``HEALTH_POOL_UTILIZATION`` for a whole interval, the error rate crosses
``HEALTH_ERROR_RATE``, or the dead-letter count grows. The breaker raises its own
alert when it opens (``payq.breaker``), so the health loop does not alert for it again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

import redis
from dramatiq.middleware import Middleware
from sqlalchemy import Engine

from payq import db, metrics
from payq.broker import get_broker
from payq.constants import redis_key
from payq.errors import ConfigError
from payq.figures import dead_count
from payq.gate import BreakerState, get_gate
from payq.health import Level, run_checks, worst
from payq.provider import ProviderClient, get_provider
from payq.sentry import alert
from payq.settings import Settings
from payq.sweep import backlog

__all__ = ["DrainOnce", "PoolGuard", "WorkerReport"]

log = logging.getLogger("payq.worker")
REPORT_INTERVAL_S = 5.0
#: ``payq_breaker_state``'s values, as its help text says.
BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class PoolGuard(Middleware):
    """Refuses to boot a worker whose threads could outnumber its connection pools."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        try:
            self.settings.check_worker_pools(worker.worker_threads)
        except ConfigError as exc:
            log.critical("worker refused to start: %s", exc)
            raise SystemExit(2) from None
        db.set_role("worker")


def _alert(message: str, level: int, **tags: str) -> None:
    alert(log, message, level, **tags)


class DrainOnce(Middleware):
    """A second SIGTERM right after the first is the same request to stop, not "kill now".

    Dramatiq's worker process drains on its first SIGTERM and exits at once, cutting its
    calls, on the next. A signal to the whole process group (systemd's default
    ``KillMode=control-group``, ``kill -TERM -PGID``, a terminal's Ctrl-\\) reaches each
    worker twice: straight, and again from the ``dramatiq`` master passing it on. So a
    repeat within ``REPEAT_WINDOW_S`` is ignored; a later one still stops the process hard.
    """

    REPEAT_WINDOW_S = 2.0

    def __init__(self) -> None:
        self._first: float | None = None

    def after_process_boot(self, broker: Any) -> None:
        dramatiq_handler = signal.getsignal(signal.SIGTERM)
        if not callable(dramatiq_handler):
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            now = time.monotonic()
            if self._first is not None and now - self._first < self.REPEAT_WINDOW_S:
                log.info("repeated SIGTERM ignored: this worker is already draining")
                return
            self._first = self._first or now
            dramatiq_handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)


class WorkerReport(Middleware):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.busy = 0
        self.processed = 0
        self.threads = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._key = ""
        self._started = time.time()
        self._hot_since: float | None = None
        self._failing: set[str] = set()
        self._health_engine: Engine | None = None
        self._health_client: ProviderClient | None = None

    # Dramatiq hooks -----------------------------------------------------------------
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.threads = worker.worker_threads
        self._key = redis_key(broker.namespace, "workers", f"{socket.gethostname()}:{os.getpid()}")
        self._thread = threading.Thread(target=self._run, name="payq-report", daemon=True)
        self._thread.start()

    def before_process_message(self, broker: Any, message: Any) -> None:
        with self._lock:
            self.busy += 1

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        with self._lock:
            self.busy -= 1
            self.processed += 1

    after_skip_message = after_process_message

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()
        if self._key:
            try:
                get_broker().client.delete(self._key)
            except Exception:  # shutting down anyway: the report expires on its own
                log.debug("could not remove the worker report", exc_info=True)

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        # Every thread has finished its message: give back the fleet slots this process
        # kept and send the calls it counted (leases would free the slots in seconds).
        get_gate().flush()

    # The report thread --------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        engine = db.get_engine()
        pool: Any = engine.pool
        provider = get_provider()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "group": os.getppid(),
            "threads": self.threads,
            "busy": self.busy,
            "processed": self.processed,
            "http_in_use": provider.in_flight,
            "http_size": provider.pool_size,
            "db_in_use": int(pool.checkedout()),
            "db_size": int(pool.size()),
            "deferred": _deferrals(),
            "started_at": self._started,
            "reported_at": time.time(),
        }

    def publish(self, **extra: Any) -> dict[str, Any]:
        """Write this process's figures (and ``extra``) where ``payq status`` reads them."""
        figures = {**self.figures(), **extra}
        get_broker().client.set(self._key, json.dumps(figures), ex=int(REPORT_INTERVAL_S * 3))
        return figures

    def _run(self) -> None:
        next_health = time.monotonic() + self.settings.health_check_interval_s
        while True:
            try:
                figures = self.publish()
                self._watch_pools(figures)
                self._watch_gate()
                if time.monotonic() >= next_health:
                    next_health = time.monotonic() + self.settings.health_check_interval_s
                    self._health()
            except Exception:  # the report must never take the worker down
                log.warning("worker report failed", exc_info=True)
            if self._stop.wait(REPORT_INTERVAL_S):
                return

    def _watch_pools(self, figures: dict[str, Any]) -> None:
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
        if self._hot_since is None:
            self._hot_since = now
        elif now - self._hot_since >= self.settings.health_check_interval_s:
            _alert(
                f"pool utilization {use:.0%} for over {self.settings.health_check_interval_s} s "
                f"(HTTP {figures['http_in_use']}/{figures['http_size']}, database "
                f"{figures['db_in_use']}/{figures['db_size']}): add workers or raise the pools",
                logging.WARNING,
                check="pools",
            )
            self._hot_since = now

    def _watch_gate(self) -> None:
        """The breaker and fleet gauges: two short Redis scripts every report.

        Set by every process (the gauges keep the most recent value), so they stay
        current while any worker lives. If Redis does not answer they keep their last
        value, and the report goes on: the health checks say Redis is down.
        """
        gate = get_gate()
        try:
            state = gate.breaker.snapshot().state
            in_use = gate.fleet.in_use()
        except redis.RedisError as exc:
            log.warning("breaker and fleet gauges not updated (%s)", type(exc).__name__)
            return
        metrics.BREAKER_STATE.set(BREAKER_GAUGE[state])
        metrics.FLEET_SLOTS_IN_USE.set(in_use)

    def _health(self) -> None:
        client = get_broker().client
        leader = client.set(
            redis_key(get_broker().namespace, "health", "leader"),
            os.getpid(),
            nx=True,
            ex=max(1, self.settings.health_check_interval_s - 1),
        )
        if not leader:
            return  # another process of the fleet checks the fleet this interval
        if self._health_engine is None:
            # Connections of its own: the charge threads may need every pooled one.
            own = self.settings.model_copy(
                update={"database_pool_max_connections": 1, "payment_pool_max_connections": 1}
            )
            self._health_engine = db.make_engine(own, "worker-health")
            self._health_client = ProviderClient(own)
        checks = run_checks(self.settings, engine=self._health_engine, client=self._health_client)
        overall = worst(checks)
        log.log(
            logging.INFO if overall is Level.OK else logging.WARNING,
            "health %s: %s",
            overall.name.lower(),
            "; ".join(
                f"{c.name} {c.level.name.lower()}"
                # The breaker's line is its state and window: worth reading even when ok.
                + ("" if c.level is Level.OK and c.name != "breaker" else f" ({c.detail})")
                for c in checks
            ),
            extra={"checks": {c.name: c.level.name.lower() for c in checks}},
        )
        for check in checks:
            if check.name == "breaker":
                continue  # it alerted itself when it opened (payq.breaker)
            if check.level is not Level.OK and check.name not in self._failing:
                level = logging.ERROR if check.level is Level.DOWN else logging.WARNING
                _alert(f"{check.name} {check.level.name.lower()}: {check.detail}", level,
                       check=check.name)  # fmt: skip
        # New dead charges alert every interval they appear; the rest once until fixed.
        self._failing = {
            c.name for c in checks if c.level is not Level.OK and c.name != "dead_letters"
        }
        metrics.DEAD_LETTERS.set(dead_count(self._health_engine))
        figures = backlog(self.settings, self._health_engine)
        metrics.UNKNOWN_OUTCOMES.labels("within").set(figures["unknown"])
        metrics.UNKNOWN_OUTCOMES.labels("past").set(figures["unknown_past_retention"])


def _deferrals() -> dict[str, int]:
    """This process's ``payq_deferrals_total`` by cause, for its report to ``payq status``."""
    counts: dict[str, int] = {}
    for family in metrics.DEFERRALS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                counts[sample.labels["cause"]] = int(sample.value)
    return counts
