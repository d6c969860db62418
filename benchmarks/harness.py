"""The benchmark's moving parts: child processes, the simulator, what each one costs, and
the machine they run on.

Every child runs in a session of its own, so that stopping it stops its whole
group (a ``dramatiq`` master and its workers). CPU is read per process with psutil
(user + system, the process's own, summed over the group) before and after a
measured window; Redis's from ``INFO cpu``, PostgreSQL backends' per process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped, unused-ignore]
import redis

__all__ = [
    "Child",
    "Simulator",
    "cpu_by_pid",
    "cpu_delta_s",
    "delete_prefix",
    "machine",
    "machine_busy_s",
    "redis_calls",
    "redis_cpu_s",
    "service_versions",
    "wait_until",
]

PACKAGES = ("dramatiq", "celery", "kombu", "redis", "httpx", "SQLAlchemy", "psycopg2-binary")
STOP_GRACE_S = 1.0  # every run's state is purged after it: no need to drain


class Child:
    """One command in its own session; stdout and stderr go to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        self.log_path.write_bytes(b"")
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants (empty once it is gone)."""
        try:
            leader = psutil.Process(self.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the leader (it passes it on), then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def check(self) -> None:
        """Raise if the process died, with the end of its log."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log().splitlines()[-15:])
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n{tail}"
            )


def wait_until(
    ready: Any, timeout_s: float, what: str, children: Iterable[Child] = (), poll_s: float = 0.1
) -> None:
    """Poll ``ready()`` until true; raise after ``timeout_s`` or if a child died meanwhile."""
    deadline = time.monotonic() + timeout_s
    watched = list(children)
    while not ready():
        for child in watched:
            child.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(poll_s)


def cpu_by_pid(processes: Iterable[psutil.Process]) -> dict[int, float]:
    """user + system CPU seconds of each process (its own, not its children's)."""
    seconds: dict[int, float] = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_delta_s(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two readings; a process first seen in ``after`` counts in full."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def machine_busy_s() -> float:
    """CPU seconds every core has spent busy since boot (not idle, not waiting for I/O)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def redis_cpu_s(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (the benchmark's own namespaces only)."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.delete(*batch))
            batch = []
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def _redis_ports(processes: Iterable[psutil.Process], redis_port: int) -> set[int]:
    """Local ports of the processes' TCP connections to Redis."""
    ports: set[int] = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for conn in process.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == redis_port and conn.laddr:
                    ports.add(conn.laddr.port)
    return ports


def redis_calls(url: str, child: Child, seconds: float) -> tuple[float, Counter[str]]:
    """Redis commands per second sent by ``child``'s processes, by command, over ``seconds``.

    Watches MONITOR and keeps the lines whose client port belongs to one of the
    group's connections to Redis (looked up every second), so other clients of the
    same server do not count. Commands run inside a Lua script show as ``lua``
    clients and are not counted: a script is one call. A second connection pings
    every 0.2 s so that reading MONITOR never waits long for a line.
    """
    client = redis.Redis.from_url(url)
    pinger = redis.Redis.from_url(url)
    port = int(client.connection_pool.connection_kwargs.get("port", 6379))
    ports = _redis_ports(child.tree(), port)
    by_port: dict[int, Counter[str]] = {}
    started = last_look = last_ping = time.monotonic()
    try:
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            while (now := time.monotonic()) - started < seconds:
                if now - last_ping >= 0.2:
                    pinger.ping()
                    last_ping = now
                if now - last_look >= 1.0:
                    ports |= _redis_ports(child.tree(), port)
                    last_look = now
                line = monitor.next_command()
                if line.get("client_type") == "tcp":
                    command = str(line["command"]).split(" ", 1)[0].upper()
                    by_port.setdefault(int(line["client_port"]), Counter())[command] += 1
    finally:
        client.close()
        pinger.close()
    counts: Counter[str] = Counter()
    for client_port, commands in by_port.items():
        if client_port in ports:
            counts.update(commands)
    return sum(counts.values()) / seconds, counts


@dataclass
class Simulator:
    """``payq provider-sim`` in a process of its own (no faults; latency set per phase)."""

    url: str
    child: Child

    @classmethod
    def start(cls, port: int, env: dict[str, str], log_path: Path) -> Simulator:
        argv = [sys.executable, "-m", "payq_cli", "provider-sim", "--port", str(port)]
        sim = cls(f"http://127.0.0.1:{port}", Child("provider-sim", argv, env, log_path).start())

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{sim.url}/_stats", timeout=1).status_code == 200
            return False

        wait_until(answers, 15, "the provider simulator answering", [sim.child])
        return sim

    def set_latency(self, latency_ms: float) -> None:
        response = httpx.post(f"{self.url}/_faults", json={"latency_ms": latency_ms}, timeout=5)
        response.raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_stats/reset", timeout=30).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/_stats", timeout=5).json()
        return data

    def arrivals(self) -> dict[str, float]:
        """Each idempotency key's first arrival (the simulator's ``time.time()``)."""
        response = httpx.get(f"{self.url}/_requests/all", timeout=60)
        response.raise_for_status()
        first: dict[str, float] = {}
        for record in response.json():
            first.setdefault(str(record["idempotency_key"]), float(record["at"]))
        return first

    def cpu_s(self) -> float:
        return sum(cpu_by_pid(self.child.tree()).values())


def machine() -> dict[str, str]:
    """Date, cores and memory, the package versions: the head of the results."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                model,
            )
    except OSError:
        pass
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": (
            f"{os.cpu_count()} cores ({model}), "
            f"{psutil.virtual_memory().total / 2**30:.1f} GiB memory, {platform.system()} "
            f"{platform.release()}"
        ),
        "python": f"Python {platform.python_version()}; " + ", ".join(versions),
        "load": f"load average at start {load}",
    }


def service_versions(redis_url: str) -> dict[str, str]:
    """Redis's and PostgreSQL's versions, and whether a commit waits for the disk."""
    from sqlalchemy import text

    from payq.db import transaction

    client = redis.Redis.from_url(redis_url)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    with transaction() as conn:
        pg = conn.execute(text("SHOW server_version")).scalar_one()
        fsync = conn.execute(text("SHOW fsync")).scalar_one()
        sync = conn.execute(text("SHOW synchronous_commit")).scalar_one()
    return {
        "services": f"Redis {redis_version}; PostgreSQL {pg} (fsync {fsync}, "
        f"synchronous_commit {sync})"
    }
