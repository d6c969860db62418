"""From the provider's side: a worker frozen (SIGSTOP, a VM pause) while its request is
at the provider. Nobody renews its fleet slot while it is frozen, yet another process may
not take the room while the frozen request can still be served: the provider never
counts more calls at once than ``PAYMENT_MAX_CONCURRENCY``.

Before the fix, a request could leave with 1.7-5 s of its slot's lease left and run
``PAYMENT_TIMEOUT_MS`` (5 s) at the provider: the provider served 2 calls at once with a
limit of 1. Now a slot's lease covers a call from the latest moment its request may leave
(``payq.gate.ProviderGate.confirm``, ``slot_lease_s``). The default settings; three
threads per process, so slots are kept between calls; a slow provider (4.8 s, the incident
payq exists for); several freezes, each caught with a request out.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis

from payq.constants import redis_key
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, NAMESPACE, REDIS_URL
from tests.e2e.test_takeover import enqueue, held_by_group
from tests.helpers import Sim, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

LATENCY_S = 4.8
TIMEOUT_S = 5.0  # PAYMENT_TIMEOUT_MS, the default
ENV = {
    "PAYMENT_MAX_CONCURRENCY": "1",
    "PAYMENT_TIMEOUT_MS": "5000",  # the defaults
    "FLEET_SLOT_LEASE_S": "5",
    "CHARGE_LEASE_S": "30",
    "RETRY_BACKOFF_MIN_S": "1",
    "RELAY_INTERVAL_S": "1",
    "RELAY_STALE_AFTER_S": "30",
    "HEALTH_CHECK_INTERVAL_S": "3600",
}


FREEZES = 3


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=LATENCY_S * 1000)
        yield sim


def slot_left_s(client: redis.Redis) -> float | None:
    """Seconds until the fleet's one slot lapses in Redis (None: no slot held)."""
    held = client.zrange(redis_key(NAMESPACE, "fleet", "slots"), 0, 0, withscores=True)
    if not held:
        return None
    sec, usec = client.time()
    return float(held[0][1]) / 1000 - (sec + usec / 1e6)


def new_call(sim: Sim, seen: int) -> bool:
    stats = sim.stats()
    return bool(stats["in_flight"] == 1 and stats["requests"] > seen)


def test_a_frozen_workers_call_still_counts_against_the_fleet_limit(sim: Sim) -> None:
    env = {**ENV, "PAYMENT_PROVIDER_URL": sim.url}
    client = redis.Redis.from_url(REDIS_URL)
    lefts: list[float] = []
    with (
        PayqProcess("relay", env=env),
        PayqProcess("worker", "--processes", "1", "--threads", "3", env=env) as first,
        PayqProcess("worker", "--processes", "1", "--threads", "3", env=env) as other,
    ):
        for group in (first, other):
            wait_until(lambda g=group: "ready for action" in g.output(), 30, "a group to start")
        ids = enqueue(30, "frozen-slot")
        seen = 0
        while len(lefts) < FREEZES:
            wait_until(lambda s=seen: new_call(sim, s), 30, "a new call in flight")
            seen = sim.stats()["requests"]
            sent_at = time.monotonic()
            group = next(
                (g for g in (first, other) if g.proc is not None and held_by_group(g.proc.pid)),
                None,
            )
            left = slot_left_s(client)
            if group is None or group.proc is None or left is None:
                continue
            os.killpg(group.proc.pid, signal.SIGSTOP)
            try:  # past the frozen call's end at the provider, the other group calling
                time.sleep(max(0.0, sent_at + LATENCY_S + 1.0 - time.monotonic()))
            finally:
                os.killpg(group.proc.pid, signal.SIGCONT)
            lefts.append(left)
        stats = sim.stats()
    assert ids and stats["duplicate_charges"] == 0
    assert stats["max_in_flight"] <= 1, (
        f"the provider served {stats['max_in_flight']} calls at once, the fleet limit is 1: "
        f"{stats.get('peak')}; the slots had {lefts} s left when their calls were seen"
    )
    # The mechanism, for every call caught: seen at the provider, its slot still had more
    # than the call's whole timeout to run (before the fix: 1.7-5 s, whatever the timeout).
    assert min(lefts) > TIMEOUT_S, f"slots with less than {TIMEOUT_S} s left: {lefts}"
