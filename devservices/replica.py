"""A throwaway streaming replica of a throwaway PostgreSQL, for tests of reads from a replica.

``pg_basebackup -R`` copies the primary (a running ``ThrowawayPostgres``: its default
``wal_level=replica``, ``max_wal_senders`` and the ``host replication all 127.0.0.1/32
trust`` line initdb writes are all a standby needs) into a temporary directory, which
then starts as a hot standby on a free port of 127.0.0.1, streaming from the primary.
``pause()``/``resume()`` stop and restart its replay (``pg_wal_replay_pause()``): lag on
demand, while it still answers and still receives. Runs as the ``postgres`` OS user when
run as root, as ``ThrowawayPostgres`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from devservices import DevServiceError, ThrowawayPostgres, _pg_bindir
from payq.migrate import conn_params, connect

__all__ = ["BASEBACKUP_MISSING", "ThrowawayReplica"]

BASEBACKUP_MISSING = (
    "pg_basebackup is not installed beside initdb: apt-get install postgresql-client "
    "(the same major version as the server)"
)


class ThrowawayReplica(ThrowawayPostgres):
    """A hot standby of ``primary``, streaming from it; ``stop()`` removes it."""

    def __init__(
        self, primary: ThrowawayPostgres, workdir: Path | None = None, port: int | None = None
    ) -> None:
        super().__init__(workdir, port)
        self.primary = primary

    def start(self) -> None:
        """Copy the primary (first time only) and start as its standby; no-op if running."""
        if self.is_running():
            return
        if not self.primary.is_running():
            raise DevServiceError("the primary of this replica is not running: start it first")
        data = self.workdir / "data"
        if not (data / "PG_VERSION").exists():
            self._chown(self.workdir)
            binary = _pg_bindir() / "pg_basebackup"
            if not binary.is_file():
                raise DevServiceError(BASEBACKUP_MISSING)
            res = self._run(
                str(binary), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.primary.port),
                "-U", "postgres", "-X", "stream", "-R", "--checkpoint=fast", "--no-sync",
            )  # fmt: skip
            if res.returncode != 0:
                raise DevServiceError(f"pg_basebackup failed:\n{res.stdout}{res.stderr}")
        super().start()  # finds PG_VERSION: no initdb; standby.signal makes it a standby

    def _sql(self, query: str, dsn: str | None = None) -> Any:
        conn = connect(conn_params(dsn or self.dsn()), 5.0)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchone()[0] if cur.description else None
        finally:
            conn.close()

    def pause(self, timeout_s: float = 10.0) -> None:
        """Stop replaying WAL (it is still received): the replica falls behind from now."""
        self._sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout_s
        while self._sql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise DevServiceError(f"replay did not pause within {timeout_s:g} s")
            time.sleep(0.02)

    def resume(self) -> None:
        """Replay again: the replica catches up."""
        self._sql("SELECT pg_wal_replay_resume()")

    def lag_bytes(self) -> int:
        """WAL the primary has written that this replica has not replayed yet."""
        primary_lsn = self._sql("SELECT pg_current_wal_lsn()::text", self.primary.dsn())
        return int(
            self._sql(f"SELECT pg_wal_lsn_diff('{primary_lsn}', pg_last_wal_replay_lsn())::bigint")
        )

    def wait_caught_up(self, timeout_s: float = 30.0) -> None:
        """Wait until everything the primary has written so far is replayed here."""
        primary_lsn = self._sql("SELECT pg_current_wal_lsn()::text", self.primary.dsn())
        deadline = time.monotonic() + timeout_s
        query = f"SELECT pg_last_wal_replay_lsn() >= '{primary_lsn}'::pg_lsn"
        while not self._sql(query):
            if time.monotonic() > deadline:
                raise DevServiceError(
                    f"the replica did not replay up to {primary_lsn} within {timeout_s:g} s"
                )
            time.sleep(0.05)
