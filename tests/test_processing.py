"""One attempt at a time, in-process, against real PostgreSQL, Redis and the simulator."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from payq.db import transaction
from payq.processing import Result, UnknownCharge, process_charge
from payq.provider import ProviderClient
from payq.settings import Settings, load_settings
from producers import enqueue_charge
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim, attempts, charge, unique_key, wait_until


class Harness:
    def __init__(self, sim: Sim, settings: Settings) -> None:
        self.sim = sim
        self.settings = settings
        self.provider = ProviderClient(settings)

    def enqueue(self, source: str = "tok_visa", **kw: Any) -> uuid.UUID:
        key = kw.pop("idempotency_key", unique_key("order"))
        return enqueue_charge(1999, "usd", source, key, **kw).id

    def run(self, charge_id: uuid.UUID, message_id: str | None = None) -> Result:
        return process_charge(
            str(charge_id), message_id=message_id, settings=self.settings, provider=self.provider
        )

    def make_due(self, charge_id: uuid.UUID) -> None:
        with transaction() as conn:
            conn.execute(
                text("UPDATE charges SET next_attempt_at = now() WHERE id = :id"), {"id": charge_id}
            )


@pytest.fixture
def h(clean: None) -> Iterator[Harness]:
    with SimulatorThread(api_key=API_KEY) as thread:
        harness = Harness(Sim(thread.url), load_settings(payment_provider_url=thread.url))
        yield harness
        harness.provider.close()


def test_success_records_the_provider_charge(h: Harness) -> None:
    cid = h.enqueue()
    assert h.run(cid) is Result.SUCCEEDED
    c = charge(cid)
    assert c.status == "succeeded" and c.provider_charge_id and c.attempts == 1
    [a] = attempts(cid)
    assert a["outcome"] == "succeeded" and a["http_status"] == 200 and a["latency_ms"] >= 0


def test_decline_is_failed_final_not_retried(h: Harness) -> None:
    cid = h.enqueue(source="tok_chargeDeclined")
    assert h.run(cid) is Result.FAILED
    c = charge(cid)
    assert (c.status, c.decline_code, c.dead_reason) == ("failed", "card_declined", None)
    assert h.run(cid) is Result.SKIPPED  # a second delivery does nothing
    assert h.sim.stats()["requests"] == 1


@pytest.mark.parametrize(
    ("step", "error_class"),
    [
        ("invalid_request", "invalid_request"),
        ("auth", "authentication_failed"),
        ("key_reused", "idempotency_key_reused"),
    ],
)
def test_final_errors_go_dead_at_once_with_the_reason(
    h: Harness, step: str, error_class: str
) -> None:
    h.sim.faults(script=[step])
    cid = h.enqueue()
    assert h.run(cid) is Result.DEAD
    c = charge(cid)
    assert c.status == "dead" and c.attempts == 1
    assert c.dead_reason and c.dead_reason.startswith(error_class)
    assert [a["error_class"] for a in attempts(cid)] == [error_class]


@pytest.mark.parametrize(
    "step", ["error", "rate_limit", "key_in_use", "timeout", "reset", "bad_body"]
)
def test_retryable_outcomes_schedule_a_retry_then_succeed(h: Harness, step: str) -> None:
    h.sim.faults(script=[step], timeout_delay_s=3)
    cid = h.enqueue()
    assert h.run(cid) is Result.RETRYING
    c = charge(cid)
    assert c.status == "retrying" and c.next_attempt_at is not None and c.last_error_class
    h.make_due(cid)
    assert h.run(cid) is Result.SUCCEEDED
    assert [a["number"] for a in attempts(cid)] == [1, 2]
    assert h.sim.stats()["duplicate_charges"] == 0
    # Both attempts reached the provider under the charge's own key.
    assert len(h.sim.requests(charge(cid).idempotency_key)) == 2


def test_retry_is_not_taken_before_it_is_due(h: Harness) -> None:
    h.sim.faults(script=["rate_limit"], retry_after_s=30)
    cid = h.enqueue()
    assert h.run(cid) is Result.RETRYING
    c = charge(cid)
    wait_s = (c.next_attempt_at - c.updated_at).total_seconds()  # type: ignore[operator]
    assert wait_s >= 30, f"Retry-After 30 s, retry scheduled after {wait_s:.1f} s"
    assert h.run(cid) is Result.SKIPPED  # a stray delivery does not call early
    assert len(h.sim.requests(c.idempotency_key)) == 1


def test_attempts_exhausted_go_dead_with_the_whole_history(h: Harness) -> None:
    h.sim.faults(error_rate=1.0)
    cid = h.enqueue()
    results = []
    for _ in range(h.settings.retry_max_attempts):
        results.append(h.run(cid))
        h.make_due(cid)
    assert results == [Result.RETRYING] * (h.settings.retry_max_attempts - 1) + [Result.DEAD]
    c = charge(cid)
    assert c.status == "dead" and c.dead_reason and "attempts exhausted" in c.dead_reason
    history = attempts(cid)
    assert [a["number"] for a in history] == list(range(1, h.settings.retry_max_attempts + 1))
    assert {a["error_class"] for a in history} == {"provider_unavailable"}
    # A 5xx does not say whether it charged: looked up by key before it went dead.
    assert [a["outcome"] for a in attempts(cid, kind="lookup")] == ["not_found"]
    assert c.dead_outcome == "verified_not_charged"
    assert h.run(cid) is Result.SKIPPED


def test_one_message_delivered_twice_at_once_charges_once(h: Harness) -> None:
    h.sim.faults(latency_ms=300)
    cid = h.enqueue()
    results: list[Result] = []
    threads = [threading.Thread(target=lambda: results.append(h.run(cid))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([Result.SUCCEEDED] + [Result.SKIPPED] * 3)
    assert h.sim.stats()["requests"] == 1
    assert charge(cid).attempts == 1


def test_a_worker_whose_lease_ran_out_cannot_overwrite_the_next(h: Harness) -> None:
    h.sim.faults(script=["timeout"], timeout_delay_s=3)
    cid = h.enqueue()
    slow = ProviderClient(
        load_settings(payment_provider_url=h.sim.url, payment_timeout_ms=2500, charge_lease_s=20)
    )
    late: list[Result] = []
    first = threading.Thread(
        target=lambda: late.append(process_charge(str(cid), settings=h.settings, provider=slow))
    )
    first.start()
    time.sleep(0.3)
    with transaction() as conn:  # the first worker looks dead: its lease runs out
        conn.execute(
            text("UPDATE charges SET lease_expires_at = now() - interval '1 s' WHERE id = :id"),
            {"id": cid},
        )
    assert h.run(cid) is Result.SUCCEEDED  # taken over, the provider replays the charge
    first.join()
    slow.close()
    assert late == [Result.LEASE_LOST]
    assert charge(cid).status == "succeeded"
    assert h.sim.stats()["charges"] == 1 and h.sim.stats()["duplicate_charges"] == 0


def _lose_the_claim_mid_call(h: Harness, cid: uuid.UUID) -> list[Result]:
    """Run one attempt and, during its call, put the row back as a PostgreSQL crash leaves
    it when the claim's commit (not durable) had not reached the disk: the claim and the
    call's row written with it are gone."""
    first: list[Result] = []
    worker = threading.Thread(target=lambda: first.append(h.run(cid)))
    worker.start()
    wait_until(lambda: charge(cid).status == "processing", 5, "the charge to be claimed")
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'pending', attempts = 0, lease_expires_at = NULL, "
                "call_id = NULL WHERE id = :id; DELETE FROM charge_attempts WHERE charge_id = :id"
            ),
            {"id": cid},
        )
    worker.join()
    return first


