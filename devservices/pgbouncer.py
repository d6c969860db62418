"""A throwaway PgBouncer in transaction pooling mode, in front of a given PostgreSQL.

For tests, benchmarks and drills that run payq behind a pooler. It listens on
127.0.0.1 only (no Unix socket), keeps its config, log and pid file in a temporary
directory removed on ``stop()``, and trusts every client (``auth_type = trust``; the
server's user is listed in its ``auth_file``, which trust still wants). Any database
name is passed through to the server (a ``*`` entry), so one pooler serves every
database the tests create. PgBouncer refuses to run as root: as root it runs as the
``postgres`` OS user, like `ThrowawayPostgres`.

``pool_size`` is PgBouncer's ``default_pool_size``, and ``max_db_connections`` is set
to the same number: at most that many server connections per database, whatever the
number of clients (up to ``max_client_conn``). ``show("POOLS")`` reads the admin console.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg2  # type: ignore[import-untyped, unused-ignore]

from devservices import DevServiceError, _log_tail, _port_in_use, _Throwaway, end_process
from payq.migrate import conn_params

__all__ = ["PGBOUNCER_MISSING", "ThrowawayPgBouncer"]

PGBOUNCER_MISSING = "pgbouncer is not installed: apt-get install pgbouncer"


class ThrowawayPgBouncer(_Throwaway):
    """``pgbouncer`` on 127.0.0.1:``port`` pooling ``server_dsn``'s server per transaction.

    ``server_dsn``: a PostgreSQL URL (its host, port and user are used; its database
    is not). ``pool_size``: server connections per database. ``max_client_conn``: how
    many clients it accepts in all.
    """

    def __init__(
        self,
        server_dsn: str,
        *,
        pool_size: int,
        max_client_conn: int = 500,
        port: int | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(None, port, "payq-pgbouncer-")
        server = conn_params(server_dsn)
        self.server_host = server.get("host", "127.0.0.1")
        self.server_port = int(server.get("port", "5432"))
        self.user = server.get("user", "postgres")
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` through the pooler."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        """PgBouncer's log."""
        return self.workdir / "pgbouncer.log"

    def is_running(self) -> bool:
        """True while our pgbouncer process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Write the config, start pgbouncer and wait until its admin console answers."""
        if self.is_running():
            return
        binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
        if binary is None:
            raise DevServiceError(PGBOUNCER_MISSING)
        if _port_in_use(self.port):
            raise DevServiceError(f"port {self.port} on 127.0.0.1 is already in use")
        config = self._write_config()
        user: dict[str, Any] = {}
        if self._owner is not None:
            user = {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}
            for path in self.workdir, config, self.workdir / "userlist.txt":
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        with (self.workdir / "stdout.log").open("ab") as out:
            self._proc = subprocess.Popen(
                [binary, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.workdir,
                **user,
            )
        self._arm_atexit()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stop_process(signal.SIGKILL)
                raise DevServiceError(
                    f"pgbouncer on port {self.port} did not answer; log tail:\n"
                    + _log_tail(self.log_path)
                    + "\n"
                    + _log_tail(self.workdir / "stdout.log")
                )
            time.sleep(0.05)

    def _write_config(self) -> Path:
        (self.workdir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.workdir / 'userlist.txt'}",
            f"admin_users = {self.user}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            f"max_db_connections = {self.pool_size}",
            "reserve_pool_size = 0",
            "min_pool_size = 0",
            f"max_client_conn = {self.max_client_conn}",
            f"logfile = {self.log_path}",
            f"pidfile = {self.workdir / 'pgbouncer.pid'}",
        ]
        config = self.workdir / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _answers(self) -> bool:
        try:
            self.show("VERSION")
        except psycopg2.Error:
            return False
        return True

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (POOLS, SERVERS, CLIENTS, CONFIG, ...)."""
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="pgbouncer", connect_timeout=2
        )
        try:
            conn.autocommit = True  # the console knows no transactions
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [col.name for col in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def server_connections(self, database: str) -> int:
        """Server connections the pooler holds for ``database`` now, busy or idle."""
        return sum(
            int(row[state])
            for row in self.show("POOLS")
            if row["database"] == database
            for state in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
        )

    def client_connections(self, database: str) -> int:
        """Client connections to ``database`` now, served or waiting for a server one."""
        return sum(
            int(row[state])
            for row in self.show("POOLS")
            if row["database"] == database
            for state in ("cl_active", "cl_waiting")
        )

    @property
    def pid(self) -> int | None:
        """The pgbouncer process's id while it runs (for its CPU figures)."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def _stop_process(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self._proc = self._proc, None
        end_process(proc, sig)  # SIGTERM: immediate shutdown, clients cut

    def stop(self) -> None:
        """Stop pgbouncer (its clients are cut) and remove its temp dir."""
        self._stop_process()
        self._disarm_and_clean()

    def _atexit(self) -> None:
        self._stop_process(signal.SIGKILL)
        self._disarm_and_clean()
