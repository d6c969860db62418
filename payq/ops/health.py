"""Health checks: the same checks for ``payq health`` (a probe) and for every worker.

Each check says ``ok``, ``degraded`` or ``down`` with a line of detail; the worst
one decides the exit code of ``payq health`` (0, 1, 2).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import redis
from sqlalchemy import text

from payq.broker import get_broker
from payq.constants import redis_key
from payq.db import transaction
from payq.errors import AuthenticationFailed, ConfigError, ProviderError
from payq.ops.status import attempt_stats, dead_count, worker_reports
from payq.provider import get_provider
from payq.settings import Settings

__all__ = ["Check", "Level", "run_checks", "worst"]


class Level(IntEnum):
    OK = 0
    DEGRADED = 1
    DOWN = 2


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level.name.lower(), "detail": self.detail}


def worst(checks: list[Check]) -> Level:
    return max((c.level for c in checks), default=Level.OK)


def _timed(name: str, probe: Callable[[], str]) -> Check:
    started = time.monotonic()
    try:
        detail = probe()
    except Exception as exc:  # a check reports what broke; it never raises
        return Check(name, Level.DOWN, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return Check(name, Level.OK, f"{detail} in {(time.monotonic() - started) * 1000:.0f} ms")


def check_redis() -> Check:
    return _timed("redis", lambda: "PING answered" if get_broker().client.ping() else "no PONG")


def check_postgres() -> Check:
    def probe() -> str:
        with transaction() as conn:
            conn.execute(text("SELECT 1"))
        return "SELECT 1 answered"

    return _timed("postgres", probe)


def check_provider() -> Check:
    started = time.monotonic()
    try:
        found = get_provider().find_charge(f"payq-health-{uuid.uuid4().hex}")
    except ConfigError as exc:
        return Check("provider", Level.DEGRADED, str(exc))
    except AuthenticationFailed:
        return Check("provider", Level.DOWN, "the provider refused PAYMENT_PROVIDER_API_KEY")
    except ProviderError as exc:
        return Check("provider", Level.DOWN, f"{exc.error_class}: {str(exc)[:160]}")
    ms = (time.monotonic() - started) * 1000
    detail = "answered a lookup" if found is None else "answered (unexpected charge found)"
    return Check("provider", Level.OK, f"{detail} in {ms:.0f} ms")


def check_breaker() -> Check:
    return Check("breaker", Level.OK, "no fleet breaker yet: it arrives with the resilience work")


def check_error_rate(settings: Settings) -> Check:
    stats = attempt_stats(minutes=5)
    if stats.attempts < settings.health_min_attempts:
        return Check(
            "error_rate", Level.OK, f"{stats.attempts} attempts in 5 min: too few to judge"
        )
    rate = stats.errors / stats.attempts
    level = Level.DEGRADED if rate > settings.health_error_rate else Level.OK
    return Check(
        "error_rate",
        level,
        f"{rate:.0%} of {stats.attempts} provider attempts failed in 5 min "
        f"(threshold {settings.health_error_rate:.0%})",
    )


def check_dead_letters(client: redis.Redis, namespace: str) -> Check:
    """Degraded when the dead-letter view grew since the previous check (anywhere)."""
    count = dead_count()
    key = redis_key(namespace, "health", "dead_letters")
    previous = client.getset(key, json.dumps({"count": count, "at": time.time()}))
    if previous is None:
        return Check("dead_letters", Level.OK, f"{count} dead charges")
    before = json.loads(previous)
    grown = count - int(before["count"])
    ago = time.time() - float(before["at"])
    if grown > 0:
        return Check(
            "dead_letters",
            Level.DEGRADED,
            f"{count} dead charges, {grown} more than {ago:.0f} s ago: see `payq dlq list`",
        )
    return Check("dead_letters", Level.OK, f"{count} dead charges, none new in {ago:.0f} s")


def check_pools(settings: Settings) -> Check:
    reports = worker_reports()
    if not reports:
        return Check("pools", Level.OK, "no live worker reports")
    worst_use = 0.0
    where = ""
    for r in reports:
        for pool in ("http", "db"):
            use = r[f"{pool}_in_use"] / max(1, r[f"{pool}_size"])
            if use > worst_use:
                worst_use, where = use, f"{pool} pool of {r['host']}:{r['pid']}"
    threshold = settings.health_pool_utilization
    level = Level.DEGRADED if worst_use > threshold else Level.OK
    detail = f"busiest: {where} at {worst_use:.0%}" if where else "all pools idle"
    return Check("pools", level, f"{detail} (threshold {threshold:.0%}, {len(reports)} workers)")


def run_checks(settings: Settings, *, provider: bool = True) -> list[Check]:
    checks = [check_redis(), check_postgres()]
    if provider:
        checks.append(check_provider())
    checks.append(check_breaker())
    if checks[0].level is Level.OK and checks[1].level is Level.OK:
        broker = get_broker()
        fleet_checks: list[Callable[[], Check]] = [
            lambda: check_error_rate(settings),
            lambda: check_dead_letters(broker.client, broker.namespace),
            lambda: check_pools(settings),
        ]
        for fleet_check in fleet_checks:
            try:
                checks.append(fleet_check())
            except Exception as exc:  # the service checks above already say what is down
                checks.append(Check("fleet", Level.DEGRADED, f"{type(exc).__name__}: {exc}"[:200]))
    return checks
