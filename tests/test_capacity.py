"""A worker group that would exceed PostgreSQL's max_connections is refused at start.

The arithmetic is unit-tested as the operator reads it; the budget is read from real
servers (the suite's, and private throwaway ones whose connections the test controls);
`payq worker` is run as a process to see that it refuses before anything starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import psycopg2
import pytest
import redis
from sqlalchemy import create_engine, text

from devservices import ThrowawayPostgres
from payq.capacity import ConnectionBudget, check_fleet_fits, read_connection_budget
from payq.errors import ConfigError, ServiceUnavailable
from tests.conftest import NAMESPACE, PG_SERVER, REDIS_URL, TEST_DB, TEST_ENV

BUDGET = ConnectionBudget(max_connections=100, reserved=3, already_open=12)  # 85 left


def test_a_fleet_that_fits_exactly_passes_with_the_budget_to_log() -> None:
    # 5 x (16 + 1) = 85: every slot used, none exceeded.
    line = check_fleet_fits(5, 16, BUDGET)
    assert line == (
        "database connections: 5 processes x (DATABASE_POOL_MAX_CONNECTIONS 16 + 1 for health "
        "checks) = 85 connections; PostgreSQL allows 100 (max_connections) - 3 (reserved) - "
        "12 (already open) = 85 more"
    )


def test_one_connection_too_many_is_refused_with_the_arithmetic_and_what_to_change() -> None:
    with pytest.raises(ConfigError) as refused:
        check_fleet_fits(4, 30, BUDGET)
    assert str(refused.value) == (
        "4 processes x (DATABASE_POOL_MAX_CONNECTIONS 30 + 1 for health checks) = 124 "
        "connections, but PostgreSQL allows 100 (max_connections) - 3 (reserved) - 12 "
        "(already open) = 85 more; lower --processes/WORKER_PROCESSES or "
        "DATABASE_POOL_MAX_CONNECTIONS, or raise max_connections"
    )
    with pytest.raises(ConfigError, match=r"^1 process x .* = 86 connections, but"):
        check_fleet_fits(1, 85, BUDGET)


def test_superusers_in_the_reserved_slots_show_as_a_negative_balance_not_a_wrong_sum() -> None:
    full = ConnectionBudget(max_connections=10, reserved=3, already_open=9)
    with pytest.raises(ConfigError, match=r"- 9 \(already open\) = -2 more;"):
        check_fleet_fits(1, 1, full)


def _show(setting: str) -> int:
    engine = create_engine(f"{PG_SERVER}/postgres")
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SHOW {setting}")).scalar_one())
    finally:
        engine.dispose()


def test_the_budget_is_the_servers_own_settings() -> None:
    budget = read_connection_budget(f"{PG_SERVER}/postgres", connect_timeout_s=2, wait_s=0)
    assert budget.max_connections == _show("max_connections")
    reserved = _show("superuser_reserved_connections")
    if _show("server_version_num") >= 160000:
        reserved += _show("reserved_connections")
    assert budget.reserved == reserved
    assert 0 <= budget.already_open < budget.max_connections


@pytest.fixture
def private_postgres() -> Iterator[ThrowawayPostgres]:
    """A server nobody else uses, so the test knows every connection it has."""
    server = ThrowawayPostgres(max_connections=8)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_already_open_counts_other_clients_and_not_the_check_itself(
    private_postgres: ThrowawayPostgres,
) -> None:
    dsn = private_postgres.dsn()
    assert read_connection_budget(dsn, connect_timeout_s=2, wait_s=0) == ConnectionBudget(
        max_connections=8, reserved=3, already_open=0
    )
    held = [psycopg2.connect(dsn.replace("+psycopg2", "")) for _ in range(2)]
    try:
        budget = read_connection_budget(dsn, connect_timeout_s=2, wait_s=0)
        assert budget.already_open == 2 and budget.available == 3
    finally:
        for conn in held:
            conn.close()


def test_a_server_with_no_slot_left_is_a_refusal_not_a_wait(
    private_postgres: ThrowawayPostgres,
) -> None:
    dsn = private_postgres.dsn()
    held = [psycopg2.connect(dsn.replace("+psycopg2", "")) for _ in range(8)]  # superuser: all
    try:
        with pytest.raises(ConfigError, match=r"too many clients.*max_connections is used up"):
            read_connection_budget(dsn, connect_timeout_s=2, wait_s=30)
    finally:
        for conn in held:
            conn.close()


def test_a_server_that_does_not_answer_says_what_to_start_and_keeps_the_password() -> None:
    url = "postgresql+psycopg2://payq:hunter2secret@127.0.0.1:9/payq"
    with pytest.raises(ServiceUnavailable) as unavailable:
        read_connection_budget(url, connect_timeout_s=1, wait_s=0)
    message = str(unavailable.value)
    assert "start it or check DATABASE_URL" in message and "hunter2secret" not in message


def test_a_server_that_answers_and_denies_the_user_is_a_refusal_not_a_wait() -> None:
    """Reproduced before: an unknown user was retried for the whole wait, then said as
    "did not accept a connection ... start it" (exit 3), though README promises such a
    refusal in one line, exit 2, never as "did not answer"."""
    url = f"{PG_SERVER.replace('postgres@', 'payq_no_such_role@')}/{TEST_DB}"
    with pytest.raises(ConfigError, match=r"the user DATABASE_URL names does not exist"):
        read_connection_budget(url, connect_timeout_s=2, wait_s=30)


def payq_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq_cli", "worker", *args],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_payq_worker_refuses_a_fleet_over_the_real_max_connections(database: str) -> None:
    max_connections = _show("max_connections")
    pool = min(max_connections, 1000)  # the setting's own bound
    processes = max_connections // pool + 1  # more than max_connections, whatever is open
    result = payq_worker(
        "--processes", str(processes), DATABASE_POOL_MAX_CONNECTIONS=str(pool), WORKER_THREADS="2"
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    needed = processes * (pool + 1)
    match = re.fullmatch(
        rf"payq: {processes} processes x \(DATABASE_POOL_MAX_CONNECTIONS {pool} \+ 1 for "
        rf"health checks\) = {needed} connections, but PostgreSQL allows {max_connections} "
        r"\(max_connections\) - (\d+) \(reserved\) - (\d+) \(already open\) = (-?\d+) more; "
        r"lower --processes/WORKER_PROCESSES or DATABASE_POOL_MAX_CONNECTIONS, "
        r"or raise max_connections",
        lines[0],
    )
    assert match, lines[0]
    reserved, already_open, more = map(int, match.groups())
    assert reserved >= _show("superuser_reserved_connections")
    assert more == max_connections - reserved - already_open
    assert TEST_ENV["DATABASE_URL"] not in result.stderr

    # Nothing was started: no Dramatiq, no worker report, no worker connection.
    assert "Dramatiq" not in result.stdout + result.stderr
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not list(client.scan_iter(match=f"{NAMESPACE}:payq:workers:*"))
    finally:
        client.close()
    engine = create_engine(f"{PG_SERVER}/postgres")
    try:
        with engine.connect() as conn:
            workers = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
                    "AND application_name LIKE 'payq-worker%'"
                ),
                {"db": TEST_DB},
            ).scalar_one()
    finally:
        engine.dispose()
    assert workers == 0


def test_payq_worker_without_postgres_exits_3_saying_what_to_start() -> None:
    result = payq_worker(
        "--processes",
        "1",
        "--wait",
        "0",
        DATABASE_URL="postgresql+psycopg2://payq:hunter2secret@127.0.0.1:9/payq",
    )
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("payq: PostgreSQL did not accept a connection at DATABASE_URL")
    assert "start it or check DATABASE_URL" in line and "hunter2secret" not in line
