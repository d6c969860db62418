"""Test tiers share one rule: real PostgreSQL, real Redis, the simulator over HTTP.

The suite uses a database of its own (``payq_test_<pid>``, dropped at the end) and a
Redis namespace of its own; it never flushes, stops or restarts the machine's
servers. A service that does not answer fails the suite with what to start.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from devservices import DevServiceError, postgres_or_throwaway, redis_or_throwaway

TEST_DB = f"payq_test_{os.getpid()}"
PG_SERVER = os.environ.get("PAYQ_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("PAYQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _start_missing_services() -> list[str]:
    """Where a configured server does not answer, start a throwaway one if we can.

    Returns what is still missing, with what to start; the suite then stops there.
    """
    global PG_SERVER, REDIS_URL
    missing = []
    try:
        if pg := postgres_or_throwaway(f"{PG_SERVER}/postgres"):
            PG_SERVER = f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}"
            print(f"PostgreSQL did not answer: the suite uses a throwaway server at {PG_SERVER}")
    except DevServiceError as exc:
        missing.append(
            f"PostgreSQL does not answer at {PG_SERVER} and none can be started ({exc}): "
            "start it (pg_ctlcluster --skip-systemctl-redirect 15 main start) or set "
            "PAYQ_TEST_POSTGRES"
        )
    try:
        if throwaway := redis_or_throwaway(REDIS_URL):
            REDIS_URL = throwaway.url
            print(f"Redis did not answer: the suite uses a throwaway server at {REDIS_URL}")
    except DevServiceError as exc:
        missing.append(
            f"Redis does not answer at {REDIS_URL} and none can be started ({exc}): start it "
            "(redis-server --daemonize yes --bind 127.0.0.1) or set PAYQ_TEST_REDIS_URL"
        )
    return missing


MISSING = _start_missing_services()
NAMESPACE = f"payq-test-{uuid.uuid4().hex[:8]}"
API_KEY = "sk_test_" + uuid.uuid4().hex

# Settings are read from the environment once per process: set them before payq loads.
TEST_ENV = {
    "DATABASE_URL": f"{PG_SERVER}/{TEST_DB}",
    "REDIS_URL": REDIS_URL,
    "PAYQ_NAMESPACE": NAMESPACE,
    "PAYMENT_PROVIDER_API_KEY": API_KEY,
    "PAYMENT_PROVIDER_URL": "http://127.0.0.1:9",  # each test points at its own simulator
    "PAYMENT_TIMEOUT_MS": "1500",
    "PAYMENT_CONNECT_TIMEOUT_MS": "500",
    "DB_TIMEOUT_MS": "1500",
    "DB_STATEMENT_TIMEOUT_MS": "2000",
    "CHARGE_LEASE_S": "9",
    "RETRY_MAX_ATTEMPTS": "4",
    "RETRY_BACKOFF_MIN_S": "0.2",
    "RETRY_BACKOFF_MAX_S": "1",
    "RELAY_INTERVAL_S": "0.2",
    "RELAY_STALE_AFTER_S": "1",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "console",
    "METRICS_PORT": "0",  # tests that want metrics pick a free port
}
os.environ.update(TEST_ENV)


def pytest_sessionstart(session: pytest.Session) -> None:
    if MISSING:
        pytest.exit("the test suite needs real services:\n  " + "\n  ".join(MISSING), returncode=3)


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """The suite's own database, migrated, dropped at the end."""
    from sqlalchemy import create_engine, text

    from devservices import ensure_database
    from payq.db import get_engine, reset_engine
    from payq.migrate import migrate

    ensure_database(TEST_ENV["DATABASE_URL"])
    migrate(get_engine())
    yield TEST_ENV["DATABASE_URL"]
    reset_engine()
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)'))
    admin.dispose()


def _clear_namespace(*, settle: bool = True) -> None:
    import redis

    from payq.gate import ProviderGate
    from payq.settings import load_settings

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{NAMESPACE}:*", count=1000))
    if keys:
        client.delete(*keys)
    if settle:
        # Nothing runs between tests: the fleet limit need not wait for slots to re-register.
        ProviderGate(client, load_settings(payq_namespace=NAMESPACE)).fleet.mark_settled()
    client.close()


@pytest.fixture
def clean(database: str) -> Iterator[None]:
    """Empty tables and an empty Redis namespace for one test."""
    from sqlalchemy import text

    from payq.db import transaction

    with transaction() as conn:
        conn.execute(text("TRUNCATE charge_attempts, charges, operator_actions, dashboard_actions"))
    _give_back_kept_slots()
    _clear_namespace()
    yield
    _give_back_kept_slots()
    _clear_namespace()


def _give_back_kept_slots() -> None:
    """The suite's process keeps fleet slots between calls (``payq.gate.kept``); wiping
    the namespace under one would make the next test's call find its slot gone (and be
    deferred, rightly, as after a Redis that lost its data). Each test starts with none."""
    from payq.routing import ROUTES
    from payq.runtime import runtime

    routes = runtime().built(ROUTES)
    for route in routes.all if routes is not None else ():
        route.gate.flush()


@pytest.fixture(scope="session", autouse=True)
def _namespace_cleanup() -> Iterator[None]:
    yield
    from payq.routing import ROUTES
    from payq.runtime import runtime

    routes = runtime().built(ROUTES)
    for route in routes.all if routes is not None else ():
        route.gate.stop_keeping()  # its renewal would write the fleet's epoch back
        route.gate.fleet.stop_renewing(wait_s=5)
    _clear_namespace(settle=False)  # the shared Redis keeps nothing of this run
