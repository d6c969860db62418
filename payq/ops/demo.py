"""``payq demo`` (``make demo``): the main job end to end, with progress and a summary.

It sets up what it needs (the database and its schema; throwaway Redis and
PostgreSQL servers if the configured ones do not answer), starts two providers with
faults (two ledger groups: ``primary``, and ``backup`` behind it), two worker
processes and the relay, enqueues charges, shows them move, takes the primary down
for a while (traffic fails over to the backup, and comes back), and ends with a
summary. It exits 0 only if every charge ended final, none was charged twice by
either provider, and none was charged by both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text

from devservices import (
    DevServiceError,
    ThrowawayPostgres,
    ThrowawayRedis,
    ensure_database,
    postgres_or_throwaway,
    redis_or_throwaway,
)
from payq.db import make_engine
from payq.gate import BreakerState, FleetBreaker
from payq.migrate import migrate
from payq.models import charge_attempts, charges
from payq.ops.chaos.measure import cross_group_charges
from payq.ops.system import LocalSystem, start_local_system
from payq.redis_client import redis_client
from payq.routing import Routes
from payq.settings import Settings, get_settings, load_settings

__all__ = ["run_demo"]

FAULTS = [
    "--latency-ms", "25", "--latency-jitter-ms", "50",
    "--error-rate", "0.10", "--decline-rate", "0.05",
    "--rate-limit-rate", "0.03", "--retry-after-s", "1",
    "--timeout-rate", "0.02", "--timeout-delay-s", "7",
    "--reset-rate", "0.02", "--seed", "2026",
]  # fmt: skip
OUTAGE_S = 8
FINAL = ("succeeded", "failed", "dead")
#: The two providers: separate books (ledger groups), the backup second in priority.
ENDPOINTS = ("primary", "backup")


def _endpoints(urls: list[str]) -> list[dict[str, Any]]:
    return [{"name": name, "url": url} for name, url in zip(ENDPOINTS, urls, strict=True)]


@dataclass
class _Env:
    settings: Settings
    child_env: dict[str, str]
    services: list[ThrowawayRedis | ThrowawayPostgres]


def _say(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def _services(settings: Settings, workdir: Path) -> Iterator[_Env]:
    """The configured Redis and PostgreSQL, or throwaway ones when those do not answer."""
    started: list[ThrowawayRedis | ThrowawayPostgres] = []
    overrides: dict[str, str] = {}
    try:
        if redis_server := redis_or_throwaway(settings.redis_url):
            started.append(redis_server)
            overrides["REDIS_URL"] = redis_server.url
            _say(
                f"· Redis does not answer at REDIS_URL: using a throwaway one ({redis_server.url})"
            )
        if pg := postgres_or_throwaway(settings.database_url):
            started.append(pg)
            overrides["DATABASE_URL"] = pg.dsn("payq")
            _say(
                f"· PostgreSQL does not answer at DATABASE_URL: using a throwaway on port {pg.port}"
            )
        if overrides:  # this process enqueues too: point its settings at the throwaways
            os.environ.update(overrides)
            get_settings.cache_clear()
        yield _Env(get_settings(), overrides, started)
    finally:
        for service in reversed(started):
            service.stop()


def run_demo(charges_total: int = 500, workdir: Path | None = None) -> int:
    settings = get_settings()
    workdir = workdir or Path(".demo")
    workdir.mkdir(exist_ok=True)
    run = uuid.uuid4().hex[:8]
    _say(
        f"payq demo {run}: {charges_total} charges, 2 worker processes, two providers with "
        "faults (primary, and backup behind it)"
    )
    try:
        with _services(settings, workdir) as env:
            return _run(env, charges_total, workdir, run)
    except DevServiceError as exc:
        _say(f"payq demo: {exc}")
        return 3


def _run(env: _Env, total: int, workdir: Path, run: str) -> int:
    settings = env.settings
    ensure_database(settings.database_url)
    engine = make_engine(settings, "demo")
    migrate(engine)
    _say("· database ready and migrated")

    demo_env = {
        **env.child_env,
        "RETRY_BACKOFF_MIN_S": "0.5",
        "RETRY_BACKOFF_MAX_S": "5",
        "RELAY_STALE_AFTER_S": "5",
        "BREAKER_OPEN_S": "4",
    }
    with start_local_system(
        workdir,
        sim_args=FAULTS,
        processes=2,
        threads=4,
        env=demo_env,
        providers=len(ENDPOINTS),
        endpoints=_endpoints,
    ) as system:
        for name, url in zip(ENDPOINTS, system.sim_urls, strict=True):
            _say(f"· provider {name} on {url} (errors, declines, 429s, timeouts, resets)")
        _say(f"· 2 worker processes x 4 threads and the relay are up; logs in {workdir}/")
        started = time.monotonic()
        _enqueue(settings, total, run)
        _say(f"· enqueued {total} charges in {time.monotonic() - started:.1f} s")
        client = redis_client(settings)
        routed = load_settings(payment_endpoints=system.env["PAYMENT_ENDPOINTS"], breaker_open_s=4)
        breakers = {r.name: r.gate.breaker for r in Routes.build(routed, client).all}
        finished = _watch(engine, run, total, system, started, breakers)
        client.close()
        elapsed = time.monotonic() - started
        system.stop_workers()
        stats = [system.stats(i) for i in range(len(ENDPOINTS))]
        books = [system.books(i) for i in range(len(ENDPOINTS))]
    ok = _summary(engine, run, total, stats, books, elapsed, finished)
    engine.dispose()
    return 0 if ok else 1


def _enqueue(settings: Settings, total: int, run: str) -> None:
    from producers import enqueue_charges

    batch = []
    for i in range(total):
        source = "tok_chargeDeclined" if i % 50 == 7 else "tok_visa"
        if i % 100 == 42:
            source = "tok_invalidRevoked"  # the provider refuses it: dead at once
        batch.append(
            {
                "amount": 500 + (i * 37) % 20_000,
                "currency": "usd" if i % 4 else "eur",
                "source": source,
                "idempotency_key": f"demo-{run}-{i}",
                "description": f"demo order {i}",
                "metadata": {"demo_run": run},
            }
        )
        if len(batch) == 50:
            enqueue_charges(batch)
            batch = []
    if batch:
        enqueue_charges(batch)


def _counts(engine: Engine, run: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(charges.c.status, func.count())
            .where(charges.c.metadata["demo_run"].astext == run)
            .group_by(charges.c.status)
        )
        return {status: n for status, n in rows}


def _watch(
    engine: Engine,
    run: str,
    total: int,
    system: LocalSystem,
    started: float,
    breakers: dict[str, FleetBreaker],
) -> bool:
    outage_done = False
    deadline = started + 240
    states = dict.fromkeys(breakers, BreakerState.CLOSED)
    while time.monotonic() < deadline:
        system.check()
        counts = _counts(engine, run)
        done = sum(counts.get(s, 0) for s in FINAL)
        if not outage_done and done >= total // 4:
            system.faults(outage_s=OUTAGE_S)
            _say(
                f"· provider primary down for {OUTAGE_S} s: every call to it fails; new "
                "charges fail over to backup, charges primary may have charged wait for it"
            )
            outage_done = True
        for name, breaker in breakers.items():
            snap = breaker.snapshot()
            if snap.state is not states[name]:
                states[name] = snap.state
                _say(f"· {name}'s circuit breaker {snap.state.value.replace('_', '-')}: "
                     f"{snap.reason}" + (
                    "; its charges go to the next endpoint, or wait (no attempt used)"
                    if snap.state is BreakerState.OPEN else ""
                ))  # fmt: skip
        line = " · ".join(
            f"{s} {counts.get(s, 0)}"
            for s in ("pending", "processing", "retrying", "succeeded", "failed", "dead")
        )
        providers = " · ".join(
            f"{name} {system.stats(i).get('requests', '?')} requests"
            for i, name in enumerate(breakers)
        )
        _say(f"  [{time.monotonic() - started:5.1f}s] {done}/{total} final | {line} | {providers}")
        if done >= total:
            return True
        time.sleep(1)
    return False


def _summary(
    engine: Engine,
    run: str,
    total: int,
    stats: list[dict[str, Any]],
    books: list[list[dict[str, Any]]],
    elapsed: float,
    finished: bool,
) -> bool:
    counts = _counts(engine, run)
    mine = charges.c.metadata["demo_run"].astext == run
    with engine.connect() as conn:
        attempts = conn.execute(
            select(func.count())
            .select_from(charge_attempts.join(charges))
            .where(mine, charge_attempts.c.kind == "charge")
        ).scalar_one()
        by_error = conn.execute(
            select(charge_attempts.c.error_class, func.count())
            .select_from(charge_attempts.join(charges))
            .where(mine, charge_attempts.c.error_class.is_not(None))
            .group_by(charge_attempts.c.error_class)
            .order_by(func.count().desc())
        ).all()
        # By the reason's first clause (what the lookup by key added comes after a ';'),
        # and what the provider is known to have done.
        reason = func.split_part(charges.c.dead_reason, ";", 1)
        dead = conn.execute(
            select(reason, charges.c.dead_outcome, func.count())
            .where(mine, charges.c.status == "dead")
            .group_by(reason, charges.c.dead_outcome)
            .order_by(func.count().desc())
            .limit(3)
        ).all()
        p50, p99 = conn.execute(
            text(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a.latency_ms), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY a.latency_ms) "
                "FROM charge_attempts a JOIN charges c ON c.id = a.charge_id "
                "WHERE c.metadata->>'demo_run' = :run"
            ),
            {"run": run},
        ).one()
        routed = _routed(conn, run)
    final = sum(counts.get(s, 0) for s in FINAL)
    duplicates = sum(int(st.get("duplicate_charges", 1)) for st in stats)
    both = cross_group_charges(books)  # the providers are this run's own
    _say("")
    _say("summary")
    _say(f"  charges          {total}: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in FINAL))
    _say(f"  attempts         {attempts} ({attempts - total} retries)")
    if by_error:
        _say("  errors by class  " + ", ".join(f"{e} {n}" for e, n in by_error))
    for reason, outcome, n in dead:
        known = f" [{str(outcome).replace('_', ' ')}]" if outcome else ""
        _say(f"  dead ({n})         {(reason or '')[:100]}{known}")
    _say(f"  provider latency p50 {p50 or 0:.0f} ms, p99 {p99 or 0:.0f} ms")
    _say(f"  throughput       {final / elapsed:.1f} charges/s ({final} final in {elapsed:.1f} s)")
    for name, st in zip(ENDPOINTS, stats, strict=True):
        requests, charged = routed["endpoints"].get(name, (0, 0))
        _say(
            f"  endpoint {name:<8}{requests} charge requests, {charged} charged there | its "
            f"books: {st.get('requests', '?')} requests (lookups too), {st.get('charges', '?')} "
            f"charges, {st.get('replays', '?')} replays, duplicate_charges "
            f"{st.get('duplicate_charges', '?')}"
        )
    _say(
        f"  failover         {routed['moved']} charges moved from primary to backup after "
        "proof primary had not charged them (a refusal, a 429, or a lookup finding nothing)"
    )
    _say(f"  duplicate_charges {duplicates} (both providers' books); charged in two groups {both}")
    ok = finished and final == total and duplicates == 0 and both == 0
    _say(
        "  result           "
        + ("OK: every charge final, none charged twice, none in two groups" if ok else "FAILED")
    )
    return ok


def _routed(conn: Connection, run: str) -> dict[str, Any]:
    """Requests and charges per endpoint, and charges whose requests went to two groups."""
    endpoints: dict[str, tuple[int, int]] = {}
    for name, requests, charged in conn.execute(
        text(
            "SELECT a.endpoint, count(*), count(DISTINCT c.id) FILTER (WHERE "
            "c.status = 'succeeded' AND c.charged_endpoint = a.endpoint) "
            "FROM charge_attempts a JOIN charges c ON c.id = a.charge_id "
            "WHERE c.metadata->>'demo_run' = :run AND a.kind = 'charge' GROUP BY a.endpoint"
        ),
        {"run": run},
    ):
        endpoints[name] = (requests, charged)
    moved = conn.execute(
        text(
            "SELECT count(*) FROM (SELECT a.charge_id FROM charge_attempts a JOIN charges c "
            "ON c.id = a.charge_id WHERE c.metadata->>'demo_run' = :run AND a.kind = 'charge' "
            "GROUP BY a.charge_id HAVING count(DISTINCT a.ledger_group) > 1) moved"
        ),
        {"run": run},
    ).scalar_one()
    return {"endpoints": endpoints, "moved": moved}


if __name__ == "__main__":
    sys.exit(run_demo())
