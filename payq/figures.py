"""The system's figures, as status, health, the workers' reports and the dashboard read
them: provider attempts over the last minutes (success rate, latency, errors by class),
the same by provider endpoint, dead charges, the live workers' own reports, and the
fleet's circuit breaker in words.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select, text

from payq.broker import get_broker
from payq.constants import ChargeStatus, redis_key
from payq.db import transaction
from payq.gate import BreakerState, FleetBreaker
from payq.models import charges

__all__ = [
    "AttemptStats",
    "EndpointStats",
    "MinuteStats",
    "attempt_series",
    "attempt_stats",
    "breaker_figures",
    "dead_count",
    "describe_breaker",
    "endpoint_stats",
    "worker_reports",
]


@dataclass
class AttemptStats:
    minutes: int
    attempts: int = 0
    succeeded: int = 0
    declined: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    errors_by_class: dict[str, int] = field(default_factory=dict)


def attempt_stats(minutes: int, engine: Engine | None = None) -> AttemptStats:
    stats = AttemptStats(minutes)
    window = {"since": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)}
    with transaction(engine) as conn:
        row = conn.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded'), "
                "count(*) FILTER (WHERE outcome = 'declined'), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), "
                "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) "
                "FROM charge_attempts WHERE started_at >= :since AND kind = 'charge' "
                "AND finished_at IS NOT NULL"
            ),
            window,
        ).one()
        by_class = conn.execute(
            text(
                "SELECT error_class, count(*) FROM charge_attempts "
                "WHERE started_at >= :since AND kind = 'charge' AND finished_at IS NOT NULL "
                "AND outcome NOT IN ('succeeded', 'declined') "
                "GROUP BY error_class ORDER BY count(*) DESC"
            ),
            window,
        ).all()
    stats.attempts, stats.succeeded, stats.declined = int(row[0]), int(row[1]), int(row[2])
    stats.p50_ms, stats.p95_ms, stats.p99_ms = row[3], row[4], row[5]
    stats.errors_by_class = {str(cls): int(n) for cls, n in by_class}
    stats.errors = sum(stats.errors_by_class.values())
    return stats


@dataclass
class EndpointStats:
    """One endpoint's charge requests that started within the last ``minutes`` (recorded
    ones for the counts and latency), the charges it charged that had a request there
    then, and the charges whose request came to it from another endpoint's (a failover,
    or a retry sent elsewhere by weight) or went from it to another: ``moved_in`` counts
    those that came from another ledger group."""

    name: str | None  # None: requests recorded before there were several endpoints
    minutes: int
    calls: int = 0
    succeeded: int = 0
    declined: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    errors_by_class: dict[str, int] = field(default_factory=dict)
    charged: int = 0
    failovers_in: int = 0
    failovers_out: int = 0
    moved_in: int = 0


def endpoint_stats(minutes: int, engine: Engine | None = None) -> dict[str | None, EndpointStats]:
    """Each endpoint's figures over the last ``minutes``, by name, busiest first."""
    window = {"since": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)}
    with transaction(engine) as conn:
        rows = conn.execute(text(_ENDPOINT_CALLS), window).all()
        by_class = conn.execute(text(_ENDPOINT_ERRORS), window).all()
        switches = conn.execute(text(_ENDPOINT_SWITCHES), window).all()
        charged: dict[str, int] = dict(conn.execute(text(_ENDPOINT_CHARGED), window).all())
    stats: dict[str | None, EndpointStats] = {}
    for name, calls, ok, declined, p50, p95 in rows:
        stats[name] = EndpointStats(name, minutes, int(calls), int(ok), int(declined))
        stats[name].p50_ms, stats[name].p95_ms = p50, p95
    for name, cls, n in by_class:
        stats[name].errors_by_class[str(cls)] = int(n)
        stats[name].errors += int(n)
    for name, n in charged.items():
        stats.setdefault(name, EndpointStats(name, minutes)).charged = int(n)
    for came_from, went_to, other_group, n in switches:
        for name in (came_from, went_to):
            stats.setdefault(name, EndpointStats(name, minutes))
        stats[went_to].failovers_in += int(n)
        stats[came_from].failovers_out += int(n)
        stats[went_to].moved_in += int(n) if other_group else 0
    return stats


_ENDPOINT_CALLS = (
    "SELECT endpoint, count(*), count(*) FILTER (WHERE outcome = 'succeeded'), "
    "count(*) FILTER (WHERE outcome = 'declined'), "
    "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), "
    "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) "
    "FROM charge_attempts WHERE started_at >= :since AND kind = 'charge' "
    "AND finished_at IS NOT NULL GROUP BY endpoint ORDER BY count(*) DESC"
)
_ENDPOINT_ERRORS = (
    "SELECT endpoint, error_class, count(*) FROM charge_attempts "
    "WHERE started_at >= :since AND kind = 'charge' AND finished_at IS NOT NULL "
    "AND outcome NOT IN ('succeeded', 'declined') "
    "GROUP BY endpoint, error_class ORDER BY count(*) DESC"
)
#: Requests at another endpoint than the charge's request before them in the window: by
#: that one's endpoint, this one's, and whether the ledger group changed too.
_ENDPOINT_SWITCHES = (
    "WITH a AS (SELECT endpoint, ledger_group, "
    "lag(endpoint) OVER w AS prev_endpoint, lag(ledger_group) OVER w AS prev_group, "
    "row_number() OVER w AS seq FROM charge_attempts "
    "WHERE started_at >= :since AND kind = 'charge' "
    "WINDOW w AS (PARTITION BY charge_id ORDER BY started_at, id)) "
    "SELECT prev_endpoint, endpoint, prev_group IS DISTINCT FROM ledger_group, count(*) "
    "FROM a WHERE seq > 1 AND prev_endpoint IS DISTINCT FROM endpoint GROUP BY 1, 2, 3"
)
#: Charges charged at an endpoint that had a request there in the window.
_ENDPOINT_CHARGED = (
    "SELECT c.charged_endpoint, count(DISTINCT c.id) FROM charges c "
    "JOIN charge_attempts a ON a.charge_id = c.id AND a.endpoint = c.charged_endpoint "
    "WHERE a.started_at >= :since AND c.status = 'succeeded' GROUP BY c.charged_endpoint"
)


