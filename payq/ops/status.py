"""``payq status``: what the system is doing now, from PostgreSQL and Redis.

Queue depths, charges by status and dead charges by what the provider did, provider
success rate and latency over the last 5 and 60 minutes, errors by class, the fleet's
circuit breaker and slots, deferrals, and each live worker's own report. The figures
themselves are ``payq.figures``'s, shared with health and the dashboard.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, select

from payq.broker import get_broker
from payq.constants import QUEUE_NAME, ChargeStatus, DeadOutcome
from payq.db import transaction
from payq.dramatiq_redis import Layout
from payq.figures import (
    attempt_stats,
    breaker_figures,
    dead_count,
    describe_breaker,
    worker_reports,
)
from payq.gate import ProviderGate
from payq.models import charges
from payq.ops.output import plural
from payq.settings import Settings, get_settings
from payq.sweep import backlog

__all__ = ["render", "snapshot"]


def snapshot(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    broker = get_broker()
    ns, client = broker.namespace, broker.client
    # Built here rather than taken from get_gate(): reading needs no renewal thread, and
    # this follows the settings given (the same namespace and limit as the workers').
    gate = ProviderGate(client, settings)
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
