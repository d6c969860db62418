"""A throwaway Redis Sentinel setup: a primary, a replica and three sentinels.

For tests and drills of a failover: everything binds 127.0.0.1 on free ports and lives
in temporary directories removed on ``stop()``. The sentinels are quick to act
(``down_after_ms``, ``failover_timeout_ms``), so ``kill_primary()`` followed by
``wait_for_promotion()`` is a failover of a few seconds.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devservices import DevServiceError, ThrowawayRedis, free_port

__all__ = ["SENTINEL_MISSING", "ThrowawaySentinels"]

SENTINEL_MISSING = (
    "redis-sentinel is not installed: apt-get install redis-sentinel (the Debian package)"
)


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        "127.0.0.1", port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )


class _Sentinel:
    """One ``redis-sentinel`` process with its own config file (sentinels rewrite it)."""

    def __init__(self, workdir: Path, primary_port: int, settings: ThrowawaySentinels) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "sentinel.conf"
        name = settings.master_name
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {workdir}\n"
            f"sentinel monitor {name} 127.0.0.1 {primary_port} {settings.quorum}\n"
            f"sentinel down-after-milliseconds {name} {settings.down_after_ms}\n"
            f"sentinel failover-timeout {name} {settings.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> None:
        with (self.workdir / "sentinel.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class ThrowawaySentinels:
    """A primary, one replica of it, and ``sentinels`` sentinels watching it as
    ``master_name``; ``sentinel_list`` is what ``REDIS_SENTINELS`` takes."""

    def __init__(
        self,
        master_name: str = "payq",
        *,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.start_timeout_s = start_timeout_s
        self.primary = ThrowawayRedis()
        replica_of = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.nodes = [self.primary, ThrowawayRedis(extra_args=replica_of)]
        self._dir = Path(tempfile.mkdtemp(prefix="payq-sentinel-"))
        self.sentinels = []
        for i in range(sentinels):
            (self._dir / f"s{i}").mkdir()
            self.sentinels.append(_Sentinel(self._dir / f"s{i}", self.primary.port, self))

    @property
    def sentinel_list(self) -> str:
        """``127.0.0.1:PORT,...``: the value of ``REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> None:
        """Start the primary, the replica, then the sentinels; wait until the replica is
        in sync and every sentinel knows the replica and the other sentinels (a failover
        needs a majority of them to agree)."""
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise DevServiceError(SENTINEL_MISSING)
        for node in self.nodes:
            node.start()
        atexit.register(self.stop)
        for sentinel in self.sentinels:
            sentinel.start(binary)
        self._wait(self._ready, "the replica to sync and the sentinels to find each other")

    def _ready(self) -> bool:
        with _client(self.nodes[1].port) as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            with _client(sentinel.port) as client:
                state: Any = client.sentinel_master(self.master_name)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> int:
        """The primary's port as the sentinels see it (asked of each in turn)."""
        for sentinel in self.sentinels:
            try:
                with _client(sentinel.port) as client:
                    address: Any = client.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        raise DevServiceError("no sentinel names a primary")

    def freeze_replicas(self) -> None:
        """SIGSTOP every replica and drop the primary's links to them: writes to the
        primary from now on stay there, as the last writes before a crash do when
        replication lags (``thaw_replicas`` lets them reconnect)."""
        self._signal_replicas(signal.SIGSTOP)
        with _client(self.primary_port()) as primary:
            primary.client_kill_filter(_type="replica")

    def thaw_replicas(self) -> None:
        """SIGCONT the replicas frozen by ``freeze_replicas``."""
        self._signal_replicas(signal.SIGCONT)

    def _signal_replicas(self, sig: signal.Signals) -> None:
        primary = self.primary_port()
        for node in self.nodes:
            if node.port != primary and node.pid is not None:
                os.kill(node.pid, sig)

    def kill_primary(self) -> int:
        """SIGKILL the current primary (a crash: no goodbye to anyone); its port."""
        port = self.primary_port()
        node = next(n for n in self.nodes if n.port == port)
        node.kill()
        return port

    def wait_for_promotion(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until the sentinels name another primary and it answers as one; its port."""

        def promoted() -> bool:
            port = self.primary_port()
            if port == old_port:
                return False
            with _client(port) as node:
                return bool(node.info("replication")["role"] == "master")

        self._wait(promoted, "a replica to be promoted", timeout_s)
        return self.primary_port()

    def _wait(self, done: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while True:
            try:
                if done():
                    return
            except (redis.RedisError, OSError, DevServiceError):
                pass
            if time.monotonic() > deadline:
                raise DevServiceError(f"timed out waiting for {what}; logs in {self._dir}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every process and remove the temporary directories."""
        atexit.unregister(self.stop)
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
