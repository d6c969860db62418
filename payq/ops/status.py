"""``payq status``: what the system is doing now, from PostgreSQL and Redis.

Queue depths, charges by status, provider success rate and latency over the last 5
and 60 minutes, errors by class, the fleet's circuit breaker and how many of the
``PAYMENT_MAX_CONCURRENCY`` slots are held, and each live worker's own report
(workers write one to Redis every few seconds: threads busy, HTTP and database pools
in use, charges deferred by cause). ``attempt_series`` gives the same provider figures
minute by minute, for the dashboard's chart.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select, text

from payq.breaker import BreakerState, FleetBreaker
from payq.broker import get_broker
from payq.constants import QUEUE_NAME, ChargeStatus, DeadOutcome, redis_key
from payq.db import transaction
from payq.dramatiq_redis import Layout
from payq.gate import ProviderGate
from payq.models import charges
from payq.ops.output import plural
from payq.settings import Settings, get_settings
from payq.sweep import backlog

__all__ = [
    "AttemptStats",
    "MinuteStats",
    "attempt_series",
    "attempt_stats",
    "breaker_figures",
    "dead_count",
    "describe_breaker",
    "render",
    "snapshot",
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
    figures["window_s"] = breaker.settings.breaker_window_s
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


def snapshot(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    broker = get_broker()
    ns, client = broker.namespace, broker.client
    # Built here rather than taken from get_gate(): reading needs no renewal thread, and
    # this follows the settings given (the same namespace and limit as the workers').
    gate = ProviderGate.from_settings(client, settings)
    layout = Layout(ns)
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(layout.queue(QUEUE_NAME))
        pipe.hlen(layout.messages(layout.delayed(QUEUE_NAME)))
        pipe.zcard(layout.dead(QUEUE_NAME))
        ready, delayed, broker_dead = pipe.execute()
    with transaction() as conn:
        by_status: dict[str, int] = dict(
            conn.execute(select(charges.c.status, func.count()).group_by(charges.c.status)).all()
        )
        dead_by_outcome: dict[str, int] = dict(
            conn.execute(
                select(charges.c.dead_outcome, func.count())
                .where(charges.c.status == ChargeStatus.DEAD, charges.c.purged_at.is_(None))
                .group_by(charges.c.dead_outcome)
            ).all()
        )
    workers = worker_reports()
    deferrals: dict[str, int] = {}
    for w in workers:
        for cause, n in w.get("deferred", {}).items():
            deferrals[cause] = deferrals.get(cause, 0) + n
    return {
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "queues": {"ready": ready, "delayed": delayed, "broker_dead_letters": broker_dead},
        "charges": {s.value: int(by_status.get(s.value, 0)) for s in ChargeStatus},
        "dead_in_view": dead_count(),
        # What the dead charges in the view did at the provider, and the sweep's work.
        "dead_outcomes": {o.value: int(dead_by_outcome.get(o.value, 0)) for o in DeadOutcome},
        "sweep": backlog(settings),
        "provider": {
            "last_5_min": asdict(attempt_stats(5)),
            "last_60_min": asdict(attempt_stats(60)),
        },
        "breaker": breaker_figures(gate.breaker),
        "fleet": {
            "slots_in_use": gate.fleet.in_use(),
            "max_concurrency": settings.payment_max_concurrency,
            "provider_calls_in_flight": sum(w["http_in_use"] for w in workers),
        },
        # Summed over the live workers' reports: since each process started.
        "deferrals": dict(sorted(deferrals.items(), key=lambda kv: -kv[1])),
        "workers": workers,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def render(snap: dict[str, Any]) -> str:
    q, c = snap["queues"], snap["charges"]
    lines = [
        f"payq status at {snap['at']}",
        f"queues     ready {q['ready']} · delayed {q['delayed']} · "
        f"broker dead letters {q['broker_dead_letters']}",
        "charges    " + " · ".join(f"{k} {v}" for k, v in c.items())
        + f" (in the dead-letter view: {snap['dead_in_view']})",
        "dead       " + " · ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in snap["dead_outcomes"].items()
        ) + f" | sweep: {snap['sweep']['unknown']} to look up by key, "
        f"{snap['sweep']['overdue']} of them overdue, "
        f"{snap['sweep']['unknown_past_retention']} past the key's retention (for a person)",
    ]  # fmt: skip
    for label, key in (("last 5 min", "last_5_min"), ("last 60 min", "last_60_min")):
        p = snap["provider"][key]
        rate = f"{p['succeeded'] / p['attempts']:.1%}" if p["attempts"] else "-"
        lines.append(
            f"provider   {label}: {p['attempts']} attempts, {rate} charged, "
            f"{p['declined']} declined, {p['errors']} errors; latency p50 {_ms(p['p50_ms'])}, "
            f"p95 {_ms(p['p95_ms'])}, p99 {_ms(p['p99_ms'])}"
        )
    errors = snap["provider"]["last_60_min"]["errors_by_class"]
    lines.append(
        "errors     (60 min) " + (" · ".join(f"{k} {v}" for k, v in errors.items()) or "none")
    )
    lines.append(f"breaker    {describe_breaker(snap['breaker'])}")
    fleet = snap["fleet"]
    lines.append(
        f"fleet      {fleet['slots_in_use']} of {fleet['max_concurrency']} slots in use "
        f"(PAYMENT_MAX_CONCURRENCY); {fleet['provider_calls_in_flight']} provider calls in "
        "flight reported by workers"
    )
    deferrals = snap["deferrals"]
    lines.append(
        "deferred   "
        + (" · ".join(f"{k} {v}" for k, v in deferrals.items()) or "none")
        + " (charges sent again for later, no attempt used; live workers, since they started)"
    )
    workers = snap["workers"]
    if not workers:
        lines.append("workers    none reporting")
    else:
        lines.append(f"workers    {plural(len(workers), 'process', 'processes')} reporting")
        lines.append(
            "  HOST:PID            GROUP   THREADS BUSY  HTTP POOL  DB POOL  DONE  REPORTED"
        )
        for w in workers:
            lines.append(
                f"  {w['host'][:14] + ':' + str(w['pid']):<19} {w['group']:<7} "
                f"{w['busy']:>4}/{w['threads']:<8} {w['http_in_use']:>4}/{w['http_size']:<5} "
                f"{w['db_in_use']:>3}/{w['db_size']:<4} {w['processed']:>5}  "
                f"{w['age_s']:.0f} s ago"
            )
    return "\n".join(lines)