@dataclass
class MinuteStats:
    """Provider attempts that started within one minute and are recorded (``minute`` is
    its start, UTC)."""

    minute: dt.datetime
    attempts: int
    succeeded: int
    declined: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None


def attempt_series(minutes: int = 15, engine: Engine | None = None) -> list[MinuteStats]:
    """Per-minute throughput and latency for the last ``minutes`` minutes, oldest first,
    the current (partial) minute last; a minute without attempts is there with zeros,
    so a chart needs no gaps filled. The minutes follow PostgreSQL's clock, the one
    that stamped the attempts."""
    if minutes < 1:
        raise ValueError(f"minutes: must be 1 or more, got {minutes}")
    with transaction(engine) as conn:
        rows = conn.execute(
            text(
                "WITH m AS (SELECT generate_series(date_trunc('minute', now()) "
                "- make_interval(mins => :back), date_trunc('minute', now()), "
                "interval '1 minute') AS minute) "
                "SELECT m.minute, count(a.id), "
                "count(a.id) FILTER (WHERE a.outcome = 'succeeded'), "
                "count(a.id) FILTER (WHERE a.outcome = 'declined'), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY a.latency_ms), "
                "percentile_cont(0.95) WITHIN GROUP (ORDER BY a.latency_ms) "
                "FROM m LEFT JOIN charge_attempts a ON a.started_at >= m.minute "
                "AND a.started_at < m.minute + interval '1 minute' AND a.kind = 'charge' "
                "AND a.finished_at IS NOT NULL "
                "GROUP BY m.minute ORDER BY m.minute"
            ),
            {"back": minutes - 1},
        ).all()
    return [
        MinuteStats(
            minute=minute,
            attempts=int(n),
            succeeded=int(ok),
            declined=int(declined),
            errors=int(n) - int(ok) - int(declined),
            p50_ms=p50,
            p95_ms=p95,
        )
        for minute, n, ok, declined, p50, p95 in rows
    ]


def dead_count(engine: Engine | None = None, *, within_s: float | None = None) -> int:
    """Dead charges in the view; with ``within_s``, only those that died that recently."""
    query = (
        select(func.count())
        .select_from(charges)
        .where(charges.c.status == ChargeStatus.DEAD, charges.c.purged_at.is_(None))
    )
    if within_s is not None:
        query = query.where(charges.c.updated_at >= func.now() - dt.timedelta(seconds=within_s))
    with transaction(engine) as conn:
        return int(conn.execute(query).scalar_one())


def worker_reports() -> list[dict[str, Any]]:
    broker = get_broker()
    keys = list(broker.client.scan_iter(match=redis_key(broker.namespace, "workers", "*")))
    values = broker.client.mget(keys) if keys else []
    reports = [json.loads(v) for v in values if v]
    now = time.time()
    for report in reports:
        report["age_s"] = round(now - report["reported_at"], 1)
    return sorted(reports, key=lambda r: (r["host"], r["group"], r["pid"]))


def breaker_figures(breaker: FleetBreaker) -> dict[str, Any]:
    """The breaker's snapshot as ``status --json`` carries it, with its window's length and,
    while open, the wall-clock moment it may half-open (so a saved snapshot still says when)."""
    snap = breaker.snapshot()
    figures = snap.as_dict()
    figures["window_s"] = breaker.rules.window_s
    figures["open_until"] = (
        (dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=snap.open_for_ms)).isoformat(
            timespec="seconds"
        )
        if snap.state is BreakerState.OPEN
        else None
    )
    return figures


def describe_breaker(b: dict[str, Any]) -> str:
    """One line for people, shared by ``payq status`` and the health check."""
    w = b["window"]
    times = "time" if b["opened"] == 1 else "times"
    window = (
        f"{b['window_s']} s window: {w['calls']} calls, {w['failures']} failed, {w['slow']} slow"
    )
    history = f"opened {b['opened']} {times}; {window}"
    if b["state"] == BreakerState.OPEN:
        if b["open_for_s"] <= 0:  # it half-opens when the next charge asks
            over = "BREAKER_OPEN_S over: half-opens at the next charge"
            return f"open ({over}): {b['reason']} ({history})"
        until = b["open_until"][11:19] + " UTC" if b.get("open_until") else "?"
        return f"open until {until} ({b['open_for_s']:.1f} s more): {b['reason']} ({history})"
    if b["state"] == BreakerState.HALF_OPEN:
        return f"half-open for {b['changed_ago_s']:.1f} s: {b['reason']} ({history})"
    if b["opened"] and b["changed_ago_s"] is not None:
        return f"closed {b['changed_ago_s']:.0f} s ago: {b['reason']} ({history})"
    return f"closed ({window})"
