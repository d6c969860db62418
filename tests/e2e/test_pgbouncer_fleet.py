"""End to end: a whole payq fleet through a real PgBouncer in transaction mode.

Every part talks to PostgreSQL through the pooler (``DATABASE_POOLER=transaction``):
`payq serve` takes the charges, `payq relay` publishes again the ones whose messages
were lost, three worker processes of four threads claim, call and record them, and the
operators' commands read the result; only `payq migrate` goes past the pooler
(``DATABASE_DIRECT_URL``). The workers' pools alone add up to 3 x (4 + 1) = 15 client
connections, five times the pooler's server pool of 3. Sampled through the run,
PostgreSQL never holds more than 3 connections to the fleet's database; every charge
ends final, and the simulator's books show none charged twice.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg2
import pytest

from devservices import free_port
from devservices.pgbouncer import ThrowawayPgBouncer
from payq.constants import FINAL_STATUSES
from payq.ops.waiting import wait_for_http
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, PG_SERVER, TEST_DB, TEST_ENV, _clear_namespace
from tests.helpers import Sim, wait_until
from tests.processes import PayqProcess
from tests.webapp import INTAKE, OPERATOR

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

SERVER_POOL = 3  # PgBouncer's default_pool_size (and max_db_connections)
PROCESSES, THREADS, DB_POOL = 3, 4, 4
LOST = 40  # charges whose messages are lost before any worker runs: the relay's
CHARGES = 300
SAMPLER = "payq-fleet-test-sampler"  # the test's own direct connections, left out


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=30, error_rate=0.1, rate_limit_rate=0.02, retry_after_s=1, seed=16)
        yield sim


@pytest.fixture
def fleet_database() -> Iterator[str]:
    """A database of the fleet's own: every connection to it is the pooler's or ours."""
    name = f"{TEST_DB}_pgbouncer"
    yield name
    conn = _direct("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def _direct(database: str) -> psycopg2.extensions.connection:
    url = PG_SERVER.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(f"{url}/{database}", application_name=SAMPLER)
    conn.autocommit = True
    return conn


class Sampler(threading.Thread):
    """Counts the server connections to the fleet's database every 20 ms, two ways:
    PostgreSQL's ``pg_stat_activity`` and PgBouncer's ``SHOW POOLS``."""

    def __init__(self, database: str, pooler: ThrowawayPgBouncer) -> None:
        super().__init__(daemon=True)
        self.database, self.pooler = database, pooler
        self.stop = threading.Event()
        self.max_backends = self.max_pooled = self.max_clients = self.samples = 0

    def run(self) -> None:
        conn = _direct(self.database)
        try:
            while not self.stop.wait(0.02):
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name <> %s",
                        (SAMPLER,),
                    )
                    self.max_backends = max(self.max_backends, cur.fetchone()[0])
                pools = [p for p in self.pooler.show("POOLS") if p["database"] == self.database]
                self.max_pooled = max(
                    self.max_pooled, self.pooler.server_connections(self.database)
                )
                clients = sum(p["cl_active"] + p["cl_waiting"] for p in pools)
                self.max_clients = max(self.max_clients, clients)
                self.samples += 1
        finally:
            conn.close()


def _not_final(database: str) -> int:
    conn = _direct(database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM charges WHERE NOT status = ANY(%s)",
                ([str(s) for s in FINAL_STATUSES],),
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def _statuses(database: str) -> dict[str, int]:
    conn = _direct(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM charges GROUP BY status")
            return {status: count for status, count in cur.fetchall()}
    finally:
        conn.close()


def _payq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq_cli", *args],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _post(base: str, n: int, prefix: str) -> list[str]:
    ids = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {INTAKE}"}) as client:
        for i in range(n):
            body = {"amount": 100 + i, "currency": "usd", "source": "tok_visa"}
            made = client.post(
                "/v1/charges", json=body, headers={"Idempotency-Key": f"{prefix}-{i}"}, timeout=10
            )
            assert made.status_code == 201, made.text
            ids.append(made.json()["id"])
    return ids


def test_a_fleet_through_pgbouncer_never_passes_its_server_pool(
    sim: Sim, fleet_database: str
) -> None:
    started = time.monotonic()
    with ThrowawayPgBouncer(f"{PG_SERVER}/postgres", pool_size=SERVER_POOL) as pooler:
        env = {
            "DATABASE_URL": pooler.url(fleet_database),
            "DATABASE_POOLER": "transaction",
            "DATABASE_DIRECT_URL": f"{PG_SERVER}/{fleet_database}",
            "DATABASE_POOL_MAX_CONNECTIONS": str(DB_POOL),
            "PAYMENT_POOL_MAX_CONNECTIONS": str(DB_POOL),
            "PAYMENT_PROVIDER_URL": sim.url,
            "PAYMENT_MAX_CONCURRENCY": str(PROCESSES * THREADS),
            "RETRY_MAX_ATTEMPTS": "8",
            "PAYQ_API_TOKENS": INTAKE,
            "PAYQ_OPERATOR_TOKENS": OPERATOR,
            "SERVE_RATE_LIMIT_PER_S": "100000",  # the test posts as fast as serve answers
        }
        migrated = _payq(env, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        sampler = Sampler(fleet_database, pooler)
        sampler.start()
        try:
            port = free_port()
            with PayqProcess("serve", "--port", str(port), env=env) as serve:
                base = f"http://127.0.0.1:{port}"
                wait_for_http(f"{base}/healthz", timeout_s=30)
                # Taken in, then their messages lost (Redis wiped): only the relay sends them.
                lost = _post(base, LOST, f"lost-{uuid.uuid4().hex[:6]}")
                _clear_namespace()
                fleet = (
                    ("worker", "--processes", str(PROCESSES), "--threads", str(THREADS)),
                    ("relay",),
                )
                with (
                    PayqProcess(*fleet[0], env=env) as workers,
                    PayqProcess(*fleet[1], env=env) as relay,
                ):
                    run_from = time.monotonic()
                    ids = lost + _post(base, CHARGES - LOST, f"fleet-{uuid.uuid4().hex[:6]}")
                    wait_until(lambda: _not_final(fleet_database) == 0, 120, "every charge final")
                    run_s = time.monotonic() - run_from
                    found = httpx.get(
                        f"{base}/v1/charges/{ids[0]}",
                        headers={"Authorization": f"Bearer {INTAKE}"},
                        timeout=10,
                    )
                    assert found.status_code == 200 and found.json()["status"] in FINAL_STATUSES
                    status = _payq(env, "status")
                    dlq = _payq(env, "dlq", "list")
                    worker_log, relay_log = workers.output(), relay.output()
                serve_log = serve.output()
        finally:
            sampler.stop.set()
            sampler.join()

    assert status.returncode == 0, status.stdout + status.stderr
    assert dlq.returncode == 0, dlq.stdout + dlq.stderr
    # The start-time check counted the pooler's pool, read from its admin console.
    assert (
        f"{PROCESSES} processes x (DATABASE_POOL_MAX_CONNECTIONS {DB_POOL} + 1 for health "
        f"checks) = {PROCESSES * (DB_POOL + 1)} pooler clients" in worker_log
    )
    assert f"the pooler's server pool of {SERVER_POOL} (the pooler's SHOW DATABASES)" in worker_log
    assert "relay published" in relay_log
    for log in worker_log, relay_log, serve_log:
        assert "prepared statements vanish" not in log
        assert "Traceback" not in log

    # Never more server connections than the pooler's pool, though the clients were more.
    assert sampler.samples > 50
    assert 0 < sampler.max_backends <= SERVER_POOL, sampler.max_backends
    assert 0 < sampler.max_pooled <= SERVER_POOL, sampler.max_pooled
    assert sampler.max_clients > SERVER_POOL

    counts = _statuses(fleet_database)
    stats = sim.stats()
    assert sum(counts.values()) == CHARGES
    assert set(counts) <= {str(s) for s in FINAL_STATUSES}
    assert stats["duplicate_charges"] == 0
    assert stats["charges"] == counts.get("succeeded", 0) > 0
    print(
        f"pgbouncer fleet: {CHARGES} charges ({LOST} sent by the relay) final in {run_s:.1f} s "
        f"({CHARGES / run_s:.0f}/s), {counts}; server connections at most "
        f"{sampler.max_backends} (pg_stat_activity) / {sampler.max_pooled} (SHOW POOLS) of a "
        f"pool of {SERVER_POOL}, pooler clients up to {sampler.max_clients} of "
        f"{PROCESSES * (DB_POOL + 1)} worker connections, {sampler.samples} samples; "
        f"{time.monotonic() - started:.1f} s"
    )
