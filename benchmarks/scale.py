"""``make scale``: a fleet of worker "hosts" on one machine, through PgBouncer, measured.

Each host is a ``payq worker`` process group of its own with its own host identity
(``PAYQ_HOST``), as on separate machines: ``PROCESSES_PER_HOST`` processes of
``THREADS`` threads. All of them share one Redis (private to the run, so its counters are
the fleet's alone), one PostgreSQL database behind a real PgBouncer in transaction mode
(``PGBOUNCER_POOL`` server connections), and one provider simulator answering in
300-500 ms, with ``PAYMENT_MAX_CONCURRENCY`` 64.

For 1, 2, 4 and 8 hosts it measures, over a window after a warm-up:

* charges/s against the bound min(threads, limit) / mean latency;
* PostgreSQL server connections (sampled from ``pg_stat_activity``) against what the
  hosts' pools would open without the pooler, and PgBouncer's clients;
* Redis commands per charge, and per second per idle process (before any charge);
* CPU per charge of the workers, PostgreSQL's backends, Redis and PgBouncer.

It prints a table and writes it, with how it was obtained, to ``benchmarks/scale.md``.
A benchmark, not a test: nothing fails on a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped, unused-ignore]
import redis

from benchmarks import harness
from benchmarks.harness import Child, Simulator, cpu_by_pid, cpu_delta_s, redis_cpu_s, wait_until

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "scale.md"
DATABASE = "payq_scale"
NAMESPACE = "payq_scale"
HOSTS = (1, 2, 4, 8)
PROCESSES_PER_HOST = 2
THREADS = 6
LIMIT = 64  # PAYMENT_MAX_CONCURRENCY
PGBOUNCER_POOL = 20  # PgBouncer's server connections to the database
DB_POOL = THREADS  # each worker process's own pool (to PgBouncer)
LATENCY_MS, JITTER_MS = 300.0, 200.0  # the simulator answers in 300-500 ms
READY_TIMEOUT_S = 90.0
FILL_BATCH = 500


@dataclass(frozen=True)
class Point:
    hosts: int
    via: str  # "PgBouncer", or "direct" for the baseline
    processes: int
    threads: int
    bound_per_s: float
    rate_per_s: float
    server_connections: int  # max sampled, PostgreSQL backends of the benchmark database
    pools_without_pooler: int  # what the hosts' pools (+1 each for health checks) would open
    pooler_clients: int  # max sampled client connections at PgBouncer
    server_in_use: float  # mean of PgBouncer's server connections in use (sv_active)
    redis_per_charge: float
    redis_idle_per_process_s: float
    worker_ms: float
    postgres_ms: float
    redis_ms: float
    pgbouncer_ms: float
    charges: int
    window_s: float
    duplicates: int


@dataclass
class Run:
    points: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    elapsed_s: float = 0.0


# --- services -------------------------------------------------------------------------


@dataclass
class Services:
    redis_url: str
    server_dsn: str  # PostgreSQL itself (migrations, sampling)
    pooled_dsn: str  # through PgBouncer (the fleet)
    redis_server: Any
    pgbouncer: Any
    postgres_pids: Any  # () -> the PostgreSQL server's processes
    notes: list[str]


@contextlib.contextmanager
def services(database_url: str | None) -> Iterator[Services]:
    """A private Redis, a database of the run's own, PgBouncer in front of it."""
    from sqlalchemy.engine import make_url

    from devservices import ThrowawayPostgres, ThrowawayRedis, ensure_database, postgres_answers
    from devservices.pgbouncer import ThrowawayPgBouncer
    from payq.settings import get_settings

    stack = contextlib.ExitStack()
    with stack:
        notes: list[str] = []
        rds = stack.enter_context(ThrowawayRedis())
        notes.append("Redis: a private redis-server for the run (its counters are the fleet's)")
        base = make_url(database_url or get_settings().database_url)
        dsn = base.set(database=DATABASE).render_as_string(hide_password=False)
        if postgres_answers(dsn):
            notes.append(f"PostgreSQL: the configured server, database {DATABASE}")
        else:
            pg = stack.enter_context(ThrowawayPostgres())
            dsn = pg.dsn(DATABASE)
            notes.append("PostgreSQL: the configured one did not answer; a throwaway (fsync off)")
        ensure_database(dsn)
        bouncer = stack.enter_context(ThrowawayPgBouncer(dsn, pool_size=PGBOUNCER_POOL))
        version = bouncer.show("VERSION")[0]
        notes.append(
            f"{next(iter(version.values()))}: transaction mode, at most {PGBOUNCER_POOL} "
            "server connections to the database"
        )
        pooled = bouncer.url(DATABASE)
        yield Services(rds.url, dsn, pooled, rds, bouncer, _postgres_processes(dsn), notes)


