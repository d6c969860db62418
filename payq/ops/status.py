"""``payq status``: what the system is doing now, from PostgreSQL and Redis.

Queue depths, charges by status and dead charges by what the provider did, provider
success rate and latency over the last 5 and 60 minutes, errors by class, the fleet's
circuit breaker and slots (the first-priority endpoint's), each provider endpoint's own
breaker, slots and figures, deferrals, and each live worker's own report. The figures
themselves are ``payq.figures``'s, shared with health and the dashboard. The database's
are read where ``payq.reads`` says (a replica, if one is configured and close enough
behind), and the snapshot says where they came from.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from sqlalchemy import Engine, func, select

from payq.broker import get_broker
from payq.constants import QUEUE_NAME, ChargeStatus, DeadOutcome
from payq.db import transaction
from payq.dramatiq_redis import Layout
from payq.figures import (
    EndpointStats,
    attempt_stats,
    breaker_figures,
    dead_count,
    describe_breaker,
    endpoint_stats,
    worker_reports,
)
from payq.models import charges
from payq.ops.output import plural
from payq.reads import read_source
from payq.routing import Route, Routes
from payq.settings import Settings, get_settings
from payq.sweep import backlog

__all__ = ["render", "snapshot"]


def snapshot(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    broker = get_broker()
    ns, client = broker.namespace, broker.client
    # Built here rather than taken from get_routes(): reading needs no renewal thread, and
    # this follows the settings given (the same namespace and limits as the workers').
    routes = Routes.build(settings, client)
    gate = routes.primary.gate
    layout = Layout(ns)
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(layout.queue(QUEUE_NAME))
        pipe.hlen(layout.messages(layout.delayed(QUEUE_NAME)))
        pipe.zcard(layout.dead(QUEUE_NAME))
        ready, delayed, broker_dead = pipe.execute()
    reads = read_source()
    engine = reads.engine
    with transaction(engine) as conn:
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
        "dead_in_view": dead_count(engine),
        # What the dead charges in the view did at the provider, and the sweep's work.
        "dead_outcomes": {o.value: int(dead_by_outcome.get(o.value, 0)) for o in DeadOutcome},
        "sweep": backlog(settings, engine),
        "provider": {
            "last_5_min": asdict(attempt_stats(5, engine)),
            "last_60_min": asdict(attempt_stats(60, engine)),
        },
        "breaker": breaker_figures(gate.breaker),
        "fleet": {
            "slots_in_use": gate.fleet.in_use(),
            "max_concurrency": gate.fleet.limit,
            "provider_calls_in_flight": sum(w["http_in_use"] for w in workers),
        },
        "endpoints": endpoint_figures(routes, engine),
        # Summed over the live workers' reports: since each process started.
        "deferrals": dict(sorted(deferrals.items(), key=lambda kv: -kv[1])),
        "workers": workers,
        # Where the database's figures came from (payq.reads).
        "reads": reads.as_dict() | {"said": reads.describe()},
    }


def endpoint_figures(routes: Routes, engine: Engine | None = None) -> list[dict[str, Any]]:
    """Each endpoint, highest priority first: its place, breaker, slots and figures over
    the last 5 and 60 minutes; then any endpoint that is no longer configured but had
    requests in the hour (``None``: recorded before requests named their endpoint)."""
    windows = {"last_5_min": endpoint_stats(5, engine), "last_60_min": endpoint_stats(60, engine)}
    listed = [_endpoint(route, windows) for route in routes.all]
    configured = {route.name for route in routes.all}
    for name in windows["last_60_min"]:
        if name not in configured:
            listed.append(_gone(name, windows))
    return listed


def _endpoint(route: Route, windows: dict[str, Any]) -> dict[str, Any]:
    gate = route.gate
    return {
        "name": route.name,
        "group": route.group,
        "priority": route.endpoint.priority,
        "weight": route.endpoint.weight,
        "breaker": breaker_figures(gate.breaker),
        "fleet": {"slots_in_use": gate.fleet.in_use(), "max_concurrency": gate.fleet.limit},
        **_windows(route.name, windows),
    }


def _gone(name: str | None, windows: dict[str, Any]) -> dict[str, Any]:
    """An endpoint with recent requests that the settings no longer list."""
    return {
        "name": name,
        "group": None,
        "priority": None,
        "weight": None,
        "breaker": None,
        "fleet": None,
        **_windows(name, windows),
    }


def _windows(name: str | None, windows: dict[str, Any]) -> dict[str, Any]:
    empty = {"last_5_min": EndpointStats(name, 5), "last_60_min": EndpointStats(name, 60)}
    return {key: asdict(stats.get(name, empty[key])) for key, stats in windows.items()}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


#: The endpoints table's columns: heading, width (a negative one: left-aligned).
_COLUMNS = (
    ("GROUP", -10), ("PRI", 3), ("BREAKER", -9), ("SLOTS", 9), ("CALLS 5m", 8),
    ("OK% 5m", 6), ("ERR 5m", 6), ("P50 5m", 8), ("P95 5m", 8), ("CALLS 60m", 9),
    ("ERR 60m", 7), ("CHARGED 60m", 11), ("OVER IN/OUT", 11), ("MOVED IN", 8),
)  # fmt: skip


def render_endpoints(endpoints: list[dict[str, Any]]) -> list[str]:
    """The endpoints as a table (highest priority first), then each one's breaker and
    errors by class. Failovers: a charge's request at another endpoint than its request
    before (within the hour); moved: from another ledger group."""
    width = max(4, *(len(str(e["name"])) for e in endpoints))
    head = (
        "  "
        + "NAME".ljust(width)
        + "".join(" " + (h.ljust(-w) if w < 0 else h.rjust(w)) for h, w in _COLUMNS)
    )
    lines = [f"endpoints  {plural(len(endpoints), 'endpoint')}, highest priority first", head]
    for e in endpoints:
        cells = "".join(
            " " + (c.ljust(-w) if w < 0 else c.rjust(w))
            for c, (_, w) in zip(_endpoint_cells(e), _COLUMNS, strict=True)
        )
        lines.append("  " + str(e["name"]).ljust(width) + cells)
    for e in endpoints:
        errors = e["last_60_min"]["errors_by_class"]
        breaker = describe_breaker(e["breaker"]) if e["breaker"] else "not configured any more"
        lines.append(f"  {e['name']}: breaker {breaker}")
        lines.append(
            f"  {e['name']}: errors (60 min) "
            + (" · ".join(f"{k} {v}" for k, v in errors.items()) or "none")
        )
    return lines


def _endpoint_cells(e: dict[str, Any]) -> list[str]:
    five, hour, fleet = e["last_5_min"], e["last_60_min"], e["fleet"]
    rate = f"{five['succeeded'] / five['calls']:.0%}" if five["calls"] else "-"
    return [
        str(e["group"] or "-"),
        str(e["priority"] or "-"),
        e["breaker"]["state"].replace("_", "-") if e["breaker"] else "-",
        f"{fleet['slots_in_use']}/{fleet['max_concurrency']}" if fleet else "-",
        str(five["calls"]),
        rate,
        str(five["errors"]),
        _ms(five["p50_ms"]),
        _ms(five["p95_ms"]),
        str(hour["calls"]),
        str(hour["errors"]),
        str(hour["charged"]),
        f"{hour['failovers_in']}/{hour['failovers_out']}",
        str(hour["moved_in"]),
    ]


def render(snap: dict[str, Any]) -> str:
    q, c = snap["queues"], snap["charges"]
    reads = snap.get("reads") or {}  # a snapshot saved before reads could come from a replica
    lines = [
        f"payq status at {snap['at']}",
        *([f"reads      {reads['said']}"] if reads.get("replica_configured") else []),
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
    # With several endpoints, these two lines are the first-priority endpoint's.
    endpoints = snap.get("endpoints") or []  # a snapshot saved before there were several
    first = f"({endpoints[0]['name']}) " if len(endpoints) > 1 else ""
    lines.append(f"breaker    {first}{describe_breaker(snap['breaker'])}")
    fleet = snap["fleet"]
    lines.append(
        f"fleet      {first}{fleet['slots_in_use']} of {fleet['max_concurrency']} slots in use "
        f"(PAYMENT_MAX_CONCURRENCY); {fleet['provider_calls_in_flight']} provider calls in "
        "flight reported by workers"
    )
    if endpoints:
        lines.extend(render_endpoints(endpoints))
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
