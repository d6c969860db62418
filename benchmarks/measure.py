"""The measurements: throughput windows, enqueue rates, light-load latency, idle Redis calls.

Each takes a `Bench` (the plan, the simulator, Redis) and a system, and returns plain
figures; the runner decides the order (systems interleaved run by run, so that a burst of other
work on the machine lands on one run of one system, not on all runs of one).
"""

from __future__ import annotations

import contextlib
import math
import random
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil  # type: ignore[import-untyped, unused-ignore]
import redis

from benchmarks.harness import (
    Child,
    Simulator,
    cpu_by_pid,
    cpu_delta_s,
    machine_busy_s,
    redis_calls,
    redis_cpu_s,
    wait_until,
)
from benchmarks.systems import System

__all__ = [
    "Bench",
    "Plan",
    "Window",
    "enqueue_rate",
    "idle_redis_calls",
    "light_load_latencies",
    "throughput_run",
]

READY_TIMEOUT_S = 120.0
#: A first run queues enough for this rate (or the concurrency bound, if lower): more
#: than any of the three systems reaches on two cores. Later runs of the same system
#: and point queue for the best rate seen so far, times ``FILL_HEADROOM``; a run whose
#: queue ran dry is flagged, and the next one is filled for the cap again.
FILL_RATE_CAP = 1000.0
FILL_HEADROOM = 1.4
#: Workers consume while the last of their processes boots: queue that much more.
BOOT_ALLOWANCE_S = 3.0
FILL_MARGIN = 1.25


@dataclass(frozen=True)
class Plan:
    runs: int = 3
    warmup_s: float = 3.0
    window_s: float = 10.0
    enqueue_s: float = 3.0
    light_rate_per_s: float = 10.0
    light_window_s: float = 10.0
    idle_s: float = 10.0


@dataclass
class Bench:
    plan: Plan
    sim: Simulator
    redis: redis.Redis
    redis_url: str
    say: Callable[[str], None]
    runs_done: Counter[str] = field(default_factory=Counter)

    def tag(self, what: str) -> str:
        """A fresh prefix for idempotency keys (keys are never reused across runs).

        Letters between the numbers: payq refuses a key with a run of digits (dashes
        and spaces included) that could be a card number.
        """
        self.runs_done[what] += 1
        letters = "".join(random.choices(string.ascii_lowercase, k=8))
        return f"bench-{what}{self.runs_done[what]}-{letters}"


@dataclass(frozen=True)
class Window:
    """One measured window of one throughput run."""

    charges: int
    seconds: float
    worker_cpu_s: float
    sim_cpu_s: float
    redis_cpu_s: float
    db_cpu_s: float | None  # PostgreSQL backends of payq's workers; None for the baselines
    machine_cpu_s: float  # every core's busy time, whoever used it (other work included)
    backlog_left: int  # messages still queued at the end (0: the run may have starved)
    delayed_left: int  # messages in the delay queue at the end (deferred or retried)

    @property
    def rate(self) -> float:
        return self.charges / self.seconds

    def per_charge_ms(self, cpu_s: float | None) -> float:
        if cpu_s is None or self.charges == 0:
            return math.nan
        return cpu_s * 1000 / self.charges


@dataclass(frozen=True)
class _Snapshot:
    at: float
    charges: int
    workers: dict[int, float]
    sim_s: float
    redis_s: float
    db: dict[int, float]
    machine_s: float


def _snapshot(bench: Bench, system: System, children: list[Child]) -> _Snapshot:
    at = time.monotonic()
    charges = int(bench.sim.stats()["charge_requests"])
    workers = cpu_by_pid(p for child in children for p in child.tree())
    db_processes = []
    for pid in system.db_backend_pids():
        with contextlib.suppress(psutil.NoSuchProcess):
            db_processes.append(psutil.Process(pid))
    return _Snapshot(
        at,
        charges,
        workers,
        bench.sim.cpu_s(),
        redis_cpu_s(bench.redis),
        cpu_by_pid(db_processes),
        machine_busy_s(),
    )


def _start(system: System, processes: int, threads: int) -> list[Child]:
    children = system.start(processes, threads)
    try:
        wait_until(
            lambda: system.ready(children, processes),
            READY_TIMEOUT_S,
            f"{system.name}: {processes} worker processes ready",
            children,
        )
    except BaseException:
        _stop(children)
        raise
    return children


def _stop(children: list[Child]) -> None:
    for child in children:
        child.stop()


