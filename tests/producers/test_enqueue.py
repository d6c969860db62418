"""Enqueueing against real PostgreSQL and Redis: idempotency, transactions, bad input."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from payq.broker import BROKER, make_broker
from payq.db import get_engine, transaction
from payq.errors import ChargeInputError, IdempotencyConflict, RawCardNumberError
from payq.models import charges
from payq.runtime import runtime
from payq.settings import load_settings
from producers import enqueue_charge, enqueue_charges, get_charge
from producers.relay import relay_once
from tests.conftest import NAMESPACE, REDIS_URL
from tests.helpers import unique_key

pytestmark = pytest.mark.usefixtures("clean")


def queued_ids() -> list[str]:
    """Charge ids of the messages waiting in this suite's queue."""
    import json

    client = redis.Redis.from_url(REDIS_URL)
    try:
        payloads = client.hvals(f"{NAMESPACE}:charges.msgs")
        return [json.loads(p)["args"][0] for p in payloads]
    finally:
        client.close()


def row_count() -> int:
    with transaction() as conn:
        return int(conn.execute(select(func.count()).select_from(charges)).scalar_one())


def test_enqueue_writes_the_row_then_publishes_its_id() -> None:
    c = enqueue_charge(1999, "USD", "tok_visa", "order-1", description="d", metadata={"o": "1"})
    assert c.status == "pending" and c.currency == "usd" and c.amount == 1999
    assert queued_ids() == [str(c.id)]
    assert get_charge(c.id) == c


def test_same_key_same_parameters_returns_the_same_charge() -> None:
    first = enqueue_charge(1999, "usd", "tok_visa", "order-2")
    again = enqueue_charge(1999, "usd", "tok_visa", "order-2")
    assert again.id == first.id
    assert row_count() == 1 and queued_ids() == [str(first.id)]


def test_same_key_other_parameters_is_a_conflict_naming_them() -> None:
    first = enqueue_charge(1999, "usd", "tok_visa", "order-3")
    with pytest.raises(IdempotencyConflict, match="amount") as caught:
        enqueue_charge(2999, "usd", "tok_visa", "order-3")
    assert caught.value.charge_id == str(first.id)
    assert row_count() == 1


def test_caller_transaction_commits_charge_with_app_rows() -> None:
    with Session(get_engine()) as session:
        c = enqueue_charge(500, "eur", "tok_visa", "order-4", session=session)
        assert queued_ids() == []  # nothing is published before the commit
        session.commit()
    assert queued_ids() == [str(c.id)]
    assert get_charge(c.id).status == "pending"


def test_caller_transaction_rolled_back_leaves_no_charge_and_no_message() -> None:
    with Session(get_engine()) as session:
        enqueue_charge(500, "eur", "tok_visa", "order-5", session=session)
        session.rollback()
    assert row_count() == 0 and queued_ids() == []


def test_batch_is_one_transaction() -> None:
    made = enqueue_charges(
        [
            {
                "amount": 100 + i,
                "currency": "usd",
                "source": "tok_visa",
                "idempotency_key": f"b-{i}",
            }
            for i in range(50)
        ]
    )
    assert [c.amount for c in made] == [100 + i for i in range(50)]
    assert sorted(queued_ids()) == sorted(str(c.id) for c in made)
    # One bad request refuses the whole batch: nothing more is written.
    with pytest.raises(ChargeInputError):
        enqueue_charges(
            [
                {"amount": 1, "currency": "usd", "source": "tok_visa", "idempotency_key": "b-new"},
                {"amount": -1, "currency": "usd", "source": "tok_visa", "idempotency_key": "b-bad"},
            ]
        )
    assert row_count() == 50


def test_batch_repeating_a_key_returns_existing_and_refuses_conflicts() -> None:
    [a] = enqueue_charges(
        [{"amount": 1, "currency": "usd", "source": "tok_a1", "idempotency_key": "k"}]
    )
    again = enqueue_charges(
        [
            {"amount": 1, "currency": "usd", "source": "tok_a1", "idempotency_key": "k"},
            {"amount": 2, "currency": "usd", "source": "tok_a1", "idempotency_key": "k2"},
        ]
    )
    assert again[0].id == a.id and row_count() == 2
    with pytest.raises(IdempotencyConflict):
        enqueue_charges(
            [{"amount": 9, "currency": "usd", "source": "tok_a1", "idempotency_key": "k"}]
        )


