"""Throwaway Redis and PostgreSQL servers for tests, ``make demo`` and chaos runs.

They start straight from the system binaries, without Docker and outside pytest: initdb
as the ``postgres`` OS user when run as root, restart on the same port, Redis wiped on
restart. Needs only stdlib ``subprocess``, psycopg2 and redis. (No library covered this:
``pytest-postgresql``/``pytest-redis`` are pytest-only, ``testing.postgresql`` unmaintained.)

Both servers bind 127.0.0.1 only and keep everything in a temporary directory removed on
``stop()`` (and at interpreter exit, via ``atexit``). They never touch the shared servers
on 5432/6379 unless those ports are passed explicitly (and then ``start()`` refuses
because the port is taken).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg2  # type: ignore[import-untyped, unused-ignore]
import psycopg2.errors  # type: ignore[import-untyped, unused-ignore]
import psycopg2.extensions  # type: ignore[import-untyped, unused-ignore]
import psycopg2.sql  # type: ignore[import-untyped, unused-ignore]
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from payq.migrate import conn_params, connect, ensure_database

__all__ = [
    "DevServiceError",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "end_process",
    "ensure_database",
    "free_port",
    "postgres_answers",
    "postgres_or_throwaway",
    "redis_answers",
    "redis_or_throwaway",
]

REDIS_MISSING = (
    "redis-server is not installed: apt-get install redis-server, or start Redis and set REDIS_URL"
)
POSTGRES_MISSING = (
    "PostgreSQL server binaries not found: apt-get install postgresql, "
    "or start PostgreSQL and set DATABASE_URL"
)
PG_LIB_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <ver>/bin/{initdb,pg_ctl,postgres}


class DevServiceError(RuntimeError):
    """A throwaway server could not be found, started or stopped."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def end_process(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Send ``sig`` to a server process still running and wait for it (SIGKILL after 10 s)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True if the Redis at ``url`` answers PING within ``timeout_s`` (no retries)."""
    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def postgres_answers(dsn: str, timeout_s: float = 2.0) -> bool:
    """True if the PostgreSQL server named by ``dsn`` accepts a connection.

    ``timeout_s`` becomes libpq's ``connect_timeout``: whole seconds, at least 2.

    A missing database still counts as "answering": the server itself replied.  That is
    detected from libpq's ``database "x" does not exist`` message, and (so a translated
    message does not matter) by falling back to the ``postgres`` maintenance database.
    """
    params = conn_params(dsn)
    attempts = (
        [{}] if params.get("dbname", "postgres") == "postgres" else [{}, {"dbname": "postgres"}]
    )
    for overrides in attempts:
        try:
            connect(params, timeout_s, **overrides).close()
            return True
        except psycopg2.OperationalError as exc:
            message = str(exc)
            if "database" in message and "does not exist" in message:
                return True
            if "Connection refused" in message or "timeout expired" in message:
                return False  # nothing listens there: do not wait a second time
    return False


class _Throwaway:
    """Shared lifecycle: temp dir ownership, atexit safety net, context manager."""

    def __init__(self, workdir: Path | None, port: int | None, prefix: str) -> None:
        self.port = port if port is not None else free_port()
        self._given_dir = workdir
        self._prefix = prefix
        self._dir: Path | None = None
        self._atexit_registered = False

    @property
    def workdir(self) -> Path:
        """The directory holding this server's data, socket and log (created by start)."""
        if self._dir is None:
            if self._given_dir is not None:
                self._given_dir.mkdir(parents=True, exist_ok=True)
                self._dir = self._given_dir
            else:
                self._dir = Path(tempfile.mkdtemp(prefix=self._prefix))
        return self._dir

    def _arm_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def _disarm_and_clean(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def _atexit(self) -> None:  # overridden
        self._disarm_and_clean()

    def start(self) -> None:  # overridden
        """Start the server."""
        raise NotImplementedError

    def stop(self) -> None:  # overridden
        """Stop the server and remove its temp dir."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ThrowawayRedis(_Throwaway):
    """A private ``redis-server`` on 127.0.0.1 that saves nothing (``--save ""``, no AOF)."""

    def __init__(
        self,
        workdir: Path | None = None,
        port: int | None = None,
        start_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        super().__init__(workdir, port, "payq-redis-")
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args  # more redis-server options, e.g. --replicaof
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """Where redis-server writes its log."""
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        """The redis-server process's id while it runs."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        """True while our redis-server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start redis-server and wait until PING answers; no-op if already running."""
        if self.is_running():
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise DevServiceError(REDIS_MISSING)
        if _port_in_use(self.port):
            raise DevServiceError(f"port {self.port} on 127.0.0.1 is already in use")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)]
        args += ["--logfile", "", *self.extra_args]  # stdout, which goes to redis.log
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir
            )
        self._arm_atexit()
        deadline = time.monotonic() + self.start_timeout_s
        while not redis_answers(self.url, timeout_s=0.5):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stop_process(signal.SIGKILL)
                raise DevServiceError(
                    f"redis-server on port {self.port} did not answer PING; log tail:\n"
                    + _log_tail(self.log_path)
                )
            time.sleep(0.02)

    def _stop_process(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self._proc = self._proc, None
        end_process(proc, sig)

    def stop(self) -> None:
        """Stop redis-server (SIGTERM, nothing saved) and remove its temp dir."""
        self._stop_process()
        self._disarm_and_clean()

    def kill(self) -> None:
        """SIGKILL redis-server, keeping its dir: a crash; ``start()`` brings it back empty."""
        self._stop_process(signal.SIGKILL)

    def restart(self, wipe: bool = True) -> None:
        """Restart on the same port.  ``wipe=True``: all data is gone.  ``wipe=False``:
        ``SHUTDOWN SAVE`` writes dump.rdb first, which the new process loads."""
        dump = self.workdir / "dump.rdb"
        if wipe or self._proc is None:
            self._stop_process()
            dump.unlink(missing_ok=True)
        else:
            with redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0)) as client:
                client.shutdown(save=True)  # blocks until dump.rdb is written
            self._stop_process()
        self.start()

    def _atexit(self) -> None:
        self._stop_process(signal.SIGKILL)
        self._disarm_and_clean()


