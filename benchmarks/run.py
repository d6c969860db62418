"""``make bench``: payq beside a plain Dramatiq actor and a plain Celery task, on one machine.

Sets up its own services (a private Redis; a ``payq_bench`` database on the configured
PostgreSQL, or a throwaway one when it does not answer), one provider simulator, then
measures, with every figure taken over ``--runs`` runs (min / median / max):

* throughput at provider latencies of 20 ms (2 processes x 8 threads) and 200 ms
  (2 x 32: 64 calls at once), for payq and both baselines, with worker CPU per charge;
* payq's throughput with 1, 2 and 4 worker processes (8 threads each, 20 ms);
* enqueue rates: payq one at a time (durable: each is a PostgreSQL commit), payq in
  batches, plain Dramatiq's ``send``;
* enqueue-to-provider-call latency at 10 charges/s (payq, plain Dramatiq);
* Redis calls per second of one idle worker process.

It prints the tables and writes them to ``benchmarks/results.md``. Benchmarks are not
tests: nothing fails on a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from benchmarks import harness, report
from benchmarks.harness import Simulator
from benchmarks.measure import (
    Bench,
    Plan,
    enqueue_rate,
    idle_redis_calls,
    light_load_latencies,
    throughput_run,
)
from benchmarks.systems import PAYQ_NAMESPACE, CelerySystem, DramatiqSystem, PayqSystem, Setup

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results.md"
DATABASE = "payq_bench"
#: (provider latency ms, processes, threads): the side-by-side points.
POINTS = ((20.0, 2, 8), (200.0, 2, 32))
SCALING = ((1, 8), (2, 8), (4, 8))  # payq at 20 ms; 2 x 8 is the first point's
LIGHT = (2, 8, 20.0)  # processes, threads, latency for the light-load latency
ENQUEUE_BATCH = 100


@dataclass
class _Services:
    redis_url: str
    database_url: str
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _services(redis_url: str | None, database_url: str | None) -> Iterator[_Services]:
    """A private Redis (or the one given) and a database of the benchmark's own."""
    from sqlalchemy.engine import make_url

    from devservices import (
        ThrowawayPostgres,
        ThrowawayRedis,
        ensure_database,
        postgres_answers,
        redis_answers,
    )
    from payq.settings import get_settings

    started: list[ThrowawayRedis | ThrowawayPostgres] = []
    notes: list[str] = []
    try:
        if redis_url is None:
            server = ThrowawayRedis()
            server.start()
            started.append(server)
            redis_url = server.url
            notes.append("Redis: a private redis-server started for the run (no persistence)")
        elif not redis_answers(redis_url):
            raise SystemExit(f"bench: Redis does not answer at {redis_url}")
        else:
            notes.append(
                "Redis: the one given (namespaces payq_bench, bench_dramatiq, bench_celery)"
            )
        base = make_url(database_url or get_settings().database_url)
        dsn = base.set(database=DATABASE).render_as_string(hide_password=False)
        if postgres_answers(dsn):
            notes.append(f"PostgreSQL: the configured server, database {DATABASE}")
        else:
            pg = ThrowawayPostgres()
            pg.start()
            started.append(pg)
            dsn = pg.dsn(DATABASE)
            notes.append("PostgreSQL: the configured one did not answer; a throwaway (fsync off)")
        ensure_database(dsn)
        yield _Services(redis_url, dsn, notes)
    finally:
        for service in reversed(started):
            service.stop()


def _environment(services: _Services, sim_url: str, api_key: str) -> dict[str, str]:
    """The settings every process of the run uses (this one too)."""
    from payq.settings import get_settings

    overrides = {
        "REDIS_URL": services.redis_url,
        "DATABASE_URL": services.database_url,
        "PAYQ_NAMESPACE": PAYQ_NAMESPACE,
        "PAYMENT_PROVIDER_URL": sim_url,
        "PAYMENT_PROVIDER_API_KEY": api_key,
        # No fleet limit below processes x threads in any run: measure the machinery.
        "PAYMENT_MAX_CONCURRENCY": "100000",
        "METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "console",
    }
    os.environ.update(overrides)
    os.environ.pop("SENTRY_DSN", None)
    get_settings.cache_clear()
    return dict(os.environ)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--window-s", type=float, default=10.0, help="measured window per run")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="warm-up before a window")
    parser.add_argument("--quick", action="store_true", help="1 run, short windows: a smoke test")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--database-url", help="PostgreSQL server (default: DATABASE_URL)")
    parser.add_argument(
        "--output", type=Path, help=f"where to write the results (default {RESULTS}; none if quick)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    plan = (
        Plan(runs=1, warmup_s=2, window_s=4, enqueue_s=1, light_window_s=4, idle_s=4)
        if args.quick
        else Plan(runs=args.runs, warmup_s=args.warmup_s, window_s=args.window_s)
    )
    output = args.output or (None if args.quick else RESULTS)
    command = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    command = re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", command)  # a password in a URL
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {line}", flush=True)

    logdir = Path(tempfile.mkdtemp(prefix="payq-bench-"))
    say(f"payq bench: {plan.runs} run(s) per figure, {plan.window_s:g} s windows; logs in {logdir}")
    machine = harness.machine()
    with _services(args.redis_url, args.database_url) as services:
        from devservices import free_port

        port = free_port()
        env = _environment(services, f"http://127.0.0.1:{port}", "sk_bench_" + uuid.uuid4().hex)
        _migrate()
        machine.update(harness.service_versions(services.redis_url))
        sim = Simulator.start(port, env, logdir / "provider-sim.log")
        client = redis.Redis.from_url(services.redis_url)
        try:
            bench = Bench(plan, sim, client, services.redis_url, say)
            setup = Setup(client, env, logdir)
            results = _measure(bench, setup)
        finally:
            client.close()
            sim.child.stop()
    results.notes = services.notes
    results.machine = machine
    results.command = command
    results.elapsed_s = time.monotonic() - started
    text = report.render(results)
    print()
    print(text)
    if output is not None:
        output.write_text(text)
        say(f"written to {output}")
    return 0


