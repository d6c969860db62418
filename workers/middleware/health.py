"""The health checks every ``HEALTH_CHECK_INTERVAL_S``, by one process of the fleet at a
time (a Redis key held for the interval), over connections of their own; logged as one
line, an alert for each check that goes bad (the breaker alerts itself when it opens),
and the dead-letter and unknown-outcome gauges (read from a replica when ``payq.reads``
says so)."""

from __future__ import annotations

import logging
import os

from sqlalchemy import Engine

from payq import db, metrics
from payq.broker import get_broker
from payq.constants import redis_key
from payq.errors import ConfigError
from payq.figures import dead_count
from payq.health import Check, Level, run_checks, worst
from payq.provider import ProviderClient
from payq.reads import read_engine
from payq.sentry import alert
from payq.settings import Settings
from payq.sweep import backlog

__all__ = ["HealthChecks"]

log = logging.getLogger("payq.worker")


class HealthChecks:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._failing: set[str] = set()
        self._engine: Engine | None = None
        self._clients: dict[str, ProviderClient] | None = None

    def __call__(self) -> None:
        if not self._lead():
            return  # another process of the fleet checks the fleet this interval
        if self._engine is None:
            # Connections of its own: the charge threads may need every pooled one.
            own = self.settings.model_copy(update={"database_pool_max_connections": 1})
            self._engine = db.make_engine(own, "worker-health")
            self._clients = _own_clients(self.settings)
        checks = run_checks(self.settings, engine=self._engine, clients=self._clients)
        self._log(checks)
        self._alert(checks)
        figures_from = read_engine(self._engine)
        metrics.DEAD_LETTERS.set(dead_count(figures_from))
        figures = backlog(self.settings, figures_from)
        metrics.UNKNOWN_OUTCOMES.labels("within").set(figures["unknown"])
        metrics.UNKNOWN_OUTCOMES.labels("past").set(figures["unknown_past_retention"])

    def _lead(self) -> bool:
        broker = get_broker()
        return bool(
            broker.client.set(
                redis_key(broker.namespace, "health", "leader"),
                os.getpid(),
                nx=True,
                ex=max(1, self.settings.health_check_interval_s - 1),
            )
        )

    def _log(self, checks: list[Check]) -> None:
        overall = worst(checks)
        log.log(
            logging.INFO if overall is Level.OK else logging.WARNING,
            "health %s: %s",
            overall.name.lower(),
            "; ".join(
                f"{c.name} {c.level.name.lower()}"
                # The breaker's line is its state and window: worth reading even when ok.
                + ("" if c.level is Level.OK and not _is_breaker(c) else f" ({c.detail})")
                for c in checks
            ),
            extra={"checks": {c.name: c.level.name.lower() for c in checks}},
        )

    def _alert(self, checks: list[Check]) -> None:
        for check in checks:
            if _is_breaker(check):
                continue  # it alerted itself when it opened (payq.gate.breaker)
            if check.level is not Level.OK and check.name not in self._failing:
                level = logging.ERROR if check.level is Level.DOWN else logging.WARNING
                message = f"{check.name} {check.level.name.lower()}: {check.detail}"
                alert(log, message, level, check=check.name)
        # New dead charges alert every interval they appear; the rest once until fixed.
        self._failing = {
            c.name for c in checks if c.level is not Level.OK and c.name != "dead_letters"
        }


def _is_breaker(check: Check) -> bool:
    """An endpoint's breaker check (``breaker``, or ``breaker:<name>`` of several)."""
    return check.name.split(":")[0] == "breaker"


def _own_clients(settings: Settings) -> dict[str, ProviderClient]:
    """A client of one connection per endpoint, for its lookup; an endpoint without an
    API key gets none, and its check says why."""
    clients = {}
    for ep in settings.endpoints:
        try:
            own = ep.settings.model_copy(update={"payment_pool_max_connections": 1})
            clients[ep.name] = ProviderClient(own)
        except ConfigError:
            continue
    return clients