#: The benchmark's own connections to PostgreSQL (not counted as the fleet's).
PROBE = "payq-scale-probe"


def _probe_engine(dsn: str) -> Any:
    from sqlalchemy import create_engine

    return create_engine(dsn, pool_size=1, max_overflow=0, connect_args={"application_name": PROBE})


def _postgres_processes(dsn: str) -> Any:
    from sqlalchemy import text

    engine = _probe_engine(dsn)

    def backends() -> list[psutil.Process]:
        with engine.connect() as conn:
            pids = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name <> :probe"
                ),
                {"probe": PROBE},
            ).scalars()
            found = []
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.append(psutil.Process(int(pid)))
            return found

    return backends


# --- one point ------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Server connections and PgBouncer's clients, every 0.25 s, their maxima.

    ``direct``: only the connections opened since the sampler was made (the fleet's own;
    not those PgBouncer keeps open from the points before)."""

    def __init__(self, dsn: str, bouncer: Any, *, direct: bool = False) -> None:
        super().__init__(daemon=True)
        self.engine = _probe_engine(dsn)
        self.since: Any = None
        if direct:
            from sqlalchemy import text

            with self.engine.connect() as conn:
                self.since = conn.execute(text("SELECT now()")).scalar_one()
        self.bouncer = bouncer
        self.stop = threading.Event()
        self.max_server = 0
        self.max_clients = 0
        self.active: list[int] = []  # PgBouncer's server connections in use, each sample

    def run(self) -> None:
        from sqlalchemy import text

        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name <> :probe "
            "AND (CAST(:since AS timestamptz) IS NULL OR backend_start >= :since)"
        )
        while not self.stop.wait(0.25):
            with contextlib.suppress(Exception):
                with self.engine.connect() as conn:
                    found = conn.execute(query, {"probe": PROBE, "since": self.since})
                    count = int(found.scalar_one())
                    self.max_server = max(self.max_server, count)
                pools = [r for r in self.bouncer.show("POOLS") if r["database"] == DATABASE]
                clients = sum(int(r["cl_active"]) + int(r["cl_waiting"]) for r in pools)
                self.max_clients = max(self.max_clients, clients)
                self.active.append(sum(int(r["sv_active"]) for r in pools))


def _redis_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def _start_hosts(hosts: int, env: dict[str, str], logdir: Path) -> list[Child]:
    children = []
    for n in range(hosts):
        host_env = {**env, "PAYQ_HOST": f"scale-host-{n + 1:02d}"}
        argv = [sys.executable, "-m", "payq_cli", "worker"]
        argv += ["--processes", str(PROCESSES_PER_HOST), "--threads", str(THREADS)]
        log = logdir / f"host-{n + 1:02d}.log"
        children.append(Child(f"host {n + 1}", argv, host_env, log).start())
    return children


def _ready(client: redis.Redis, processes: int) -> bool:
    reports = client.scan_iter(match=f"{NAMESPACE}:payq:workers:*", count=200)
    return sum(1 for _ in reports) >= processes


def _fill(count: int, tag: str) -> None:
    from producers import enqueue_charges

    for start in range(0, count, FILL_BATCH):
        enqueue_charges(
            [
                {
                    "amount": 1999,
                    "currency": "usd",
                    "source": "tok_visa",
                    "idempotency_key": f"{tag}-{i}",
                }
                for i in range(start, min(count, start + FILL_BATCH))
            ]
        )


def _purge(client: redis.Redis) -> None:
    from sqlalchemy import text

    from payq.db import transaction
    from payq.routing import get_gate

    for key in client.scan_iter(match=f"{NAMESPACE}:*", count=1000):
        client.delete(key)
    with transaction() as conn:
        conn.execute(text("TRUNCATE charge_attempts, operator_actions, charges"))
    get_gate().fleet.mark_settled()


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    window_s: float
    idle_s: float


def measure_point(
    hosts: int,
    plan: Plan,
    svc: Services,
    sim: Simulator,
    env: dict[str, str],
    logdir: Path,
    say: Any,
    *,
    direct: bool = False,
) -> Point:
    """One fleet of ``hosts``, through PgBouncer, or straight to PostgreSQL (``direct``:
    the baseline, prepared statements and all)."""
    if direct:
        env = {**env, "DATABASE_URL": svc.server_dsn, "DATABASE_POOLER": "none"}
    client = redis.Redis.from_url(svc.redis_url)
    processes = hosts * PROCESSES_PER_HOST
    threads = processes * THREADS
    bound = min(threads, LIMIT) * 1000 / (LATENCY_MS + JITTER_MS / 2)
    _purge(client)
    sim.reset()
    children = _start_hosts(hosts, env, logdir)
    sampler = Sampler(svc.server_dsn, svc.pgbouncer, direct=direct)
    try:
        wait_until(
            lambda: _ready(client, processes), READY_TIMEOUT_S, f"{processes} workers", children
        )
        time.sleep(2.0)  # past boot-time registration
        idle_before = _redis_calls(client)
        time.sleep(plan.idle_s)
        idle = (_redis_calls(client) - idle_before) / plan.idle_s / processes
        count = math.ceil(bound * (plan.warmup_s + plan.window_s) * 1.5) + 200
        _fill(count, f"scale-{hosts}h-{uuid.uuid4().hex[:8]}")
        sampler.start()
        time.sleep(plan.warmup_s)
        before = _snapshot(client, sim, children, svc)
        time.sleep(plan.window_s)
        after = _snapshot(client, sim, children, svc)
        for child in children:
            child.check()
    finally:
        sampler.stop.set()
        for child in children:
            child.stop()
        client.close()
    charges = after["charges"] - before["charges"]
    seconds = after["at"] - before["at"]

    def per_charge(name: str) -> float:
        if isinstance(after[name], dict):
            delta = cpu_delta_s(before[name], after[name])
        else:
            delta = after[name] - before[name]
        return delta * 1000 / charges if charges else math.nan

    point = Point(
        hosts=hosts,
        via="direct" if direct else "PgBouncer",
        processes=processes,
        threads=threads,
        bound_per_s=bound,
        rate_per_s=charges / seconds,
        server_connections=sampler.max_server,
        pools_without_pooler=processes * (DB_POOL + 1),
        pooler_clients=sampler.max_clients,
        server_in_use=statistics.fmean(sampler.active) if sampler.active else math.nan,
        redis_per_charge=(after["redis_calls"] - before["redis_calls"]) / charges
        if charges
        else math.nan,
        redis_idle_per_process_s=idle,
        worker_ms=per_charge("workers"),
        postgres_ms=per_charge("postgres"),
        redis_ms=per_charge("redis_s"),
        pgbouncer_ms=per_charge("pgbouncer"),
        charges=charges,
        window_s=seconds,
        duplicates=int(sim.stats()["duplicate_charges"]),
    )
    say(
        f"{hosts} host(s) {point.via}: {point.rate_per_s:.1f} charges/s of {bound:.0f}/s, "
        f"server connections {point.server_connections} (pools {point.pools_without_pooler})"
    )
    return point


def _snapshot(
    client: redis.Redis, sim: Simulator, children: list[Child], svc: Services
) -> dict[str, Any]:
    return {
        "at": time.monotonic(),
        "charges": int(sim.stats()["charge_requests"]),
        "redis_calls": _redis_calls(client),
        "workers": cpu_by_pid(p for child in children for p in child.tree()),
        "postgres": cpu_by_pid(svc.postgres_pids()),
        "redis_s": redis_cpu_s(client),
        "pgbouncer": cpu_by_pid(
            [psutil.Process(svc.pgbouncer.pid)] if svc.pgbouncer.pid is not None else []
        ),
    }


# --- the run --------------------------------------------------------------------------


def _environment(svc: Services, sim_url: str, api_key: str) -> dict[str, str]:
    """Every process's settings (this one's too)."""
    from payq.settings import get_settings

    os.environ.update(
        {
            "REDIS_URL": svc.redis_url,
            "DATABASE_URL": svc.pooled_dsn,
            "DATABASE_DIRECT_URL": svc.server_dsn,
            "DATABASE_POOLER": "transaction",
            "PAYQ_NAMESPACE": NAMESPACE,
            "PAYMENT_PROVIDER_URL": sim_url,
            "PAYMENT_PROVIDER_API_KEY": api_key,
            "PAYMENT_MAX_CONCURRENCY": str(LIMIT),
            "PAYMENT_POOL_MAX_CONNECTIONS": str(THREADS),
            "DATABASE_POOL_MAX_CONNECTIONS": str(DB_POOL),
            "METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "console",
        }
    )
    os.environ.pop("SENTRY_DSN", None)
    get_settings.cache_clear()
    return dict(os.environ)


def _migrate(dsn: str) -> None:
    """The schema, straight on PostgreSQL (as ``payq migrate`` through a direct URL)."""
    from sqlalchemy import create_engine

    from payq.migrate import migrate

    engine = create_engine(dsn, pool_size=1, max_overflow=0)
    try:
        migrate(engine)
    finally:
        engine.dispose()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument(
        "--hosts", default=",".join(map(str, HOSTS)), help="host counts, e.g. 1,2,4,8"
    )
    parser.add_argument("--window-s", type=float, default=30.0, help="measured window per point")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="warm-up before a window")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle window per point")
    parser.add_argument(
        "--baseline-hosts",
        type=int,
        default=4,
        help="the baseline: this many hosts straight to PostgreSQL (0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="1 and 2 hosts, short windows")
    parser.add_argument("--database-url", help="PostgreSQL server (default: DATABASE_URL)")
    parser.add_argument(
        "--output", type=Path, help=f"results file (default {RESULTS}; none if quick)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    hosts = (1, 2) if args.quick else tuple(int(h) for h in args.hosts.split(","))
    if args.quick:
        args.baseline_hosts = 1
    plan = Plan(4, 6, 3) if args.quick else Plan(args.warmup_s, args.window_s, args.idle_s)
    output = args.output or (None if args.quick else RESULTS)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {line}", flush=True)

    logdir = Path(tempfile.mkdtemp(prefix="payq-scale-"))
    say(f"payq scale: hosts {hosts}, {plan.window_s:g} s windows; logs in {logdir}")
    run = Run(machine=harness.machine())
    with services(args.database_url) as svc:
        from devservices import free_port

        port = free_port()
        env = _environment(svc, f"http://127.0.0.1:{port}", "sk_scale_" + uuid.uuid4().hex)
        _migrate(svc.server_dsn)
        run.machine.update(harness.service_versions(svc.redis_url))
        sim = Simulator.start(port, env, logdir / "provider-sim.log")
        try:
            httpx.post(
                f"{sim.url}/_faults",
                json={"latency_ms": LATENCY_MS, "latency_jitter_ms": JITTER_MS},
                timeout=5,
            ).raise_for_status()
            for count in hosts:
                run.points.append(measure_point(count, plan, svc, sim, env, logdir, say))
            if args.baseline_hosts:
                point = measure_point(
                    args.baseline_hosts, plan, svc, sim, env, logdir, say, direct=True
                )
                run.points.append(point)
        finally:
            sim.child.stop()
        run.notes = svc.notes
    run.command = "python -m benchmarks.scale " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    run.elapsed_s = time.monotonic() - started
    text = render(run)
    print()
    print(text)
    if output is not None:
        output.write_text(text)
        say(f"written to {output}")
    return 0


# --- the report -----------------------------------------------------------------------

_COLUMNS = (
    ("hosts", "{p.hosts}"),
    ("database via", "{p.via}"),
    ("procs x threads", "{p.processes} x {THREADS}"),
    ("bound/s", "{p.bound_per_s:.0f}"),
    ("charges/s", "{p.rate_per_s:.1f}"),
    ("PG server conns", "{p.server_connections}"),
    ("pools w/o pooler", "{p.pools_without_pooler}"),
    ("PgBouncer clients", "{p.pooler_clients}"),
    ("server conns in use (mean)", "{p.server_in_use:.1f}"),
    ("Redis cmds/charge", "{p.redis_per_charge:.1f}"),
    ("Redis cmds/s idle proc", "{p.redis_idle_per_process_s:.1f}"),
    ("worker ms/charge", "{p.worker_ms:.2f}"),
    ("PG ms/charge", "{p.postgres_ms:.2f}"),
    ("Redis ms/charge", "{p.redis_ms:.3f}"),
    ("PgBouncer ms/charge", "{p.pgbouncer_ms:.3f}"),
    ("duplicates", "{p.duplicates}"),
)


def render(run: Run) -> str:
    head = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in _COLUMNS) + "|"
    rows = [
        "| " + " | ".join(fmt.format(p=p, THREADS=THREADS) for _, fmt in _COLUMNS) + " |"
        for p in run.points
    ]
    rates = [p.rate_per_s / p.bound_per_s for p in run.points if p.bound_per_s]
    lines = [
        "# make scale: a fleet of hosts on one machine, through PgBouncer",
        "",
        f"Command: `{run.command.strip()}` ({run.elapsed_s / 60:.1f} min). Each host is a "
        f"`payq worker --processes {PROCESSES_PER_HOST} --threads {THREADS}` process group "
        f"with its own `PAYQ_HOST`; `PAYMENT_MAX_CONCURRENCY={LIMIT}`; the simulator answers "
        f"in {LATENCY_MS:.0f}-{LATENCY_MS + JITTER_MS:.0f} ms; each process's database pool is "
        f"{DB_POOL} (to PgBouncer), PgBouncer's pool to PostgreSQL {PGBOUNCER_POOL}.",
        "",
        *(f"- {note}" for note in run.notes),
        f"- Machine: {', '.join(f'{k} {v}' for k, v in run.machine.items())}",
        "",
        head,
        rule,
        *rows,
        "",
        "How each figure was taken (one window per point, after a warm-up):",
        "- charges/s: the simulator's charge requests over the window; bound: "
        "min(threads, limit) / mean latency.",
        "- PG server conns: the most backends on the benchmark database seen in "
        "`pg_stat_activity` (every 0.25 s); pools w/o pooler: processes x (pool + 1), what "
        "the same fleet would hold open on PostgreSQL directly; in use: the mean of "
        "PgBouncer's `sv_active` over the samples (server connections running a transaction).",
        "- The row via `direct` is the baseline, in the same run: the same kind of fleet "
        "straight to PostgreSQL (`DATABASE_POOLER=none`: its statements prepared once per "
        "connection), each process with its own pool.",
        "- Redis cmds: `INFO commandstats` calls (commands a Lua script runs count too) over "
        "the window per charge; idle: over the idle window before any charge, per process.",
        "- CPU: psutil user+system of the worker process groups, the database's backends, "
        "PgBouncer; Redis's `INFO cpu`. Per charge = CPU over the window / charges.",
    ]
    if rates:
        lines.append(f"- Charges/s reached {min(rates):.0%}-{max(rates):.0%} of the bound.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
