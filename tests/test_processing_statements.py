"""The prebuilt claim and record statements: the call's row and the charge's guarded move.

The claim writes the call's row before the call; the record completes it (an upsert by
the call's id in ``WITH``) and moves the charge, guarded by the call id. These tests pin
down that a call whose worker lost the charge mid-call is still recorded, that only the
charge's move is refused, and that its answer, when it is the provider's stored outcome,
settles the charge anyway.
Real PostgreSQL and Redis; the provider is a stand-in that lets another worker take the
charge over while it is being called.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from sqlalchemy import text

from payq.db import transaction
from payq.errors import ProviderError, ProviderUnavailable
from payq.processing import Result, process_charge
from payq.provider import ProviderCharge, ProviderClient
from payq.settings import Settings, load_settings
from producers import enqueue_charge
from tests.helpers import attempts, charge, unique_key


class TakenOverDuringTheCall:
    """A provider call during which the charge's lease ran out and another worker claimed it."""

    def __init__(self, outcome: ProviderCharge | ProviderError) -> None:
        self.outcome = outcome

    def create_charge(self, key: str, body: bytes, **_: object) -> ProviderCharge:
        with transaction() as conn:
            conn.execute(
                text(
                    "UPDATE charges SET attempts = attempts + 1, call_id = gen_random_uuid(), "
                    "lease_expires_at = now() + interval '1 minute' WHERE idempotency_key = :key"
                ),
                {"key": key},
            )
        if isinstance(self.outcome, ProviderError):
            raise self.outcome
        return self.outcome


@pytest.fixture
def settings(clean: None) -> Iterator[Settings]:
    yield load_settings()


def test_a_call_whose_claim_was_taken_over_is_recorded_and_moves_nothing(
    settings: Settings,
) -> None:
    cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id
    outcome = ProviderUnavailable("provider error 503", status=503)
    provider = cast(ProviderClient, TakenOverDuringTheCall(outcome))

    result = process_charge(str(cid), settings=settings, provider=provider)

    assert result is Result.LEASE_LOST
    [attempt] = attempts(cid)
    assert attempt["number"] == 1 and attempt["finished_at"] is not None
    assert (attempt["outcome"], attempt["http_status"], attempt["error_class"]) == (
        "unclear",
        503,
        "provider_unavailable",
    )
    c = charge(cid)  # the new holder's charge, untouched by the late worker
    assert (c.status, c.attempts, c.provider_charge_id, c.last_error) == (
        "processing",
        2,
        None,
        None,
    )
    assert c.lease_expires_at is not None


def test_a_charge_answer_whose_claim_was_taken_over_settles_the_charge(
    settings: Settings,
) -> None:
    cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id
    provider = cast(
        ProviderClient, TakenOverDuringTheCall(ProviderCharge("ch_1", "succeeded", 1999, "usd"))
    )

    assert process_charge(str(cid), settings=settings, provider=provider) is Result.LEASE_LOST

    [attempt] = attempts(cid)
    assert (attempt["outcome"], attempt["http_status"]) == ("succeeded", 200)
    c = charge(cid)  # the other worker's call gets the provider's replay of the same answer
    assert (c.status, c.provider_charge_id, c.lease_expires_at) == ("succeeded", "ch_1", None)
    with transaction() as conn:
        [audit] = conn.execute(text("SELECT actor, action, params FROM operator_actions")).all()
    assert (audit.actor, audit.action) == ("payq", "settle")
    assert audit.params["from"] == "processing" and audit.params["to"] == "succeeded"


def test_the_call_row_written_before_the_call_is_completed_not_copied(
    settings: Settings,
) -> None:
    cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id
    seen: list[list[dict[str, object]]] = []

    class LooksAtItsRow:
        def create_charge(self, key: str, body: bytes, **_: object) -> ProviderCharge:
            seen.append(attempts(cid))  # during the call
            return ProviderCharge("ch_2", "succeeded", 1999, "usd")

    provider = cast(ProviderClient, LooksAtItsRow())
    assert process_charge(str(cid), settings=settings, provider=provider) is Result.SUCCEEDED

    [[during]] = seen
    assert (during["outcome"], during["finished_at"]) == ("in_flight", None)
    [after] = attempts(cid)
    assert after["call_id"] == during["call_id"] and after["outcome"] == "succeeded"
    assert after["finished_at"] is not None and after["latency_ms"] is not None
    assert charge(cid).status == "succeeded"
