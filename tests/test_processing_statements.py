"""The prebuilt recording statement: the attempt's row and the charge's guarded move.

Both are one statement (an INSERT in ``WITH``, then the guarded UPDATE), so these tests
pin down what the two separate statements did before: an attempt whose worker lost the
charge mid-call is still recorded, and only the charge's move is refused.
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

    def create_charge(self, key: str, body: bytes) -> ProviderCharge:
        with transaction() as conn:
            conn.execute(
                text(
                    "UPDATE charges SET attempts = attempts + 1, "
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


@pytest.mark.parametrize(
    ("outcome", "recorded"),
    [
        (ProviderCharge("ch_1", "succeeded", 1999, "usd"), ("succeeded", 200, None)),
        (
            ProviderUnavailable("provider error 503", status=503),
            ("no_charge", 503, "provider_unavailable"),
        ),
    ],
)
def test_an_attempt_whose_lease_was_lost_is_recorded_but_moves_nothing(
    settings: Settings,
    outcome: ProviderCharge | ProviderError,
    recorded: tuple[str, int, str | None],
) -> None:
    cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id
    provider = cast(ProviderClient, TakenOverDuringTheCall(outcome))

    result = process_charge(str(cid), settings=settings, provider=provider)

    assert result is Result.LEASE_LOST
    [attempt] = attempts(cid)
    assert attempt["number"] == 1
    assert (attempt["outcome"], attempt["http_status"], attempt["error_class"]) == recorded
    c = charge(cid)  # the new holder's charge, untouched by the late worker
    assert (c.status, c.attempts, c.provider_charge_id, c.last_error) == (
        "processing",
        2,
        None,
        None,
    )
    assert c.lease_expires_at is not None


def test_recording_the_same_attempt_twice_keeps_the_first_row(settings: Settings) -> None:
    # A retry of the record step after a commit whose answer was lost finds its row there.
    cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id
    with transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO charge_attempts (charge_id, number, started_at, finished_at, "
                "outcome, latency_ms) VALUES (:id, 1, now(), now(), 'no_answer', 7)"
            ),
            {"id": cid},
        )
    provider = cast(ProviderClient, _Succeeds())

    assert process_charge(str(cid), settings=settings, provider=provider) is Result.SUCCEEDED

    [attempt] = attempts(cid)
    assert (attempt["outcome"], attempt["latency_ms"]) == ("no_answer", 7)
    assert charge(cid).status == "succeeded"


class _Succeeds:
    def create_charge(self, key: str, body: bytes) -> ProviderCharge:
        return ProviderCharge("ch_2", "succeeded", 1999, "usd")
