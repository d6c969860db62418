"""The ``payq`` command: thin entry points around the core.

Exit codes, the same for every command: 0 done; 1 done in part, or not as asked (some
charges skipped, a check degraded); 2 bad usage or input (a setting, an argument, a
charge refused, a schema to migrate); 3 a service (PostgreSQL, Redis) did not answer,
or a check found one down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence

from payq.errors import (
    ChargeInputError,
    ChargeNotFound,
    ConfigError,
    IdempotencyConflict,
    ServiceUnavailable,
)
from payq.settings import Settings, get_settings

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def _settings() -> Settings:
    from payq.logs import configure_logging

    settings = get_settings()
    configure_logging(settings)
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    from payq.db import make_engine
    from payq.migrate import ensure_database_when_up, migrate

    settings = _settings()
    # DATABASE_DIRECT_URL, when set, is PostgreSQL itself; without it the migration runs
    # through DATABASE_URL, which works behind a transaction pooler too: it is one
    # transaction, and its lock (pg_advisory_xact_lock) ends with it.
    direct = "DATABASE_DIRECT_URL" if settings.database_direct_url else "DATABASE_URL"
    created = ensure_database_when_up(settings.migration_url, args.wait, setting=direct)
    engine = make_engine(settings, "migrate", url=settings.database_direct_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    print(
        ("created the database and " if created else "")
        + "migrated the schema to the newest revision"
    )
    return 0


def _check_database_capacity(settings: Settings, processes: int, wait_s: float) -> None:
    """Refuse a group whose pools could need more connections than PostgreSQL has left.

    Here rather than in the worker processes: only this command knows how many
    processes the group will have. See ``payq.capacity`` for what it can and cannot see.
    """
    import logging
    import math

    from payq.capacity import check_fleet_fits, read_connection_budget
    from payq.db import startup_options

    timeout_s = max(1, math.ceil(settings.db_timeout_ms / 1000))
    budget = read_connection_budget(
        settings.database_url,
        connect_timeout_s=timeout_s,
        wait_s=wait_s,
        options=startup_options(settings),
    )
    pool = settings.database_pool_max_connections
    if settings.database_pooler == "none":
        line = check_fleet_fits(processes, pool, budget)
    else:
        from payq.capacity import check_pooled_fleet_fits
        from payq.pooler import read_pooler_budget

        pooler = read_pooler_budget(
            settings.database_url,
            server_connections=settings.database_pooler_server_connections,
            connect_timeout_s=timeout_s,
        )
        line = check_pooled_fleet_fits(processes, pool, budget, pooler)
    logging.getLogger("payq.worker").info(line)


def _shutdown_timeout(settings: Settings, dramatiq_args: Sequence[str]) -> list[str]:
    """How long a SIGTERM waits for calls in flight: one attempt's worst case.

    Dramatiq's default is 10 minutes, longer than any orchestrator waits before its
    SIGKILL; and only once the threads are joined does Dramatiq put the prefetched
    messages back. An attempt cannot outlast PAYMENT_TIMEOUT_MS + 2 x (DB_TIMEOUT_MS +
    DB_STATEMENT_TIMEOUT_MS) (the bound CHARGE_LEASE_S must exceed), so the drain waits
    that long and no longer; a thread still busy then is left to its charge's lease.
    """
    if any(arg.startswith("--worker-shutdown-timeout") for arg in dramatiq_args):
        return []  # the operator's own choice
    return ["--worker-shutdown-timeout", str(settings.attempt_worst_case_ms)]


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    settings.require_provider_key("a worker")
    processes = args.processes or settings.worker_processes
    threads = args.threads or settings.worker_threads
    settings.check_worker_pools(threads)
    _check_database_capacity(settings, processes, args.wait)
    if len(settings.endpoints) > 1 or settings.soft_declines:
        import logging

        logging.getLogger("payq.worker").info(
            "provider endpoints, first tried first: %s; soft declines: %s",
            ", ".join(
                f"{e.name} (group {e.group}, priority {e.priority}, weight {e.weight})"
                for e in settings.endpoints
            ),
            ", ".join(sorted(settings.soft_declines)) or "none",
        )
    if settings.metrics_port:
        # Dramatiq's Prometheus middleware serves this group's metrics (its own and
        # payq's) from a fresh multiprocess directory, on METRICS_HOST only.
        # One directory per port, emptied at start (prometheus-client's multiprocess rule).
        metrics_dir = os.path.join(tempfile.gettempdir(), f"payq-metrics-{settings.metrics_port}")
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.makedirs(metrics_dir, mode=0o700)
        os.environ.update(
            dramatiq_prom_host=settings.metrics_host,
            dramatiq_prom_port=str(settings.metrics_port),
            dramatiq_prom_db=metrics_dir,
            PROMETHEUS_MULTIPROC_DIR=metrics_dir,
        )
    # An idle Dramatiq consumer backs off up to its worker timeout (1000 ms by default)
    # between fetches, which is the tail of a quiet system's enqueue-to-call latency.
    os.environ["dramatiq_worker_timeout"] = str(settings.worker_poll_ms)  # noqa: SIM112 - Dramatiq reads this lower-case name
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        *_shutdown_timeout(settings, args.dramatiq_args),
        # Options first: extra modules may then follow the broker module.
        "workers",
        *args.dramatiq_args,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process with dramatiq's CLI


def cmd_relay(args: argparse.Namespace) -> int:
    import redis
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from payq import db
    from payq.sentry import init_sentry
    from producers.relay import relay_once, run_relay

    settings = _settings()
    init_sentry(settings, component="relay")
    db.set_role("relay")
    if args.once:
        try:
            result = relay_once(settings)
        except (redis.RedisError, OperationalError, PoolTimeout) as exc:
            raise ServiceUnavailable(
                f"relay pass failed ({type(exc).__name__}): check that PostgreSQL "
                "(DATABASE_URL) and Redis (REDIS_URL) answer"
            ) from None
        print(
            f"checked {result.checked}, published again {result.republished}, "
            f"expired leases {result.lease_expired}"
        )
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_relay(stop, settings)
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    from producers import enqueue_charge

    _settings()
    metadata = dict(args.metadata or [])
    charge = enqueue_charge(
        amount=args.amount,
        currency=args.currency,
        source=args.source,
        idempotency_key=args.key,
        description=args.description,
        metadata=metadata,
    )
    print(json.dumps({"id": str(charge.id), "status": charge.status.value}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from payq_cli.serve import serve

    serve(_settings(), host=args.host, port=args.port)
    return 0


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}")
    return int(text)


def cmd_provider_sim(args: argparse.Namespace) -> int:
    from provider_sim.server import serve_from_args

    _settings()
    try:
        serve_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # a port in use, an address this host does not have
        raise ConfigError(
            f"--port/--host: cannot listen ({exc.strerror or exc}); pick free ports"
        ) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from payq.ops.demo import run_demo

    return run_demo(charges_total=args.charges)


def cmd_chaos(args: argparse.Namespace) -> int:
    from devservices import DevServiceError
    from payq.ops.chaos import ChaosPlan, run_chaos

    try:
        plan = ChaosPlan(
            charges=args.charges,
            enqueue_s=args.enqueue_s,
            outage_s=args.outage_s,
            kill_every_s=args.kill_every_s,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"payq: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_chaos(plan)
    except DevServiceError as exc:
        print(f"payq chaos: {exc}", file=sys.stderr)
        return 3
    return 0 if result.ok else 1


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE (the value given had no '=')")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payq",
        description="payq: a worker queue for payment charges. Exit codes: 0 done, 1 done in "
        "part, 2 bad usage or input, 3 a service down.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="create the database if needed and apply migrations")
    p.add_argument(
        "--wait", type=float, default=30.0, metavar="S", help="wait this long for PostgreSQL"
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("worker", help="run charge workers (a wrapper on `dramatiq workers`)")
    p.add_argument("--processes", type=int, help="worker processes (default WORKER_PROCESSES)")
    p.add_argument("--threads", type=int, help="threads per process (default WORKER_THREADS)")
    p.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="wait this long for PostgreSQL to answer the start-time connection check",
    )
    p.add_argument(
        "dramatiq_args", nargs=argparse.REMAINDER, help="passed on to dramatiq after `workers`"
    )
    p.set_defaults(func=cmd_worker, dramatiq_args=[])

    p = sub.add_parser("relay", help="publish charges whose messages were never sent or were lost")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("enqueue", help="enqueue one charge (for trials; apps call enqueue_charge)")
    p.add_argument("--amount", type=int, required=True, help="minor units, e.g. 1999 for $19.99")
    p.add_argument("--currency", required=True)
    p.add_argument("--source", required=True, help="a provider payment token, e.g. tok_visa")
    p.add_argument("--key", required=True, help="idempotency key")
    p.add_argument("--description")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", type=_key_value)
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser(
        "serve", help="the HTTP intake: POST /v1/charges, GET /healthz, /metrics (uvicorn)"
    )
    p.add_argument("--host", help="address to bind (default SERVE_HOST, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port (default SERVE_PORT, 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("provider-sim", help="run the payment provider simulator")
    from provider_sim.faults import add_cli_arguments

    add_cli_arguments(p)
    p.set_defaults(func=cmd_provider_sim)

    from payq.ops.cli import add_ops_commands
    from payq.ops.drills import add_simulate_command

    add_ops_commands(sub)
    add_simulate_command(sub)

    p = sub.add_parser("demo", help="the main job end to end, with progress and a summary")
    p.add_argument("--charges", type=int, default=500)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "chaos",
        help="every fault at once against throwaway servers; checks, one line of figures",
    )
    p.add_argument("--charges", type=int, default=3000, help="charges to enqueue (3000)")
    p.add_argument(
        "--enqueue-s", type=float, default=60.0, metavar="S", help="spread them over S s (60)"
    )
    p.add_argument(
        "--outage-s", type=float, default=15.0, metavar="S", help="provider outage length (15)"
    )
    p.add_argument(
        "--kill-every-s", type=float, default=5.0, metavar="S", help="SIGKILL interval (5)"
    )
    p.add_argument("--seed", type=int, help="seed of the faults and the kills")
    p.set_defaults(func=cmd_chaos)
    return parser


def _unavailable_service(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one line for an error that is about PostgreSQL or Redis."""
    import redis

    from payq.db import database_problem

    if (problem := database_problem(exc)) is not None:
        return problem
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return 3, _redis_problem(exc)
    return None


