"""``payq simulate database_pool_exhaustion``: the incident's pool error, and why payq avoids it.

First the incident's own error, reproduced in this process: a pool of 2 with both
connections out, so the third checkout times out. Then a worker with as many
threads as its pool, a slow provider, and samples of ``pg_stat_activity``:
connections stay within the pool and are not held during provider calls. Last, a
worker with more threads than its pool is refused at start.

``pg_stat_activity`` shows a connection's state (running a statement, inside a
transaction, idle), not whether the pool has lent it out; the drill reports
exactly what it sees.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout

from payq.db import make_engine
from payq.ops.drills.orchestration import (
    Drill,
    Rig,
    attempts_of,
    budget_s,
    enqueue,
    ledger,
    provider_line,
    start_rig,
    threads_for,
    wait_final,
)

__all__ = ["POOL_DRILL_LATENCY_MS", "drill_database_pool_exhaustion"]

#: Provider latency in the pool drill: every call is slow, so calls overlap.
POOL_DRILL_LATENCY_MS = 1000


def _incident_pool_error(drill: Drill) -> tuple[float | None, str]:
    """A pool of 2 with both connections out; a third checkout. (ms waited, error)."""
    small = drill.settings.model_copy(update={"database_pool_max_connections": 2})
    engine = make_engine(small, "drill-pool")
    held = []
    try:
        for _ in range(2):
            conn = engine.connect()
            held.append(conn)
            conn.execute(text("SELECT 1"))
        started = time.monotonic()
        try:
            engine.connect().close()
        except PoolTimeout as exc:
            waited_ms = (time.monotonic() - started) * 1000
            return waited_ms, str(exc).split(" (Background on this error")[0]
        return None, "the third checkout got a connection"
    finally:
        for conn in held:
            conn.close()
        engine.dispose()


def _process_group(pgid: int) -> set[int]:
    """Pids whose process group is ``pgid`` (Linux /proc), e.g. a worker group's children."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.add(int(entry))
    return pids


@dataclass(frozen=True)
class _Sample:
    at: float  # time.monotonic()
    open: int  # worker connections to this database
    busy: int  # of those, running a statement or inside a transaction
    in_flight: int  # provider calls in flight at the simulator


def _sample(drill: Drill, rig: Rig) -> _Sample:
    group = rig.worker.proc.pid if rig.worker.proc is not None else None
    names = (
        {f"payq-worker-{pid}" for pid in _process_group(group)}
        if group is not None and os.path.isdir("/proc")
        else None
    )
    with drill.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT application_name, state FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'payq-worker-%'"
            )
        ).all()
    mine = [state for app, state in rows if names is None or app in names]
    busy = sum(1 for state in mine if state in ("active", "idle in transaction"))
    return _Sample(time.monotonic(), len(mine), busy, int(rig.stats().get("in_flight", 0)))


def _refused_worker(env: Mapping[str, str], threads: int) -> tuple[int | None, str]:
    """Run ``payq worker --threads <threads>``: its exit code and its error output."""
    argv = ["worker", "--processes", "1", "--threads", str(threads)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "payq_cli", *argv],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"payq worker --threads {threads} was still running after 30 s"
    return proc.returncode, err.strip()


