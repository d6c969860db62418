"""End to end: a worker group killed (SIGKILL) or frozen (SIGSTOP) with calls in flight,
under the default lease (30 s): its charges are final again well before the lease would
have run out, and none is charged twice. Redis going away takes nobody's charges over.
Asserted from the provider's side: its books and counters."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import text

from devservices import ThrowawayRedis
from payq.constants import FINAL_STATUSES
from payq.db import transaction
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim, attempts, charge, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

#: The defaults that matter here: a whole lease, a whole provider timeout.
ENV = {
    "CHARGE_LEASE_S": "30",
    "PAYMENT_TIMEOUT_MS": "5000",
    "RETRY_BACKOFF_MIN_S": "1",
    "RETRY_BACKOFF_MAX_S": "300",
    "RELAY_INTERVAL_S": "1",
    "RELAY_STALE_AFTER_S": "30",
}
#: Well before the lease: the kill's takeover is proven within TAKEOVER_AFTER_S (3 s).
BOUND_S = 15.0


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


def enqueue(n: int, prefix: str) -> list[uuid.UUID]:
    tag = uuid.uuid4().hex[:6]
    made = enqueue_charges(
        [
            {"amount": 100 + i, "currency": "usd", "source": "tok_visa",
             "idempotency_key": f"{prefix}-{tag}-{i}"}
            for i in range(n)
        ]
    )  # fmt: skip
    return [c.id for c in made]


def all_final(ids: list[uuid.UUID]) -> bool:
    return all(charge(cid).status in FINAL_STATUSES for cid in ids)


def held_by_group(pgid: int) -> list[uuid.UUID]:
    """Charges in ``processing`` claimed by a process of the group ``pgid``."""
    with transaction() as conn:
        rows = conn.execute(
            text(
                "SELECT id, holder FROM charges WHERE status = 'processing' AND holder IS NOT NULL"
            )
        ).all()
    held = []
    for cid, holder in rows:
        pid = int(holder.split(":")[-2])
        try:
            if os.getpgid(pid) == pgid:
                held.append(cid)
        except ProcessLookupError:
            continue
    return held


def books_agree(sim: Sim, ids: list[uuid.UUID]) -> None:
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
    stats = sim.stats()
    assert stats["duplicate_charges"] == 0
    assert stats["charges"] == sum(1 for cid in ids if charge(cid).status == "succeeded")


@contextmanager
def two_groups_with_calls_in_flight(
    sim: Sim, env: dict[str, str]
) -> Iterator[tuple[PayqProcess, list[uuid.UUID], list[uuid.UUID]]]:
    """A relay and two worker groups; yields the first group, its charges in flight, and
    every charge."""
    with (
        PayqProcess("relay", env=env),
        PayqProcess("worker", "--processes", "1", "--threads", "3", env=env) as first,
        PayqProcess("worker", "--processes", "1", "--threads", "3", env=env) as other,
    ):
        for group in (first, other):
            wait_until(lambda g=group: "ready for action" in g.output(), 30, "a group to start")
        assert first.proc is not None
        # Each group prefetches twice its threads: enough charges for both to have some.
        ids = enqueue(12, "takeover")
        in_flight = wait_until(
            lambda: held_by_group(first.proc.pid), 15, "the first group to claim charges"
        )
        time.sleep(0.5)  # their requests are out
        yield first, in_flight, ids


def test_a_killed_groups_charges_are_final_well_before_their_lease(sim: Sim) -> None:
    sim.faults(latency_ms=3000)  # long calls: the kill catches them in flight
    env = {**ENV, "PAYMENT_PROVIDER_URL": sim.url}
    with two_groups_with_calls_in_flight(sim, env) as (first, in_flight, ids):
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: all_final(in_flight), BOUND_S, "the killed group's charges to end")
        took_s = time.monotonic() - killed_at
        # What it had fetched but not started is back on the queue in the same pass, not
        # after RELAY_DEAD_WORKER_S (15 s): every charge is final well before.
        wait_until(lambda: all_final(ids), 25, "every charge to end final")
        all_s = time.monotonic() - killed_at
    assert took_s < BOUND_S, took_s
    print(f"every charge final {all_s:.1f} s after")
    print(f"final again {took_s:.1f} s after")
    for cid in in_flight:
        assert charge(cid).attempts >= 2  # taken over: a second claim
        assert "abandoned" in [a["outcome"] for a in attempts(cid)]
    books_agree(sim, ids)


def test_a_frozen_group_is_taken_over_and_its_late_answers_still_count(sim: Sim) -> None:
    sim.faults(latency_ms=3000)
    env = {**ENV, "PAYMENT_PROVIDER_URL": sim.url}
    with two_groups_with_calls_in_flight(sim, env) as (first, in_flight, ids):
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            wait_until(lambda: all_final(in_flight), BOUND_S, "the frozen group's charges")
            took_s = time.monotonic() - frozen_at
        finally:
            os.killpg(first.proc.pid, signal.SIGCONT)
        wait_until(lambda: all_final(ids), 30, "every charge to end final")
        # Thawed, it hears its calls' answers and records each one.
        wait_until(
            lambda: all(a["outcome"] not in ("in_flight", "abandoned")
                        for cid in in_flight for a in attempts(cid)),
            20,
            "the thawed group to record its late answers",
        )  # fmt: skip
        assert first.proc.poll() is None, first.output()[-3000:]
    assert took_s < BOUND_S, took_s
    print(f"final again {took_s:.1f} s after")
    books_agree(sim, ids)


def test_redis_not_answering_takes_nobodys_charges_over(sim: Sim) -> None:
    """Redis stops answering (frozen) for longer than TAKEOVER_AFTER_S, keeping its data:
    every worker was silent, which proves nothing; each charge is claimed once."""
    sim.faults(latency_ms=3000)
    with ThrowawayRedis() as server:
        # This process publishes to the suite's Redis: the relay sends the charges to
        # this one a second later, as messages lost.
        env = {
            **ENV,
            "PAYMENT_PROVIDER_URL": sim.url,
            "REDIS_URL": server.url,
            "RELAY_STALE_AFTER_S": "1",
        }
        with (
            PayqProcess("relay", env=env) as relay,
            PayqProcess("worker", "--processes", "1", "--threads", "3", env=env) as group,
        ):
            wait_until(lambda: "ready for action" in group.output(), 30, "the group to start")
            ids = enqueue(3, "redis-away")
            wait_until(lambda: sim.stats()["in_flight"] >= 3, 15, "calls in flight")
            assert server._proc is not None
            os.kill(server._proc.pid, signal.SIGSTOP)
            try:
                time.sleep(5)  # longer than TAKEOVER_AFTER_S: everyone is silent
            finally:
                os.kill(server._proc.pid, signal.SIGCONT)
            wait_until(lambda: all_final(ids), 40, "every charge to end final")
            time.sleep(4)  # a takeover would have come by now
            assert "taken over" not in relay.output()
    for cid in ids:
        assert charge(cid).attempts == 1, attempts(cid)
    books_agree(sim, ids)
