"""The throwaway streaming replica (``devservices.replica``) against a throwaway primary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg2  # type: ignore[import-untyped, unused-ignore]
import pytest

import devservices.replica
from devservices import DevServiceError, ThrowawayPostgres
from devservices.replica import BASEBACKUP_MISSING, ThrowawayReplica


def _query(dsn: str, sql: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(dsn.replace("+psycopg2", ""))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


@pytest.fixture(scope="module")
def primary() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres(max_connections=30) as server:
        yield server


def test_a_hot_standby_streams_pauses_and_catches_up(primary: ThrowawayPostgres) -> None:
    _query(primary.dsn(), "CREATE TABLE IF NOT EXISTS t (x int)")
    with ThrowawayReplica(primary) as replica:
        assert replica.port != primary.port
        assert _query(replica.dsn(), "SELECT pg_is_in_recovery()") == [(True,)]
        assert _query(replica.dsn(), "SELECT count(*) FROM pg_stat_wal_receiver") == [(1,)]
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            _query(replica.dsn(), "INSERT INTO t VALUES (0)")
        replica.pause()
        _query(primary.dsn(), "INSERT INTO t VALUES (1)")
        assert replica.lag_bytes() > 0
        assert _query(replica.dsn(), "SELECT count(*) FROM t") == [(0,)]  # held back
        replica.resume()
        replica.wait_caught_up()
        assert replica.lag_bytes() <= 0
        assert _query(replica.dsn(), "SELECT count(*) FROM t") == [(1,)]
        replica.stop(keep_data=True)
        assert not replica.is_running()
        _query(primary.dsn(), "INSERT INTO t VALUES (2)")
        replica.start()  # the same data, streaming again from where it was
        replica.wait_caught_up()
        assert _query(replica.dsn(), "SELECT count(*) FROM t") == [(2,)]
    assert not replica.is_running()


def test_a_missing_pg_basebackup_fails_naming_the_package(
    primary: ThrowawayPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devservices.replica, "_pg_bindir", lambda: tmp_path)
    replica = ThrowawayReplica(primary)
    with pytest.raises(DevServiceError, match="apt-get install postgresql-client"):
        replica.start()
    replica.stop()
    assert "postgresql-client" in BASEBACKUP_MISSING


def test_a_replica_needs_its_primary_running() -> None:
    with pytest.raises(DevServiceError, match="primary of this replica is not running"):
        ThrowawayReplica(ThrowawayPostgres()).start()