def drill_database_pool_exhaustion(drill: Drill) -> None:
    """Run the drill, then tell what happened; its problems go to ``drill.problems``."""
    s = drill.settings
    pool = threads_for(s, 10)
    drill.story.say(
        f"payq simulate database_pool_exhaustion (run {drill.run}): the incident's pool error, "
        f"then {drill.total} charges through a worker with as many threads as its pool"
    )
    waited_ms, error = _incident_pool_error(drill)
    drill.require(waited_ms is not None, "the small pool did not time out")
    drill.story.step(
        "What the incident saw, reproduced in this process: a pool of 2 connections "
        f"(max_overflow 0, pool_timeout = DB_TIMEOUT_MS {s.db_timeout_ms} ms) with both "
        f"checked out; a third checkout waited {waited_ms or 0:.0f} ms and failed: {error}"
    )

    env = {"DATABASE_POOL_MAX_CONNECTIONS": str(pool)}
    sim_args = ["--latency-ms", str(POOL_DRILL_LATENCY_MS)]
    samples: list[_Sample] = []
    with start_rig(drill, threads=pool, sim_args=sim_args, env=env) as rig:
        keys = enqueue(drill)
        drill.story.progress(f"enqueued {len(keys)} charges; sampling pg_stat_activity")
        budget = budget_s(drill, pool, POOL_DRILL_LATENCY_MS / 1000)
        wait_final(drill, rig, budget, lambda: samples.append(_sample(drill, rig)))
        rig.stop_workers()
        stats = rig.stats()
        ledger(drill, rig, stats)
        child_env = rig.env
    log = rig.logs["worker"].read_text(errors="replace")
    pool_timeouts = log.count("QueuePool limit")
    attempts = len(attempts_of(drill))
    code, refusal = _refused_worker(child_env, pool + 1)

    calls = [x for x in samples if x.in_flight > 0]
    overlapping = [x for x in samples if x.in_flight >= 2]
    held = sum(1 for x in overlapping if x.busy >= x.in_flight)
    max_open = max((x.open for x in samples), default=0)
    busy_max = max((x.busy for x in calls), default=0)
    busy_mean = statistics.fmean([x.busy for x in calls]) if calls else 0.0
    max_in_flight = max((x.in_flight for x in samples), default=0)
    spread_s = samples[-1].at - samples[0].at if len(samples) > 1 else 0.0
    interval_ms = spread_s * 1000 / (len(samples) - 1) if len(samples) > 1 else 0.0
    drill.figures.update(
        small_pool_wait_ms=round(waited_ms or 0, 1),
        small_pool_error=error,
        pool=pool,
        threads=pool,
        samples=len(samples),
        sample_interval_ms=round(interval_ms),
        max_worker_connections=max_open,
        connection_bound=pool,
        call_samples=len(calls),
        max_calls_in_flight=max_in_flight,
        provider_max_in_flight=int(stats.get("max_in_flight", -1)),
        busy_max_during_calls=busy_max,
        busy_mean_during_calls=round(busy_mean, 3),
        overlap_samples=len(overlapping),
        held_samples=held,
        worker_pool_timeouts=pool_timeouts,
        attempts=attempts,
        refusal_exit=-1 if code is None else code,
        refusal=refusal,
    )
    drill.require(max_open <= pool, f"{max_open} worker connections seen, over the pool {pool}")
    drill.require(pool_timeouts == 0, f"{pool_timeouts} pool timeouts in the worker log")
    drill.require(len(calls) > 0, "no sample caught a provider call in flight")
    drill.require(
        held * 2 <= len(overlapping),
        f"in {held} of {len(overlapping)} samples as many connections were busy as calls in "
        "flight: connections look held during provider calls",
    )
    drill.require(
        code == 2 and len(refusal.splitlines()) == 1,
        f"payq worker --threads {pool + 1} was not refused with one line and exit 2 "
        f"(exit {code}): {refusal[:300]}",
    )

    step = drill.story.step
    step(
        "Why payq does not run dry: a worker thread uses at most one connection at a time, and "
        f"threads may not outnumber the pool. Here 1 worker process x {pool} threads with "
        f"DATABASE_POOL_MAX_CONNECTIONS={pool} (threads == pool), a provider answering after "
        f"{POOL_DRILL_LATENCY_MS} ms, {drill.total} charges; pg_stat_activity sampled "
        f"{len(samples)} times over {spread_s:.1f} s (every {interval_ms:.0f} ms): at most "
        f"{max_open} worker connections open (bound: 1 process x {pool} = {pool})."
    )
    verdict = (
        "the rest sat idle between statements: no connection is held during a provider call"
        if held * 2 <= len(overlapping)
        else "connections WERE busy through provider calls"
    )
    step(
        f"While provider calls were in flight ({len(calls)} samples, up to {max_in_flight} calls "
        f"at once), worker connections running a statement or inside a transaction: at most "
        f"{busy_max}, {busy_mean:.2f} on average; with 2 or more calls in flight, {held} of "
        f"{len(overlapping)} samples had as many busy connections as calls; {verdict}."
    )
    step(
        f"{pool_timeouts} pool timeouts in the worker log; {attempts} attempts for "
        f"{drill.total} charges."
    )
    step(
        f"`payq worker --threads {pool + 1}` is refused at start (exit {code}): "
        f"{refusal.splitlines()[0] if refusal else '(no output)'}"
    )
    step(provider_line(drill))
