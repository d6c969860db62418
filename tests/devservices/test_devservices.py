"""Real-server tests for devservices: throwaway Redis and PostgreSQL on free ports.

Nothing here writes to the shared servers on 6379/5432; every server is our own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg2  # type: ignore[import-untyped, unused-ignore]
import pytest
import redis

import devservices
from devservices import (
    DevServiceError,
    ThrowawayPostgres,
    ThrowawayRedis,
    ensure_database,
    free_port,
    postgres_answers,
    redis_answers,
)


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres(max_connections=50) as server:
        yield server


def _query(dsn: str, sql: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(dsn.replace("+psycopg2", ""))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536
    assert not devservices._port_in_use(port)


def test_nothing_answers_on_a_free_port() -> None:
    port = free_port()
    assert not redis_answers(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    assert not postgres_answers(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/payq")


def test_redis_restart_wipes_data_on_the_same_port() -> None:
    with ThrowawayRedis() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert redis_answers(server.url)
        workdir, port = server.workdir, server.port
        with redis.Redis.from_url(server.url) as client:
            client.set("charge:1", "pending")
            server.restart(wipe=False)
            assert client.get("charge:1") == b"pending"  # SHUTDOWN SAVE + reload
            server.restart(wipe=True)
            assert server.port == port
            assert client.get("charge:1") is None
            client.set("charge:2", "pending")
            server.kill()
            assert not server.is_running()
            assert not redis_answers(server.url, timeout_s=0.5)
            server.start()
            assert client.get("charge:2") is None
    assert not server.is_running()
    assert not redis_answers(server.url, timeout_s=0.5)
    assert not workdir.exists()


def test_redis_refuses_a_port_in_use() -> None:
    with ThrowawayRedis() as first:
        with pytest.raises(DevServiceError, match="already in use"):
            ThrowawayRedis(port=first.port).start()
        assert redis_answers(first.url)


def test_redis_missing_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(DevServiceError, match="apt-get install redis-server"):
        ThrowawayRedis().start()


def test_postgres_missing_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(devservices, "PG_LIB_ROOT", tmp_path)
    with pytest.raises(DevServiceError, match="apt-get install postgresql"):
        ThrowawayPostgres().start()


def test_postgres_create_database_connect_and_answer(pg: ThrowawayPostgres) -> None:
    assert pg.dsn() == f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/postgres"
    dsn = pg.create_database("payq_test")
    assert dsn == pg.dsn("payq_test")
    assert _query(dsn, "SELECT current_database()") == [("payq_test",)]
    assert _query(dsn, "SHOW max_connections") == [("50",)]
    assert _query(dsn, "SHOW listen_addresses") == [("127.0.0.1",)]
    assert postgres_answers(dsn)
    assert postgres_answers(pg.dsn("no_such_db"))  # missing database: the server answered
    assert postgres_answers(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres")  # libpq URL


def test_ensure_database_is_idempotent_and_quotes(pg: ThrowawayPostgres) -> None:
    odd = 'pay "q"; DROP DATABASE postgres'
    dsn = f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/{odd.replace(' ', '%20')}"
    dsn = dsn.replace('"', "%22").replace(";", "%3B")
    assert ensure_database(dsn) is True
    assert ensure_database(dsn) is False
    assert ensure_database(pg.dsn("postgres")) is False
    names = {row[0] for row in _query(pg.dsn(), "SELECT datname FROM pg_database")}
    assert {odd, "postgres"} <= names


def test_postgres_restart_keeps_data_on_the_same_port(pg: ThrowawayPostgres) -> None:
    dsn = pg.create_database("restart_test")
    _query(dsn, "CREATE TABLE charges (id int PRIMARY KEY); INSERT INTO charges VALUES (1)")
    port = pg.port
    pg.restart()
    assert pg.port == port and pg.is_running()
    assert _query(dsn, "SELECT id FROM charges") == [(1,)]
    pg.stop(mode="immediate", keep_data=True)  # an outage: down, data still on disk
    assert not postgres_answers(dsn)
    pg.start()
    assert _query(dsn, "SELECT id FROM charges") == [(1,)]


def test_postgres_stop_removes_everything() -> None:
    server = ThrowawayPostgres()
    server.start()
    workdir = server.workdir
    assert postgres_answers(server.dsn())
    server.stop()
    assert not server.is_running()
    assert not postgres_answers(server.dsn())
    assert not workdir.exists()
