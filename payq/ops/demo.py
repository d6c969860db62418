"""``payq demo`` (``make demo``): the main job end to end, with progress and a summary.

It sets up what it needs (the database and its schema; throwaway Redis and
PostgreSQL servers if the configured ones do not answer), starts the provider
simulator with faults, two worker processes and the relay, enqueues charges,
shows them move, puts the provider through a short outage, and ends with a
summary. It exits 0 only if every charge ended final and none was charged twice.
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

import redis
from sqlalchemy import Engine, func, select, text

from devservices import (
    DevServiceError,
    ThrowawayPostgres,
    ThrowawayRedis,
    ensure_database,
    postgres_or_throwaway,
    redis_or_throwaway,
)
from payq.db import make_engine
from payq.gate import BreakerState, FleetBreaker, ProviderGate
from payq.migrate import migrate
from payq.models import charge_attempts, charges
from payq.ops.system import LocalSystem, start_local_system
from payq.settings import Settings, get_settings

__all__ = ["run_demo"]

FAULTS = [
    "--latency-ms", "25", "--latency-jitter-ms", "50",
    "--error-rate", "0.10", "--decline-rate", "0.05",
    "--rate-limit-rate", "0.03", "--retry-after-s", "1",
    "--timeout-rate", "0.02", "--timeout-delay-s", "7",
    "--reset-rate", "0.02", "--seed", "2026",
]  # fmt: skip
OUTAGE_S = 4
FINAL = ("succeeded", "failed", "dead")


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
    _say(f"payq demo {run}: {charges_total} charges, 2 worker processes, a provider with faults")
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
    }
    with start_local_system(
        workdir, sim_args=FAULTS, processes=2, threads=4, env=demo_env
    ) as system:
        _say(f"· provider simulator on {system.sim_url} (errors, declines, 429s, timeouts, resets)")
        _say(f"· 2 worker processes x 4 threads and the relay are up; logs in {workdir}/")
        started = time.monotonic()
        _enqueue(settings, total, run)
        _say(f"· enqueued {total} charges in {time.monotonic() - started:.1f} s")
        client = redis.Redis.from_url(settings.redis_url)
        breaker = ProviderGate(client, settings).breaker
        finished = _watch(engine, run, total, system, started, breaker)
        client.close()
        elapsed = time.monotonic() - started
        system.stop_workers()
        stats = system.stats()
    ok = _summary(engine, run, total, stats, elapsed, finished)
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
    breaker: FleetBreaker,
) -> bool:
    outage_done = False
    deadline = started + 240
    breaker_state = BreakerState.CLOSED
    while time.monotonic() < deadline:
        system.check()
        counts = _counts(engine, run)
        done = sum(counts.get(s, 0) for s in FINAL)
        if not outage_done and done >= total // 4:
            system.faults(outage_s=OUTAGE_S)
            _say(f"· provider outage for {OUTAGE_S} s: every call fails; charges wait and retry")
            outage_done = True
        snap = breaker.snapshot()
        if snap.state is not breaker_state:
            breaker_state = snap.state
            _say(f"· circuit breaker {snap.state.value.replace('_', '-')}: {snap.reason}" + (
                "; charges are deferred (no attempt used) until it may half-open"
                if snap.state is BreakerState.OPEN else ""
            ))  # fmt: skip
        stats = system.stats()
        line = " · ".join(
            f"{s} {counts.get(s, 0)}"
            for s in ("pending", "processing", "retrying", "succeeded", "failed", "dead")
        )
        _say(
            f"  [{time.monotonic() - started:5.1f}s] {done}/{total} final | {line} | provider "
            f"{stats.get('requests', '?')} requests, {stats.get('duplicate_charges', '?')} "
            "duplicate charges"
        )
        if done >= total:
            return True
        time.sleep(1)
    return False


def _summary(
    engine: Engine, run: str, total: int, stats: dict[str, Any], elapsed: float, finished: bool
) -> bool:
    counts = _counts(engine, run)
    mine = charges.c.metadata["demo_run"].astext == run
    with engine.connect() as conn:
        attempts = conn.execute(
            select(func.count()).select_from(charge_attempts.join(charges)).where(mine)
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
    final = sum(counts.get(s, 0) for s in FINAL)
    duplicates = stats.get("duplicate_charges")
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
    _say(
        f"  provider         {stats.get('requests', '?')} requests, {stats.get('charges', '?')} "
        f"charges, {stats.get('replays', '?')} idempotent replays, "
        f"duplicate_charges {duplicates}"
    )
    ok = finished and final == total and duplicates == 0
    _say("  result           " + ("OK: every charge final, none charged twice" if ok else "FAILED"))
    return ok


if __name__ == "__main__":
    sys.exit(run_demo())
