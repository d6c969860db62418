"""End to end: SIGTERM drains a worker group.

What a deploy or a scale-down does to a running group (compose, Kubernetes and
supervisors send SIGTERM to its first process, the ``dramatiq`` master). The calls in
flight run to their end or their deadline and are recorded; the messages the group had
prefetched go back to the queue at once, not after Dramatiq's heartbeat timeout; a
second group, with no relay to help it, then finishes every charge, each charged once.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from payq.constants import FINAL_STATUSES, QUEUE_NAME
from payq.db import transaction
from payq.models import charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, NAMESPACE, REDIS_URL
from tests.e2e.test_workers import all_final, enqueue
from tests.helpers import Sim, attempts, charge, statuses, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PAYMENT_TIMEOUT_MS = 3000  # each call's deadline: the longest a drain waits for one call
ENV = {
    "PAYMENT_TIMEOUT_MS": str(PAYMENT_TIMEOUT_MS),
    # Over one attempt's worst case, 3 + 2 x (1.5 + 2) s, as the settings require.
    "CHARGE_LEASE_S": "15",
}
# After the calls: Dramatiq's 1 s polls in the worker process, its consumers and master.
DRAIN_MARGIN_S = 4.0
THREADS = 2  # so 2 calls in flight and 2 x 2 messages prefetched (Dramatiq's default)
CHARGES = 12


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


def with_status(status: str) -> set[uuid.UUID]:
    with transaction() as conn:
        return set(conn.scalars(select(charges.c.id).where(charges.c.status == status)))


def held_by_workers(client: redis.Redis) -> int:
    """Messages some worker fetched and never acked: what a lost prefetch looks like."""
    return sum(int(client.scard(key)) for key in client.scan_iter(match=f"{NAMESPACE}:__acks__.*"))


@dataclass
class Drain:
    returncode: int
    drain_s: float
    output: str
    command: list[str]  # the dramatiq master's command line
    in_flight: set[uuid.UUID]  # charges whose provider call was under way at SIGTERM


def terminate_mid_call(sim: Sim, env: dict[str, str], *, whole_group: bool) -> Drain:
    """Start a group, wait until every thread is in a provider call, SIGTERM it."""
    client = redis.Redis.from_url(REDIS_URL)
    worker = PayqProcess("worker", "--processes", "1", "--threads", str(THREADS), env=env)
    worker.start()
    try:
        wait_until(lambda: sim.stats()["in_flight"] == THREADS, 30, "every thread to be calling")
        in_flight = with_status("processing")
        assert len(in_flight) == THREADS
        assert held_by_workers(client) > THREADS, "nothing was prefetched"
        assert worker.proc is not None
        pid = worker.proc.pid  # `payq worker` execs the dramatiq master: same pid
        command = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        if whole_group:
            # What signalling the process group does, without its race: the worker
            # processes get the signal, then the master's own copy of it.
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                os.kill(int(child), signal.SIGTERM)
            time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        signalled = time.monotonic()
        returncode = worker.proc.wait(timeout=60)
        drain_s = time.monotonic() - signalled
        return Drain(returncode, drain_s, worker.output(), command, in_flight)
    finally:
        client.close()
        worker.stop()
        worker.log_path.unlink(missing_ok=True)


def assert_drained(drain: Drain, ids: list[uuid.UUID], in_flight_end: set[str]) -> None:
    assert drain.returncode == 0, drain.output[-3000:]
    assert "Killing worker process" not in drain.output
    bound_s = PAYMENT_TIMEOUT_MS / 1000 + DRAIN_MARGIN_S
    assert drain.drain_s < bound_s, f"drain took {drain.drain_s:.1f} s"
    # The calls in flight ended and were recorded; no charge is left mid-attempt.
    assert not with_status("processing")
    for cid in drain.in_flight:
        c = charge(cid)
        assert c.status in in_flight_end and c.lease_expires_at is None
        assert c.attempts == len(attempts(cid)) == 1
    # Nothing else was started, and every message is back where a worker finds it:
    # none held by the stopped group, one per charge still to do.
    not_started = set(ids) - drain.in_flight
    assert with_status("pending") == not_started
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert held_by_workers(client) == 0
        assert client.llen(f"{NAMESPACE}:{QUEUE_NAME}") == len(not_started)
        assert client.llen(f"{NAMESPACE}:{QUEUE_NAME}.DQ") == len(with_status("retrying"))
    finally:
        client.close()


@pytest.mark.parametrize(
    ("faults", "in_flight_end"),
    [
        ({"latency_ms": 1500}, {"succeeded"}),
        # The provider charges, then answers after the deadline: the calls are cut at
        # PAYMENT_TIMEOUT_MS and recorded as retrying, outcome unknown.
        ({"timeout_rate": 1.0, "timeout_delay_s": 6}, {"retrying"}),
    ],
    ids=["calls-finish", "calls-cut-at-deadline"],
)
def test_sigterm_finishes_calls_in_flight_and_loses_nothing_prefetched(
    sim: Sim, faults: dict[str, Any], in_flight_end: set[str]
) -> None:
    sim.faults(**faults)
    env = {**ENV, "PAYMENT_PROVIDER_URL": sim.url}
    ids = enqueue(CHARGES, "drain")
    drain = terminate_mid_call(sim, env, whole_group=False)  # as compose and Kubernetes do
    print(f"drain after SIGTERM ({', '.join(in_flight_end)}): {drain.drain_s:.1f} s")

    assert "database connections: 1 process x" in drain.output  # the start-time check passed
    # Dramatiq's 10 min default is cut to one attempt's worst case, 3 + 2 x (1.5 + 2) s.
    timeout_at = drain.command.index("--worker-shutdown-timeout")
    assert drain.command[timeout_at + 1] == "10000"
    assert_drained(drain, ids, in_flight_end)

    # A new group (no relay: nothing waits for a lease or a heartbeat) finishes them all.
    sim.faults(timeout_rate=0, latency_ms=50)
    with PayqProcess("worker", "--processes", "1", "--threads", "4", env=env):
        wait_until(lambda: all_final(ids), 30, "every charge to end final")
    assert statuses() == {"succeeded": CHARGES}
    stats = sim.stats()
    assert stats["duplicate_charges"] == 0 and stats["charges"] == CHARGES
    final = [charge(cid) for cid in ids]
    assert all(c.status in FINAL_STATUSES for c in final)
    assert len({c.provider_charge_id for c in final if c.provider_charge_id}) == CHARGES
    for cid in drain.in_flight:  # sent again with the same key: answered with the first charge
        requests = sim.requests(charge(cid).idempotency_key)
        assert requests[-1]["status"] == 200 and all(r["replayed"] for r in requests[1:])


def test_sigterm_to_the_whole_process_group_drains_too(sim: Sim) -> None:
    sim.faults(latency_ms=1500)
    ids = enqueue(CHARGES, "drain-group")
    drain = terminate_mid_call(sim, {**ENV, "PAYMENT_PROVIDER_URL": sim.url}, whole_group=True)
    print(f"drain after SIGTERM to the group: {drain.drain_s:.1f} s, exit {drain.returncode}")
    assert_drained(drain, ids, {"succeeded"})