def _migrate() -> None:
    from payq.db import make_engine
    from payq.migrate import migrate
    from payq.settings import get_settings

    engine = make_engine(get_settings(), "bench")
    try:
        migrate(engine)
    finally:
        engine.dispose()


def _measure(bench: Bench, setup: Setup) -> report.Results:
    payq, dramatiq, celery = PayqSystem(setup), DramatiqSystem(setup), CelerySystem(setup)
    systems = (payq, dramatiq, celery)
    for system in systems:  # nothing left over from an earlier, interrupted run
        system.purge()
    results = report.Results(plan=bench.plan)
    say = bench.say

    say("enqueue rates (no workers running)")
    senders = {
        "payq enqueue_charge, one at a time (durable)": (_one(payq.send), payq.purge),
        f"payq enqueue_charges, batches of {ENQUEUE_BATCH}": (_batch(payq), payq.purge),
        "plain Dramatiq send, one at a time": (_one(dramatiq.send), dramatiq.purge),
    }
    for run in range(bench.plan.runs):
        for name, (send, purge) in senders.items():
            rate = enqueue_rate(bench, send, purge)
            results.enqueue.setdefault(name, []).append(rate)
            say(f"  run {run + 1}: {name}: {rate:,.0f} charges/s")

    for latency_ms, processes, threads in POINTS:
        point = report.Point(latency_ms, processes, threads)
        say(f"throughput at {latency_ms:g} ms, {processes} processes x {threads} threads")
        for run in range(bench.plan.runs):
            for system in systems:
                windows = results.throughput.setdefault(point, {}).setdefault(system.name, [])
                window = throughput_run(bench, system, processes, threads, latency_ms, windows)
                windows.append(window)
                say(f"  run {run + 1}: {system.name}: {report.describe(window)}")

    say("payq throughput by worker processes (8 threads each, 20 ms)")
    for run in range(bench.plan.runs):
        for processes, threads in SCALING:
            point = report.Point(20.0, processes, threads)
            windows = results.throughput.setdefault(point, {}).setdefault(payq.name, [])
            if len(windows) > run:  # measured side by side above
                continue
            window = throughput_run(bench, payq, processes, threads, 20.0, windows)
            windows.append(window)
            say(f"  run {run + 1}: {processes} processes: {report.describe(window)}")

    processes, threads, latency_ms = LIGHT
    say(f"light load: {bench.plan.light_rate_per_s:g} charges/s, {processes} x {threads}")
    for system in (payq, dramatiq):
        runs = light_load_latencies(bench, system, processes, threads, latency_ms)
        results.light[system.name] = runs
        say(f"  {system.name}: {report.describe_latencies(runs)}")

    say("idle worker: Redis calls per second (1 process x 8 threads, empty queue)")
    for system in systems:
        rate, commands = idle_redis_calls(bench, system, 8)
        results.idle[system.name] = (rate, commands)
        say(f"  {system.name}: {rate:.1f} calls/s")
    return results


def _one(send: report.SendOne) -> report.Send:
    def one(tag: str, i: int) -> int:
        send(f"{tag}-k{i}")
        return 1

    return one


def _batch(payq: PayqSystem) -> report.Send:
    def batch(tag: str, i: int) -> int:
        payq.send_batch([f"{tag}-k{i}x{n}" for n in range(ENQUEUE_BATCH)])
        return ENQUEUE_BATCH

    return batch


if __name__ == "__main__":
    sys.exit(main())