def throughput_run(
    bench: Bench,
    system: System,
    processes: int,
    threads: int,
    latency_ms: float,
    earlier: Sequence[Window] = (),
) -> Window:
    """Queue a backlog, start the workers, warm up, then measure one window.

    ``earlier``: this system's earlier runs at the same point, to size the backlog.
    """
    plan = bench.plan
    bound = processes * threads * 1000 / latency_ms
    expected = min(bound, FILL_RATE_CAP)
    if earlier and all(w.backlog_left for w in earlier):
        expected = min(expected, max(w.rate for w in earlier) * FILL_HEADROOM)
    count = math.ceil(expected * (plan.warmup_s + plan.window_s + BOOT_ALLOWANCE_S) * FILL_MARGIN)
    system.purge()
    tag = bench.tag("tp")
    system.fill([f"{tag}-k{i}" for i in range(count)])
    bench.sim.set_latency(latency_ms)
    bench.sim.reset()
    children = _start(system, processes, threads)
    try:
        time.sleep(plan.warmup_s)
        before = _snapshot(bench, system, children)
        time.sleep(plan.window_s)
        after = _snapshot(bench, system, children)
        backlog = system.queue_length()
        delayed = system.delayed_length()
        for child in children:
            child.check()
    finally:
        _stop(children)
    system.purge()
    return Window(
        charges=after.charges - before.charges,
        seconds=after.at - before.at,
        worker_cpu_s=cpu_delta_s(before.workers, after.workers),
        sim_cpu_s=after.sim_s - before.sim_s,
        redis_cpu_s=after.redis_s - before.redis_s,
        db_cpu_s=cpu_delta_s(before.db, after.db) if after.db else None,
        machine_cpu_s=after.machine_s - before.machine_s,
        backlog_left=backlog,
        delayed_left=delayed,
    )


def enqueue_rate(bench: Bench, send: Callable[[str, int], int], purge: Callable[[], None]) -> float:
    """Charges queued per second by ``send(tag, i)`` (which returns how many it queued)."""
    purge()
    tag = bench.tag("enq")
    for i in range(20):  # connections, pools, imports: not part of the rate
        send(f"{tag}-warm", i)
    sent = 0
    i = 0
    started = time.monotonic()
    while time.monotonic() - started < bench.plan.enqueue_s:
        sent += send(tag, i)
        i += 1
    elapsed = time.monotonic() - started
    purge()
    return sent / elapsed


def light_load_latencies(
    bench: Bench, system: System, processes: int, threads: int, latency_ms: float
) -> list[list[float]]:
    """Enqueue-to-provider-call latency (ms) of charges sent at a steady light rate.

    One worker group; ``plan.runs`` windows in a row, each sending
    ``light_rate_per_s`` charges a second for ``light_window_s``. The clock starts
    just before the send call (the producer's own time counts) and stops when the
    request reaches the simulator.
    """
    plan = bench.plan
    system.purge()
    bench.sim.set_latency(latency_ms)
    bench.sim.reset()
    children = _start(system, processes, threads)
    runs: list[list[float]] = []
    try:
        time.sleep(3.0)  # let the boot settle: workers idle, as at light load
        for _ in range(plan.runs):
            tag = bench.tag("light")
            count = round(plan.light_rate_per_s * plan.light_window_s)
            sent: dict[str, float] = {}
            started = time.monotonic()
            for i in range(count):
                delay = started + i / plan.light_rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                key = f"{tag}-k{i}"
                sent[key] = time.time()
                system.send(key)
            deadline = time.monotonic() + 10
            while bench.sim.stats()["charge_requests"] < count and time.monotonic() < deadline:
                time.sleep(0.2)
            arrivals = bench.sim.arrivals()
            runs.append([(arrivals[k] - t) * 1000 for k, t in sent.items() if k in arrivals])
            if len(runs[-1]) < count:
                bench.say(f"    {count - len(runs[-1])} of {count} charges did not arrive in time")
            bench.sim.reset()
            for child in children:
                child.check()
    finally:
        _stop(children)
    system.purge()
    return runs


def idle_redis_calls(bench: Bench, system: System, threads: int) -> tuple[float, Counter[str]]:
    """Redis calls per second of one idle worker process (and its master), by command."""
    system.purge()
    children = _start(system, 1, threads)
    try:
        time.sleep(5.0)  # past the boot's own burst of calls
        rate, commands = redis_calls(bench.redis_url, children[0], bench.plan.idle_s)
        children[0].check()
    finally:
        _stop(children)
    system.purge()
    return rate, commands