BAD_INPUT: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"amount": 0}, ChargeInputError, "amount: must be between 1"),
    ({"amount": -5}, ChargeInputError, "amount"),
    ({"amount": 19.99}, ChargeInputError, "integer number of minor units"),
    ({"amount": True}, ChargeInputError, "integer"),
    ({"amount": "1999"}, ChargeInputError, "integer"),
    ({"amount": 100_000_000}, ChargeInputError, "at most|between"),
    ({"currency": "usdx"}, ChargeInputError, "ISO 4217"),
    ({"currency": "xyz"}, ChargeInputError, "ISO 4217"),
    ({"source": "4242424242424242"}, RawCardNumberError, "raw card number"),
    ({"source": "4242 4242 4242 4242"}, RawCardNumberError, "never accepts card numbers"),
    ({"source": "4242-4242-4242-4242"}, RawCardNumberError, "raw card number"),
    ({"description": "card 5555 5555 5555 4444"}, RawCardNumberError, "description"),
    ({"metadata": {"note": "378282246310005"}}, RawCardNumberError, "metadata.note"),
    ({"source": "not a token!"}, ChargeInputError, "payment token"),
    ({"source": ""}, ChargeInputError, "source"),
    ({"idempotency_key": ""}, ChargeInputError, "idempotency_key"),
    ({"idempotency_key": "x" * 256}, ChargeInputError, "1-255"),
    ({"idempotency_key": "tab\there"}, ChargeInputError, "printable ASCII"),
    ({"metadata": {"k": 1}}, ChargeInputError, "metadata.k"),
    ({"metadata": {f"k{i}": "v" for i in range(51)}}, ChargeInputError, "at most 50 keys"),
    ({"metadata": {"charge_id": "x"}}, ChargeInputError, "reserved"),
    ({"metadata": ["a"]}, ChargeInputError, "mapping"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_INPUT)
def test_bad_input_is_refused_clearly_and_writes_nothing(
    change: dict[str, Any], error: type[Exception], message: str
) -> None:
    fields: dict[str, Any] = {
        "amount": 1999,
        "currency": "usd",
        "source": "tok_visa",
        "idempotency_key": unique_key("bad"),
        **change,
    }
    with pytest.raises(error, match=message):
        enqueue_charge(**fields)
    assert row_count() == 0 and queued_ids() == []


def test_a_16_digit_number_failing_luhn_is_not_mistaken_for_a_card() -> None:
    c = enqueue_charge(1, "usd", "tok_visa", "order-1234567890123456")
    assert c.idempotency_key == "order-1234567890123456"


def test_redis_down_at_enqueue_keeps_the_charge_and_the_relay_publishes_it() -> None:
    down = make_broker(load_settings(redis_url="redis://127.0.0.1:9/0"))
    with runtime().replaced(BROKER, down):
        c = enqueue_charge(700, "usd", "tok_visa", "order-redis-down")
    assert get_charge(c.id).status == "pending" and queued_ids() == []
    with transaction() as conn:  # let the relay's grace period pass
        conn.execute(text("UPDATE charges SET created_at = now() - interval '1 minute'"))
    result = relay_once()
    assert result.republished == 1 and queued_ids() == [str(c.id)]


def test_caller_savepoint_rolled_back_forgets_only_its_charges() -> None:
    with Session(get_engine()) as session:
        kept = enqueue_charge(500, "eur", "tok_visa", "order-kept", session=session)
        savepoint = session.begin_nested()
        enqueue_charge(600, "eur", "tok_visa", "order-undone", session=session)
        savepoint.rollback()
        assert queued_ids() == []  # nothing before the outer commit, savepoints included
        session.commit()
    assert queued_ids() == [str(kept.id)]
    assert row_count() == 1


def test_refused_batch_in_caller_session_leaves_its_transaction_as_it_was() -> None:
    enqueue_charge(100, "usd", "tok_visa", "taken")
    with Session(get_engine()) as session:
        mine = enqueue_charge(200, "usd", "tok_visa", "mine", session=session)
        with pytest.raises(IdempotencyConflict):
            enqueue_charges(
                [
                    {
                        "amount": 1,
                        "currency": "usd",
                        "source": "tok_visa",
                        "idempotency_key": "new",
                    },
                    {
                        "amount": 999,
                        "currency": "usd",
                        "source": "tok_visa",
                        "idempotency_key": "taken",
                    },
                ],
                session=session,
            )
        session.commit()  # the app carries on after catching the conflict
    with transaction() as conn:
        keys = set(conn.execute(select(charges.c.idempotency_key)).scalars())
    assert keys == {"taken", "mine"}
    assert str(mine.id) in queued_ids() and len(queued_ids()) == 2