def test_a_claim_lost_in_a_database_crash_keeps_the_record_of_both_calls(h: Harness) -> None:
    """The claim's commit does not wait for the WAL flush, so a PostgreSQL crash during the
    provider call can lose it; the attempt number is then drawn again. Each call keeps
    its own row (they used to share the number, and the second record was dropped)."""
    h.sim.faults(latency_ms=500, script=["error"])
    cid = h.enqueue()
    assert _lose_the_claim_mid_call(h, cid) == [Result.LEASE_LOST]
    assert charge(cid).status == "pending"  # a 503 proves nothing: the row stays as it is
    h.sim.faults(latency_ms=0)
    assert h.run(cid) is Result.SUCCEEDED  # sent again (by the relay): the same key
    calls = attempts(cid)
    assert [(a["number"], a["outcome"]) for a in calls] == [(1, "unclear"), (1, "succeeded")]
    assert len({a["call_id"] for a in calls}) == 2
    # The provider's side: every request it saw has its row.
    assert len(h.sim.requests(charge(cid).idempotency_key)) == len(calls) == 2
    assert h.sim.stats()["charges"] == 1 and h.sim.stats()["duplicate_charges"] == 0


def test_a_charge_from_a_claim_lost_in_a_crash_is_settled_by_its_answer(h: Harness) -> None:
    h.sim.faults(latency_ms=500)
    cid = h.enqueue()
    assert _lose_the_claim_mid_call(h, cid) == [Result.LEASE_LOST]
    c = charge(cid)
    assert c.status == "succeeded" and c.provider_charge_id  # the provider charged it
    assert [a["outcome"] for a in attempts(cid)] == ["succeeded"]  # the call made is on record
    assert h.run(cid) is Result.SKIPPED  # the relay's message finds it settled
    assert h.sim.stats()["charges"] == 1 and h.sim.stats()["requests"] == 1