def _pg_bindir() -> Path:
    """Directory with initdb/pg_ctl: ``pg_config --bindir`` if it has them, else the
    highest /usr/lib/postgresql/<ver>/bin, else whatever PATH has."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    versions = PG_LIB_ROOT.glob("*/bin")
    candidates += sorted(
        versions, key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)], reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    raise DevServiceError(POSTGRES_MISSING)


class ThrowawayPostgres(_Throwaway):
    """A private PostgreSQL cluster (initdb in a temp dir, trust auth, fsync off) on 127.0.0.1.

    When running as root, initdb and the server run as the ``postgres`` OS user (initdb
    refuses root) and the temp dir is chowned to it.  A ``workdir`` you pass must then be
    reachable by that user (pytest's ``tmp_path`` under /tmp/pytest-of-root is not).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        port: int | None = None,
        max_connections: int = 200,
        start_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(workdir, port, "payq-pg-")
        self.max_connections = max_connections
        self.start_timeout_s = start_timeout_s
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise DevServiceError(
                    "running as root needs a 'postgres' OS user for initdb"
                ) from exc

    def dsn(self, database: str = "postgres") -> str:
        """SQLAlchemy URL ``postgresql+psycopg2://postgres@127.0.0.1:PORT/<database>``."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        """The server log (pg_ctl -l)."""
        return self.workdir / "postgres.log"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        user: dict[str, Any] = {}
        if self._owner is not None:
            user = {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}
        return subprocess.run(
            list(args), capture_output=True, text=True, check=False, cwd=self.workdir, **user
        )

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def start(self) -> None:
        """initdb (first time only) and ``pg_ctl start -w``; no-op if already running."""
        if self.is_running():
            return
        bindir = _pg_bindir()
        self._chown(self.workdir)
        data, sock = self.workdir / "data", self.workdir / "sock"
        if not (data / "PG_VERSION").exists():
            flags = ["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]
            res = self._run(str(bindir / "initdb"), "-D", str(data), *flags)
            if res.returncode != 0:
                raise DevServiceError(f"initdb failed:\n{res.stdout}{res.stderr}")
        sock.mkdir(exist_ok=True)
        self._chown(sock)
        if _port_in_use(self.port):
            raise DevServiceError(f"port {self.port} on 127.0.0.1 is already in use")
        opts = (
            f"-p {self.port} -k {shlex.quote(str(sock))} -c listen_addresses=127.0.0.1 "
            f"-c fsync=off -c max_connections={self.max_connections}"
        )
        self._arm_atexit()
        wait = ("-w", "-t", str(math.ceil(self.start_timeout_s)))
        res = self._pg_ctl("start", *wait, "-l", str(self.log_path), "-o", opts)
        if res.returncode != 0:
            self._pg_ctl_stop("immediate")
            raise DevServiceError(
                f"PostgreSQL on port {self.port} did not start: {res.stdout}{res.stderr}\n"
                f"log tail:\n{_log_tail(self.log_path)}"
            )

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(str(_pg_bindir() / "pg_ctl"), *args, "-D", str(self.workdir / "data"))

    def is_running(self) -> bool:
        """True if ``pg_ctl status`` finds the postmaster alive (it may have been killed)."""
        if self._dir is None or not (self._dir / "data" / "postmaster.pid").exists():
            return False
        return self._pg_ctl("status").returncode == 0

    def _pg_ctl_stop(self, mode: str) -> None:
        if self.is_running():
            res = self._pg_ctl("stop", "-w", "-m", mode)
            if res.returncode != 0 and self.is_running():
                raise DevServiceError(f"pg_ctl stop failed: {res.stdout}{res.stderr}")

    def stop(self, mode: str = "fast", keep_data: bool = False) -> None:
        """``pg_ctl stop -m mode`` (smart|fast|immediate); then remove the temp dir unless
        ``keep_data`` (so a later ``start()`` comes back with the same data, e.g. an outage)."""
        self._pg_ctl_stop(mode)
        if not keep_data:
            self._disarm_and_clean()

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port; data is kept."""
        self._pg_ctl_stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if missing) and return its dsn."""
        dsn = self.dsn(name)
        ensure_database(dsn)
        return dsn

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl_stop("immediate")
        self._disarm_and_clean()


def redis_or_throwaway(url: str) -> ThrowawayRedis | None:
    """None if Redis answers at ``url``; else a started throwaway server (the caller stops
    it). Raises `DevServiceError` when none can be started."""
    if redis_answers(url):
        return None
    server = ThrowawayRedis()
    server.start()
    return server


def postgres_or_throwaway(dsn: str) -> ThrowawayPostgres | None:
    """None if PostgreSQL answers at ``dsn``; else a started throwaway server (the caller
    stops it). Raises `DevServiceError` when none can be started."""
    if postgres_answers(dsn):
        return None
    server = ThrowawayPostgres()
    server.start()
    return server