def _redis_problem(exc: BaseException) -> str:
    """One line for a Redis that did not answer, naming the settings that say where it is:
    through Sentinel, the sentinels and the primary's name, not REDIS_URL's host."""
    from redis.sentinel import MasterNotFoundError

    from payq.settings import get_settings

    sentinels: tuple[tuple[str, int], ...] = ()
    master = ""
    try:
        settings = get_settings()
        sentinels, master = settings.sentinels, f" named {settings.redis_sentinel_master!r}"
    except ConfigError:  # a command that ran on settings of its own
        pass
    if isinstance(exc, MasterNotFoundError):
        return (
            f"no sentinel in REDIS_SENTINELS answered with a primary{master} "
            "(MasterNotFoundError): check that the sentinels run and are reachable, and that "
            "REDIS_SENTINEL_MASTER is the name in their `sentinel monitor` "
            "(and REDIS_SENTINEL_PASSWORD, if they have one)"
        )
    where = "REDIS_URL"
    if sentinels:
        where = "REDIS_SENTINELS and REDIS_URL (its password, database and TLS)"
    return f"Redis did not answer ({type(exc).__name__}); check Redis and {where}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.func
    try:
        return command(args)
    except (ConfigError, ChargeInputError, IdempotencyConflict, ChargeNotFound) as exc:
        print(f"payq: {exc}", file=sys.stderr)
        return 2
    except ServiceUnavailable as exc:
        print(f"payq: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        # The reader went away (`payq dlq export | head`): what it wanted, it has.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        problem = _unavailable_service(exc)
        if problem is None:
            raise
        print(f"payq: {problem[1]}", file=sys.stderr)
        return problem[0]
