"""End to end: PostgreSQL goes away mid-run and comes back; nothing is lost, doubled or
marked dead because the database blinked.

A throwaway PostgreSQL of the test's own (free port, temporary directory), so stopping it
disturbs nothing else on the machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select

from devservices import ThrowawayPostgres
from payq.db import ENGINE, make_engine, transaction
from payq.models import charges
from payq.runtime import runtime
from payq.settings import load_settings
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, TEST_ENV
from tests.helpers import Sim, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


@pytest.fixture
def pg() -> Iterator[tuple[ThrowawayPostgres, str, Engine]]:
    with ThrowawayPostgres() as server:
        dsn = server.create_database("payq_restart")
        subprocess.run(
            [sys.executable, "-m", "payq_cli", "migrate"],
            env={**TEST_ENV, "DATABASE_URL": dsn, "PATH": "/usr/bin:/bin"},
            check=True,
            capture_output=True,
            timeout=60,
        )
        engine = make_engine(load_settings(database_url=dsn))
        yield server, dsn, engine
        engine.dispose()


def by_status(engine: Engine) -> dict[str, int]:
    with transaction(engine) as conn:
        rows = conn.execute(select(charges.c.status, func.count()).group_by(charges.c.status))
        return {status: count for status, count in rows}


def test_a_postgres_restart_mid_run_loses_doubles_and_kills_nothing(
    pg: tuple[ThrowawayPostgres, str, Engine],
) -> None:
    server, dsn, engine = pg
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=400)
        with runtime().replaced(ENGINE, engine):  # enqueue into it
            tag = uuid.uuid4().hex[:6]
            enqueue_charges(
                [
                    {
                        "amount": 100 + i,
                        "currency": "usd",
                        "source": "tok_visa",
                        "idempotency_key": f"pg-{tag}-{i}",
                    }
                    for i in range(40)
                ]
            )
        env = {"DATABASE_URL": dsn, "PAYMENT_PROVIDER_URL": sim.url}
        worker = PayqProcess("worker", "--processes", "1", "--threads", "4", env=env)
        with worker, PayqProcess("relay", env=env):
            wait_until(lambda: sim.stats()["in_flight"] >= 2, 30, "calls in flight")
            server.stop(keep_data=True)  # the database goes away under running calls...
            time.sleep(2)
            server.start()  # ...and comes back on the same port with the same data
            wait_until(
                lambda: by_status(engine).get("succeeded") == 40,
                90,
                "every charge to succeed after the restart",
            )
            log = worker.output()
        stats = sim.stats()
    assert by_status(engine) == {"succeeded": 40}  # none dead, none stuck
    assert stats["charges"] == 40 and stats["duplicate_charges"] == 0
    # The blink was seen, and ridden out rather than failed.
    assert "database unavailable" in log
