"""End to end: the Redis primary dies under load, Sentinel promotes its replica, and the
fleet carries on.

Workers, the relay and the producer (this process) reach Redis only through three
sentinels (``REDIS_SENTINELS``; ``REDIS_URL`` points where nothing listens). Mid-run
the primary is SIGKILLed; about two seconds later the sentinels promote the replica and
every client follows. Whatever the last writes before the crash held (messages, fleet
slots, breaker counts) may be missing on the new primary: the relay publishes again any
charge whose message is lost (the charge row is the truth), and the new primary's
fleet epoch begins afresh, so no slot is granted until the calls in flight have put
theirs back. Then every charge ends final, none is charged twice, the provider never
sees more calls at once than the fleet limit, and a provider outage after the failover
still opens the breaker, which stops every call until it half-opens.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from devservices import free_port
from devservices.sentinel import ThrowawaySentinels
from payq.broker import BROKER, make_broker
from payq.gate import BreakerState, ProviderGate
from payq.redis_client import redis_client
from payq.runtime import runtime
from payq.settings import Settings, load_settings
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.e2e.test_stall import books_agree
from tests.e2e.test_workers import all_final, enqueue
from tests.helpers import Sim, statuses, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

MASTER = "payq-e2e"
MAX_CONCURRENCY = 4
BREAKER_OPEN_S = 3
TOTAL = 300
FLEET = {
    "PAYMENT_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "BREAKER_MIN_CALLS": "6",
    "BREAKER_WINDOW_S": "2",
    "BREAKER_OPEN_S": str(BREAKER_OPEN_S),
    "RETRY_MAX_ATTEMPTS": "12",  # the failover and the outage must not make charges dead
    "HEALTH_CHECK_INTERVAL_S": "3600",  # no provider lookups from the health checks
    "REDIS_SENTINEL_MASTER": MASTER,
}
STARTING = "fleet slots are being registered"


@pytest.fixture
def sentinels() -> Iterator[ThrowawaySentinels]:
    with ThrowawaySentinels(MASTER) as setup:
        yield setup


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=40)
        yield sim


def fleet_settings(sentinels: ThrowawaySentinels) -> Settings:
    return load_settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # not used: the sentinels say where
        redis_sentinels=sentinels.sentinel_list,
        redis_sentinel_master=MASTER,
        payment_max_concurrency=MAX_CONCURRENCY,
        breaker_window_s=int(FLEET["BREAKER_WINDOW_S"]),
    )


class Producer(threading.Thread):
    """Enqueues ``total`` charges in small batches, through Sentinel, failover or not."""

    def __init__(self, total: int) -> None:
        super().__init__(name="producer", daemon=True)
        self.total = total
        self.ids: list[uuid.UUID] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while len(self.ids) < self.total:
                self.ids += enqueue(10, "failover")
                time.sleep(0.05)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_the_fleet_carries_on_through_a_sentinel_failover(
    sentinels: ThrowawaySentinels, sim: Sim
) -> None:
    started = time.monotonic()
    settings = fleet_settings(sentinels)
    env = {
        **FLEET,
        "PAYMENT_PROVIDER_URL": sim.url,
        "REDIS_URL": settings.redis_url,
        "REDIS_SENTINELS": sentinels.sentinel_list,
    }
    reader_client = redis_client(settings, socket_timeout_s=1, connect_timeout_s=1)
    reader = ProviderGate(reader_client, settings)  # reads only: it holds no slot
    reader.fleet.mark_settled()  # a new system: no calls in flight, no grace at first
    with ExitStack() as stack:
        stack.enter_context(runtime().replaced(BROKER, make_broker(settings)))
        workers = stack.enter_context(
            PayqProcess("worker", "--processes", "2", "--threads", "3", env=env)
        )
        relay = stack.enter_context(PayqProcess("relay", env=env))

        # 1. Load, and the primary killed in the middle of it.
        producer = Producer(TOTAL)
        producer.start()
        load_at = time.monotonic()
        wait_until(lambda: sim.stats()["charges"] >= 60, 60, "60 charges to go through")
        before_kill = sim.stats()["charges"]
        killed_at, mark = time.monotonic(), len(workers.output())
        old = sentinels.kill_primary()
        new = sentinels.wait_for_promotion(old)
        promoted_s = time.monotonic() - killed_at
        producer.join(60)
        assert producer.error is None and len(producer.ids) == TOTAL, producer.error
        enqueued_s = time.monotonic() - killed_at
        wait_until(lambda: all_final(producer.ids), 120, "every charge to end final")
        failover_s = time.monotonic() - killed_at
        republished = re.findall(r"relay published (\d+) charges again", relay.output())
        stats = sim.stats()
        assert before_kill < TOTAL, "the primary died after the load: no failover under load"
        assert statuses() == {"succeeded": TOTAL}
        assert stats["charges"] == TOTAL and stats["duplicate_charges"] == 0
        assert stats["max_in_flight"] <= MAX_CONCURRENCY, (
            f"{stats['max_in_flight']} provider calls at once, PAYMENT_MAX_CONCURRENCY="
            f"{MAX_CONCURRENCY}: {stats.get('max_in_flight_requests')}"
        )
        # The new primary began the fleet's epoch afresh: its own server wrote it.
        marker = reader_client.get(reader.fleet.epoch_key)
        assert marker is not None
        assert marker.split()[1].decode() == reader_client.info("server")["run_id"]
        assert reader_client.info("server")["tcp_port"] == new
        after_kill = workers.output()[mark:]
        starting_deferrals = after_kill.count(STARTING)
        # Every consumer thread reconnected; none died (a dead delay-queue consumer would
        # leave its process's deferred charges to the relay for good).
        assert "Exception in thread" not in after_kill, after_kill[-3000:]

        # 2. A provider outage after the failover opens the breaker, which holds.
        outage_at = time.monotonic()
        sim.faults(outage_s=60)
        outage_ids = enqueue(40, "outage")
        wait_until(lambda: reader.breaker.snapshot().state is BreakerState.OPEN, 30, "the breaker")
        sim.faults(outage_s=0)  # back; the fleet learns it from its probes
        wait_until(lambda: reader.fleet.in_use() == 0, 5, "calls admitted before it opened")
        frozen = sim.stats()["charge_requests"]
        snap = reader.breaker.snapshot()
        assert snap.state is BreakerState.OPEN, "the breaker half-opened too soon to watch it"

        def still_open() -> bool:
            calls = sim.stats()["charge_requests"]  # first the count, then the state
            if reader.breaker.snapshot().state is not BreakerState.OPEN:
                return True
            assert calls == frozen, f"{calls - frozen} provider calls while the breaker was open"
            return False

        wait_until(still_open, BREAKER_OPEN_S + 10, "the breaker to half-open")
        wait_until(lambda: all_final(outage_ids), 60, "the outage's charges to end final")
        assert reader.breaker.snapshot().state is BreakerState.CLOSED
        outage_s = time.monotonic() - outage_at

    total = TOTAL + len(outage_ids)
    stats = sim.stats()
    assert statuses() == {"succeeded": total}
    assert stats["charges"] == total and stats["duplicate_charges"] == 0
    assert stats["max_in_flight"] <= MAX_CONCURRENCY
    books_agree(sim, [*producer.ids, *outage_ids])
    reader_client.close()
    print(
        f"sentinel failover: primary :{old} killed {killed_at - load_at:.1f} s into the load, "
        f"after {before_kill} of {TOTAL} charges; :{new} promoted in {promoted_s:.1f} s; all "
        f"enqueued {enqueued_s:.1f} s and all final {failover_s:.1f} s after the kill; relay "
        f"published again {sum(map(int, republished))} charges; max_in_flight "
        f"{stats['max_in_flight']}/{MAX_CONCURRENCY}; {starting_deferrals} deferrals for the "
        f"new epoch's grace; outage: breaker opened and held, all final in {outage_s:.1f} s; "
        f"{time.monotonic() - started:.1f} s in all"
    )
