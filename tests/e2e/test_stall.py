"""End to end: a worker group frozen past its lease with calls in flight, then thawed.

A VM pause or CPU throttling freezes a whole worker process while its requests are out.
The other group takes its charges over; when the frozen one thaws, its late answers still
settle the charges they belong to, and it serves again. Asserted from the provider's side:
its books, its counters, its request log.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from payq.constants import FINAL_STATUSES
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim, attempts, charge, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


def enqueue(n: int, prefix: str) -> list[uuid.UUID]:
    tag = uuid.uuid4().hex[:6]
    made = enqueue_charges(
        [
            {"amount": 100 + i, "currency": "usd", "source": "tok_visa",
             "idempotency_key": f"{prefix}-{tag}-{''.join(chr(97 + int(d)) for d in str(i))}"}
            for i in range(n)
        ]
    )  # fmt: skip
    return [c.id for c in made]


def all_final(ids: list[uuid.UUID]) -> bool:
    return all(charge(cid).status in FINAL_STATUSES for cid in ids)


def books_agree(sim: Sim, ids: list[uuid.UUID]) -> None:
    """The provider's books and payq's agree on every charge, and every request it saw
    has its row in payq."""
    books = {b["idempotency_key"]: b for b in httpx.get(f"{sim.url}/_charges").json()}
    for cid in ids:
        c = charge(cid)
        book = books.get(c.idempotency_key)
        if book is not None and book["status"] == "succeeded":
            assert (c.status, c.provider_charge_id) == ("succeeded", book["id"]), c
        elif book is not None:
            assert c.status == "failed", c
        else:
            assert c.status != "succeeded", c
        assert len(sim.requests(c.idempotency_key)) <= len(attempts(cid)), c
    assert sim.stats()["duplicate_charges"] == 0


def test_a_group_frozen_past_its_lease_is_taken_over_then_serves_again(sim: Sim) -> None:
    sim.faults(latency_ms=1500)  # calls are long: the freeze catches them in flight
    env = {
        "PAYMENT_PROVIDER_URL": sim.url,
        "PAYMENT_TIMEOUT_MS": "2500",
        "CHARGE_LEASE_S": "10",
        "RETRY_MAX_ATTEMPTS": "2",  # small: charges can run out of attempts meanwhile
    }
    with (
        PayqProcess("relay", env=env),
        PayqProcess("worker", "--processes", "1", "--threads", "2", env=env) as frozen,
    ):
        assert frozen.proc is not None
        wait_until(lambda: "ready for action" in frozen.output(), 30, "the group to start")
        first = enqueue(2, "stall")
        wait_until(lambda: sim.stats()["in_flight"] >= 2, 10, "both calls to be in flight")
        os.killpg(frozen.proc.pid, signal.SIGSTOP)
        try:
            with PayqProcess("worker", "--processes", "1", "--threads", "2", env=env):
                # The other group takes the charges over once the frozen leases run out.
                wait_until(lambda: all_final(first), 40, "the charges to be taken over")
                other_done = True
            time.sleep(1.0)
        finally:
            os.killpg(frozen.proc.pid, signal.SIGCONT)
        assert other_done
        # The thawed group's late answers are recorded; then it alone serves new charges.
        sim.faults(latency_ms=50)
        later = enqueue(4, "thawed")
        wait_until(lambda: all_final(later), 30, "the thawed group to serve new charges")
        assert frozen.proc.poll() is None, frozen.output()[-3000:]
        # Nothing was thrown into its threads when it thawed (Dramatiq's time limit did,
        # inside httpx, redis-py and SQLAlchemy, and left calls unrecorded or wedged).
        assert "TimeLimitExceeded" not in frozen.output()
    ids = first + later
    # The frozen group's calls were taken over (marked abandoned); once thawed, it heard
    # their answers and recorded each one: no call is left without its outcome.
    outcomes = [a["outcome"] for cid in ids for a in attempts(cid)]
    assert "in_flight" not in outcomes and "abandoned" not in outcomes, outcomes
    books_agree(sim, ids)
