"""The three systems under test, behind one interface: fill a queue, send one, start workers.

Each has a Redis namespace of its own on the same server, and all call the same
simulator with the same processes x threads. The producers run in the benchmark's
own process, so the modules they import read the environment the runner set up.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.harness import Child, delete_prefix

__all__ = ["PAYQ_NAMESPACE", "CelerySystem", "DramatiqSystem", "PayqSystem", "Setup", "System"]

PAYQ_NAMESPACE = "payq_bench"
AMOUNT, CURRENCY, SOURCE = 1999, "usd", "tok_visa"
FILL_BATCH = 500


@dataclass
class Setup:
    redis: redis.Redis
    env: dict[str, str]  # what every child gets: services, provider, payq settings
    logdir: Path

    def child_env(self, threads: int) -> dict[str, str]:
        # Each thread may hold one connection of each pool (payq refuses fewer).
        pools = {"PAYMENT_POOL_MAX_CONNECTIONS": str(threads)}
        return {**self.env, **pools, "DATABASE_POOL_MAX_CONNECTIONS": str(threads)}


class System(ABC):
    name: str
    prefix: str  # every Redis key of this system starts with it

    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def purge(self) -> None:
        """Forget every message and record of a previous run."""
        delete_prefix(self.setup.redis, self.prefix)

    @abstractmethod
    def fill(self, keys: Sequence[str]) -> None:
        """Queue one charge per key, as fast as this system allows (workers stopped)."""

    @abstractmethod
    def send(self, key: str) -> None:
        """Queue one charge, the way an application sends one."""

    @abstractmethod
    def queue_length(self) -> int:
        """Messages waiting in Redis (not yet fetched by a worker)."""

    def delayed_length(self) -> int:
        """Messages waiting in the delay queue (deferred or retried)."""
        return int(self.setup.redis.llen(f"{self.prefix}charges.DQ"))

    @abstractmethod
    def start(self, processes: int, threads: int) -> list[Child]:
        """Start the workers (they may still be booting when this returns)."""

    @abstractmethod
    def ready(self, children: list[Child], processes: int) -> bool:
        """True once every worker process is consuming."""

    def db_backend_pids(self) -> list[int]:
        """PostgreSQL backends serving this system's workers (none for the baselines)."""
        return []


class PayqSystem(System):
    name = "payq"
    prefix = f"{PAYQ_NAMESPACE}:"

    def purge(self) -> None:
        from sqlalchemy import text

        from payq.db import transaction
        from payq.routing import get_gate

        super().purge()
        with transaction() as conn:
            conn.execute(text("TRUNCATE charge_attempts, operator_actions, charges"))
        # A fresh namespace, nothing in flight: no grace for the first fleet slot (without
        # this, the first seconds of every run defer charges as after a Redis restart).
        get_gate().fleet.mark_settled()

    def fill(self, keys: Sequence[str]) -> None:
        from producers import enqueue_charges

        for start in range(0, len(keys), FILL_BATCH):
            enqueue_charges(
                [
                    {"amount": AMOUNT, "currency": CURRENCY, "source": SOURCE, "idempotency_key": k}
                    for k in keys[start : start + FILL_BATCH]
                ]
            )

    def send(self, key: str) -> None:
        from producers import enqueue_charge

        enqueue_charge(AMOUNT, CURRENCY, SOURCE, key)

    def send_batch(self, keys: Sequence[str]) -> None:
        from producers import enqueue_charges

        enqueue_charges(
            [
                {"amount": AMOUNT, "currency": CURRENCY, "source": SOURCE, "idempotency_key": k}
                for k in keys
            ]
        )

    def queue_length(self) -> int:
        return int(self.setup.redis.llen(f"{PAYQ_NAMESPACE}:charges"))

    def start(self, processes: int, threads: int) -> list[Child]:
        argv = [sys.executable, "-m", "payq_cli", "worker"]
        argv += ["--processes", str(processes), "--threads", str(threads)]
        log = self.setup.logdir / "payq-worker.log"
        return [Child("payq worker", argv, self.setup.child_env(threads), log).start()]

    def ready(self, children: list[Child], processes: int) -> bool:
        # Each worker process reports itself in Redis once booted (workers.middleware.Reporter).
        reports = self.setup.redis.scan_iter(match=f"{PAYQ_NAMESPACE}:payq:workers:*", count=100)
        return sum(1 for _ in reports) >= processes

    def db_backend_pids(self) -> list[int]:
        from sqlalchemy import text

        from payq.db import transaction

        with transaction() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'payq-worker-%'"
                )
            )
            return [int(pid) for (pid,) in rows]


class DramatiqSystem(System):
    name = "plain Dramatiq"
    prefix = "bench_dramatiq:"

    def fill(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.send(key)

    def send(self, key: str) -> None:
        from benchmarks.plain_dramatiq import charge

        charge.send(key, AMOUNT, CURRENCY, SOURCE)

    def queue_length(self) -> int:
        return int(self.setup.redis.llen(f"{self.prefix}charges"))

    def start(self, processes: int, threads: int) -> list[Child]:
        argv = [sys.executable, "-m", "dramatiq", "--processes", str(processes)]
        argv += ["--threads", str(threads), "benchmarks.plain_dramatiq"]
        log = self.setup.logdir / "plain-dramatiq.log"
        return [Child("plain dramatiq", argv, self.setup.child_env(threads), log).start()]

    def ready(self, children: list[Child], processes: int) -> bool:
        return children[0].log().count("ready for action") >= processes


class CelerySystem(System):
    name = "plain Celery"
    prefix = "bench_celery:"

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self._task: Any = None

    def fill(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.send(key)

    def send(self, key: str) -> None:
        if self._task is None:
            from benchmarks.plain_celery import charge

            self._task = charge
        self._task.delay(key, AMOUNT, CURRENCY, SOURCE)

    def queue_length(self) -> int:
        return int(self.setup.redis.llen(f"{self.prefix}bench_celery"))

    def delayed_length(self) -> int:
        return 0  # Celery has no delay queue in Redis; nothing is deferred here

    def start(self, processes: int, threads: int) -> list[Child]:
        # Celery's thread pool is one process; "processes" are that many worker instances.
        children = []
        for n in range(processes):
            argv = [sys.executable, "-m", "celery", "-A", "benchmarks.plain_celery", "worker"]
            argv += ["--pool", "threads", "--concurrency", str(threads), "--loglevel", "WARNING"]
            argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
            argv += ["--hostname", f"bench{n}@%h"]
            log = self.setup.logdir / f"plain-celery-{n}.log"
            children.append(Child(f"plain celery {n}", argv, self.setup.child_env(threads), log))
        return [child.start() for child in children]

    def ready(self, children: list[Child], processes: int) -> bool:
        from benchmarks.plain_celery import READY_LINE

        return all(READY_LINE in child.log() for child in children)