def test_charge_older_than_key_retention_is_not_sent_again(h: Harness) -> None:
    h.sim.faults(script=["error"])
    cid = h.enqueue()
    assert h.run(cid) is Result.RETRYING
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET created_at = now() - interval '25 hours', "
                "next_attempt_at = now() WHERE id = :id"
            ),
            {"id": cid},
        )
    assert h.run(cid) is Result.DEAD
    c = charge(cid)
    assert c.dead_reason and "retention" in c.dead_reason and c.attempts == 1
    assert len(h.sim.requests(c.idempotency_key)) == 1
    # Its 503 did not say whether it charged, and past the retention a lookup proves nothing.
    assert c.dead_outcome == "unknown" and attempts(cid, kind="lookup") == []


def test_unknown_or_malformed_charge_id_cannot_be_processed(h: Harness) -> None:
    with pytest.raises(UnknownCharge, match="no charge"):
        h.run(uuid.uuid4())
    with pytest.raises(UnknownCharge, match="not a charge id"):
        process_charge("not-a-uuid", settings=h.settings, provider=h.provider)


def test_the_body_is_the_same_on_every_attempt(h: Harness) -> None:
    # The first attempt charges and stores its outcome, then answers too late; the retry
    # is replayed only if its body is byte-for-byte equivalent (else: key_reused, dead).
    h.sim.faults(script=["timeout"], timeout_delay_s=3)
    cid = h.enqueue(description="order 8812", metadata={"order": "8812", "z": "1", "a": "2"})
    assert h.run(cid) is Result.RETRYING
    h.make_due(cid)
    assert h.run(cid) is Result.SUCCEEDED
    requests = h.sim.requests(charge(cid).idempotency_key)
    assert [r["replayed"] for r in requests] == [False, True]
    assert h.sim.stats()["charges"] == 1


def test_an_early_retry_message_is_sent_again_for_when_it_is_due(h: Harness) -> None:
    h.sim.faults(script=["rate_limit"], retry_after_s=30)
    cid = h.enqueue()
    assert h.run(cid) is Result.RETRYING
    scheduled = charge(cid).message_id
    # The scheduled message arriving early (another host's clock) is deferred, not run...
    assert h.run(cid, message_id=scheduled) is Result.DEFERRED
    # ...while any other early message is simply dropped.
    assert h.run(cid, message_id="some-duplicate") is Result.SKIPPED
    assert len(h.sim.requests(charge(cid).idempotency_key)) == 1
