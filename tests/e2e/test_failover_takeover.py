"""From the provider's side: a Redis failover must not make live workers look dead.

The primary stops answering without closing its connections (SIGSTOP: a host that hangs
or a network cut, not a crash), the sentinels promote the replica, and the old primary
comes back as a replica. Every client waits out its socket timeout on the old primary
before it asks the sentinels again, each at its own moment. The takeover's gap rule
(``payq.liveness``) must keep that from proving anyone dead: with no fault at the
provider, each charge's key reaches the provider in exactly one request, and the relay
takes nothing over.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from devservices import free_port
from devservices.sentinel import ThrowawaySentinels
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.e2e.test_workers import all_final, enqueue
from tests.helpers import Sim, charge, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

MASTER = "payq-e2e-freeze"
MAX_CONCURRENCY = 4


@pytest.fixture
def sentinels() -> Iterator[ThrowawaySentinels]:
    with ThrowawaySentinels(MASTER) as setup:
        yield setup


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=1000)  # calls in flight across the failover
        yield sim


def freeze_primary(sentinels: ThrowawaySentinels) -> tuple[int, int]:
    """SIGSTOP the current primary; its port and pid."""
    port = sentinels.primary_port()
    node = next(n for n in sentinels.nodes if n.port == port)
    assert node.pid is not None
    os.kill(node.pid, signal.SIGSTOP)
    return port, node.pid


def test_a_hung_primary_failing_over_takes_no_live_workers_charges_over(
    sentinels: ThrowawaySentinels, sim: Sim
) -> None:
    env = {
        "PAYMENT_PROVIDER_URL": sim.url,
        "PAYMENT_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # the sentinels say where
        "REDIS_SENTINELS": sentinels.sentinel_list,
        "REDIS_SENTINEL_MASTER": MASTER,
        "RETRY_MAX_ATTEMPTS": "12",
        "HEALTH_CHECK_INTERVAL_S": "3600",
        # The defaults that matter here: a whole lease, a whole provider timeout.
        "CHARGE_LEASE_S": "30",
        "PAYMENT_TIMEOUT_MS": "5000",
        "RETRY_BACKOFF_MIN_S": "1",
        "RELAY_INTERVAL_S": "1",
        "RELAY_STALE_AFTER_S": "30",
    }
    with (
        PayqProcess("worker", "--processes", "2", "--threads", "2", env=env) as workers,
        PayqProcess("relay", env=env) as relay,
    ):
        wait_until(lambda: "ready for action" in workers.output(), 30, "the workers to start")
        ids = _enqueue_through_sentinel(env)
        wait_until(lambda: sim.stats()["in_flight"] >= 2, 30, "calls in flight")
        old, pid = freeze_primary(sentinels)
        try:
            sentinels.wait_for_promotion(old)
        finally:
            os.kill(pid, signal.SIGCONT)  # comes back, and is demoted to a replica
        wait_until(lambda: all_final(ids), 120, "every charge to end final")
        time.sleep(3)  # a late takeover would be logged by now
        relay_log = relay.output()
    stats = sim.stats()
    assert stats["duplicate_charges"] == 0
    assert stats["max_in_flight"] <= MAX_CONCURRENCY, stats
    taken = [
        line for line in relay_log.splitlines() if "taken over" in line or "proven dead" in line
    ]
    twice = {}
    for cid in ids:
        key = charge(cid).idempotency_key
        posts = sim.requests(key)
        if len(posts) != 1:
            twice[key] = posts
    assert not taken and not twice, (taken, twice)


def _enqueue_through_sentinel(env: dict[str, str]) -> list:
    from payq.broker import BROKER, make_broker
    from payq.runtime import runtime
    from payq.settings import load_settings

    settings = load_settings(
        redis_url=env["REDIS_URL"],
        redis_sentinels=env["REDIS_SENTINELS"],
        redis_sentinel_master=MASTER,
    )
    with runtime().replaced(BROKER, make_broker(settings)):
        return enqueue(40, "hung-primary")
