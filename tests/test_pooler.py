"""payq behind a real PgBouncer in transaction mode (``DATABASE_POOLER=transaction``).

What a transaction pooler breaks is checked through one, not argued: the statement
timeout (no startup parameter gets through; ``SET LOCAL`` in each statement's query
does, and ends with its transaction), prepared statements (none are made), ``payq
migrate`` (its lock is transaction-scoped; ``DATABASE_DIRECT_URL`` bypasses the
pooler), and the worker's start-time check (the pooler's pool, not the group's pools,
against ``max_connections``). The whole fleet through it: tests/e2e/test_pgbouncer_fleet.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import (
    Engine,
    Integer,
    bindparam,
    create_engine,
    event,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import OperationalError

from devservices.pgbouncer import ThrowawayPgBouncer
from payq import db
from payq.capacity import ConnectionBudget, check_fleet_fits, check_pooled_fleet_fits
from payq.errors import ConfigError
from payq.pooler import PoolerBudget, read_pooler_budget
from payq.settings import load_settings
from tests.conftest import PG_SERVER, TEST_DB, TEST_ENV

POOL = 2
TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def pooler(database: str) -> Iterator[ThrowawayPgBouncer]:
    with ThrowawayPgBouncer(f"{PG_SERVER}/postgres", pool_size=POOL) as bouncer:
        yield bouncer


@pytest.fixture
def pooled(pooler: ThrowawayPgBouncer) -> Iterator[tuple[Engine, list[str]]]:
    """payq's engine for the suite's database through the pooler, and what it sends."""
    settings = load_settings(
        database_url=pooler.url(TEST_DB),
        database_pooler="transaction",
        db_statement_timeout_ms=TIMEOUT_MS,
    )
    engine = db.make_engine(settings, "pooled")
    sent: list[str] = []
    event.listen(engine, "after_cursor_execute", lambda *args: sent.append(args[2]))
    yield engine, sent
    engine.dispose()


def _direct_timeout() -> str:
    conn = psycopg2.connect(_direct())
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            return str(cur.fetchone()[0])
    finally:
        conn.close()


def _direct() -> str:
    return TEST_ENV["DATABASE_URL"].replace("postgresql+psycopg2://", "postgresql://")


@pytest.mark.parametrize("scope", ["transaction", "autocommit"])
def test_a_statement_longer_than_the_timeout_is_cancelled_through_the_pooler(
    pooled: tuple[Engine, list[str]], scope: str
) -> None:
    engine, sent = pooled
    run = db.transaction if scope == "transaction" else db.autocommit
    started = time.monotonic()
    with pytest.raises(OperationalError) as caught, run(engine) as conn:
        conn.execute(text("SELECT pg_sleep(2)"))
    assert caught.value.orig.pgcode == "57014"  # query_canceled
    assert time.monotonic() - started < 1.5
    # The next transaction on the same client connection still has it, and a statement
    # within the timeout runs.
    with run(engine) as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == f"{TIMEOUT_MS}ms"
        assert conn.execute(text("SELECT 1 FROM pg_sleep(0.05)")).scalar_one() == 1
    # Each statement carries the timeout in its own query string.
    assert sent and all(s.startswith(f"SET LOCAL statement_timeout = {TIMEOUT_MS}; ") for s in sent)


def test_the_timeout_ends_with_its_transaction_on_the_server_connection(
    pooler: ThrowawayPgBouncer, pooled: tuple[Engine, list[str]]
) -> None:
    engine, _ = pooled
    baseline = _direct_timeout()
    assert baseline != f"{TIMEOUT_MS}ms"
    with db.autocommit(engine) as conn:
        conn.execute(text("SELECT 1"))
    # Every server connection the pooler holds is handed to other clients as it was.
    for _ in range(2 * POOL):
        other = psycopg2.connect(
            host="127.0.0.1", port=pooler.port, user="postgres", dbname=TEST_DB
        )
        try:
            with other.cursor() as cur:
                cur.execute("SHOW statement_timeout")
                assert cur.fetchone()[0] == baseline
        finally:
            other.close()


def test_nothing_is_prepared_behind_the_pooler_and_nothing_warns(
    pooled: tuple[Engine, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    engine, sent = pooled
    lookup = db.Prepared("lookup", select(literal_column("1") + bindparam("n", type_=Integer)))
    quick = db.Prepared("quick", select(literal_column("'x'")), durable=False)
    with db.autocommit(engine) as conn:
        assert [lookup.execute(conn, {"n": n}).scalar_one() for n in (1, 2, 3)] == [2, 3, 4]
        assert quick.execute(conn, {}).scalar_one() == "x"
    assert not [s for s in sent if "PREPARE" in s or "EXECUTE" in s]
    assert not [r for r in caplog.records if r.name == "payq.db"]


def test_without_the_setting_a_pooler_refuses_and_payq_says_what_to_set(
    pooler: ThrowawayPgBouncer,
) -> None:
    engine = db.make_engine(load_settings(database_url=pooler.url(TEST_DB)), "unpooled")
    try:
        with pytest.raises(OperationalError) as caught, db.transaction(engine) as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    problem = db.database_problem(caught.value)
    assert problem is not None and problem[0] == 2
    assert "set DATABASE_POOLER=transaction" in problem[1]


def _migrate(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "payq_cli", "migrate", "--wait", "10"],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", "DATABASE_POOLER": "transaction", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(run: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, errors = run.communicate(timeout=120)
    return run.returncode, out, errors


@pytest.fixture
def fresh_database() -> Iterator[str]:
    name = f"{TEST_DB}_{uuid.uuid4().hex[:6]}"
    yield name
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _schema_revision(database: str) -> Any:
    engine = create_engine(f"{PG_SERVER}/{database}")
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()


def test_two_migrations_at_once_through_the_pooler_take_turns(
    pooler: ThrowawayPgBouncer, fresh_database: str
) -> None:
    env = {"DATABASE_URL": pooler.url(fresh_database)}
    runs = [_migrate(env) for _ in range(2)]
    results = [_finish(run) for run in runs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert sum("created the database" in out for _, out, _ in results) == 1
    assert _schema_revision(fresh_database)


def test_migrate_goes_to_database_direct_url_past_the_pooler(
    pooler: ThrowawayPgBouncer, fresh_database: str
) -> None:
    env = {
        "DATABASE_URL": pooler.url(fresh_database),
        "DATABASE_DIRECT_URL": f"{PG_SERVER}/{fresh_database}",
    }
    returncode, _, errors = _finish(_migrate(env))
    assert returncode == 0, errors
    assert _schema_revision(fresh_database)
    assert not [p for p in pooler.show("POOLS") if p["database"] == fresh_database]


def test_the_pooler_budget_is_read_from_its_admin_console(
    pooler: ThrowawayPgBouncer, pooled: tuple[Engine, list[str]]
) -> None:
    engine, _ = pooled
    with db.autocommit(engine) as conn:
        conn.execute(text("SELECT 1"))  # the pooler lists a database once a client used it
    budget = read_pooler_budget(pooler.url(TEST_DB), server_connections=0, connect_timeout_s=2)
    assert budget.server_connections == POOL
    assert 0 <= budget.server_open <= POOL
    assert budget.max_client_conn == pooler.max_client_conn
    assert budget.clients_open is not None and budget.clients_open >= 1  # this engine's
    given = read_pooler_budget(
        "postgresql://x@127.0.0.1:9/d", server_connections=7, connect_timeout_s=2
    )
    assert (given.server_connections, given.source) == (7, "DATABASE_POOLER_SERVER_CONNECTIONS")


def test_a_closed_admin_console_asks_for_the_setting(pooler: ThrowawayPgBouncer) -> None:
    url = pooler.url(TEST_DB).replace("postgres@", "payq_not_a_user@")
    with pytest.raises(ConfigError) as caught:
        read_pooler_budget(url, server_connections=0, connect_timeout_s=2)
    assert "set DATABASE_POOLER_SERVER_CONNECTIONS" in str(caught.value)
    assert "stats_users" in str(caught.value)


SERVER = ConnectionBudget(max_connections=15, reserved=3, already_open=3)  # 9 more


def test_behind_a_pooler_the_pooler_pool_counts_not_the_group_pools() -> None:
    # 3 processes x (4 + 1) = 15 connections: too many for the server directly...
    with pytest.raises(ConfigError):
        check_fleet_fits(3, 4, SERVER)
    # ...but through a pooler of 3 server connections (1 of them open) they fit.
    pooler = PoolerBudget(
        server_connections=3, server_open=1, source="test", max_client_conn=100, clients_open=5
    )
    line = check_pooled_fleet_fits(3, 4, SERVER, pooler)
    assert line == (
        "database connections: 3 processes x (DATABASE_POOL_MAX_CONNECTIONS 4 + 1 for health "
        "checks) = 15 pooler clients, the pooler allows 100 (max_client_conn) - 5 (already "
        "open) = 95 more; the pooler's server pool of 3 (test) may open 2 more; PostgreSQL "
        "allows 15 (max_connections) - 3 (reserved) - 3 (already open) = 9 more"
    )


def test_behind_a_pooler_its_pool_or_its_client_limit_can_refuse_a_group() -> None:
    big = PoolerBudget(server_connections=20, server_open=0, source="test")
    with pytest.raises(ConfigError) as caught:
        check_pooled_fleet_fits(1, 4, SERVER, big)
    assert "server pool of 20 (test) may open 20 more" in str(caught.value)
    assert "lower the pooler's pool_size/max_db_connections" in str(caught.value)
    full = PoolerBudget(
        server_connections=3, server_open=0, source="test", max_client_conn=20, clients_open=10
    )
    with pytest.raises(ConfigError) as caught:
        check_pooled_fleet_fits(3, 4, SERVER, full)
    assert "15 pooler clients, but the pooler allows 20 (max_client_conn) - 10" in str(caught.value)
    assert "raise the pooler's max_client_conn" in str(caught.value)
    unknown = PoolerBudget(
        server_connections=3, server_open=0, source="DATABASE_POOLER_SERVER_CONNECTIONS"
    )
    assert "client limit unknown" in check_pooled_fleet_fits(30, 4, SERVER, unknown)


def test_the_pooler_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(database_pooler_server_connections=3)
    assert str(caught.value).startswith("DATABASE_POOLER_SERVER_CONNECTIONS: is for a pooler")
    with pytest.raises(ConfigError) as caught:
        load_settings(database_pooler="session")
    assert str(caught.value).startswith("DATABASE_POOLER:")
    with pytest.raises(ConfigError) as caught:
        load_settings(database_direct_url="mysql://secret@h/d")
    assert "secret" not in str(caught.value)
    assert load_settings().migration_url == TEST_ENV["DATABASE_URL"]
    direct = "postgresql://postgres@127.0.0.1:5432/payq"
    assert load_settings(database_direct_url=direct).migration_url == direct


def test_a_worker_without_the_setting_stops_at_start_saying_what_to_set(
    pooler: ThrowawayPgBouncer,
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "payq_cli", "worker", "--processes", "1", "--threads", "1"],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", "DATABASE_URL": pooler.url(TEST_DB)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "refused a connection parameter" in result.stderr
    assert "set DATABASE_POOLER=transaction" in result.stderr
    assert time.monotonic() - started < 20  # refused at once, not waited out
