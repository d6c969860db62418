"""Unit tests for ``payq.validation``: charge checks at the door, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from payq.errors import ChargeInputError, RawCardNumberError
from payq.validation import (
    DESCRIPTION_MAX_CHARS,
    METADATA_MAX_BYTES,
    METADATA_MAX_KEY_CHARS,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    ChargeRequest,
    validate_charge,
)

MAX_AMOUNT = 99_999_999


def charge(**changes: Any) -> ChargeRequest:
    kwargs: dict[str, Any] = {
        "amount": 1999,
        "currency": "usd",
        "source": "tok_visa",
        "idempotency_key": "order-42",
        "max_amount": MAX_AMOUNT,
    }
    kwargs.update(changes)
    return validate_charge(**kwargs)


# --- validate_charge ---------------------------------------------------------------------


def test_valid_charge_is_returned_normalised() -> None:
    request = charge(
        currency="USD", description="Order 42", metadata={"order_id": "42", "plan": "pro"}
    )
    assert request == ChargeRequest(
        amount=1999,
        currency="usd",
        source="tok_visa",
        idempotency_key="order-42",
        description="Order 42",
        metadata={"order_id": "42", "plan": "pro"},
    )


@pytest.mark.parametrize("currency", ["USD", "usd", "Usd", "EUR", "jpy"])
def test_currency_is_lower_cased(currency: str) -> None:
    assert charge(currency=currency).currency == currency.lower()


def test_missing_metadata_becomes_empty_mapping() -> None:
    assert charge().metadata == {}
    assert charge(metadata=None).metadata == {}


@pytest.mark.parametrize(
    "changes",
    [
        {"amount": 1},
        {"amount": MAX_AMOUNT},
        {"amount": 500, "max_amount": 500},
        {"source": "tok"},
        {"source": "t" * 255},
        {"source": "pm_card.visa:abc-1_2"},
        {"idempotency_key": "k"},
        {"idempotency_key": "~" * 255},
        {"idempotency_key": "order 42 / retry #1"},
        {"description": "d" * DESCRIPTION_MAX_CHARS},
        {"metadata": {f"k{i}": "v" for i in range(METADATA_MAX_KEYS)}},
        {"metadata": {"k" * METADATA_MAX_KEY_CHARS: "v" * METADATA_MAX_VALUE_CHARS}},
        {"metadata": {"order_id": "4242424242424241"}},  # Luhn-invalid: not a card
    ],
)
def test_values_at_the_limits_are_accepted(changes: dict[str, Any]) -> None:
    request = charge(**changes)
    for name, value in changes.items():
        if name != "max_amount":
            assert getattr(request, name) == value


def metadata_of_encoded_size(size: int) -> dict[str, str]:
    """Metadata whose JSON encoding is exactly ``size`` characters, each value <= 500."""
    keys = [f"k{i:02}" for i in range(METADATA_MAX_KEYS)]
    remaining = size - len(json.dumps(dict.fromkeys(keys, "")))
    metadata = {}
    for key in keys:
        take = min(remaining, METADATA_MAX_VALUE_CHARS)
        metadata[key] = "v" * take
        remaining -= take
    assert remaining == 0
    assert len(json.dumps(metadata)) == size
    return metadata


def test_metadata_encoding_limit_is_inclusive() -> None:
    at_limit = metadata_of_encoded_size(METADATA_MAX_BYTES)
    assert charge(metadata=at_limit).metadata == at_limit
    with pytest.raises(ChargeInputError, match=str(METADATA_MAX_BYTES)) as info:
        charge(metadata=metadata_of_encoded_size(METADATA_MAX_BYTES + 1))
    assert info.value.field == "metadata"


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({"amount": "1999"}, "amount", "integer"),
        ({"amount": 19.99}, "amount", "integer"),
        ({"amount": True}, "amount", "integer"),
        ({"amount": None}, "amount", "integer"),
        ({"amount": 0}, "amount", f"between 1 and {MAX_AMOUNT}"),
        ({"amount": -100}, "amount", "between 1"),
        ({"amount": MAX_AMOUNT + 1}, "amount", f"between 1 and {MAX_AMOUNT}"),
        ({"amount": 501, "max_amount": 500}, "amount", "between 1 and 500"),
        ({"currency": "xyz"}, "currency", "ISO 4217"),
        ({"currency": "US"}, "currency", "ISO 4217"),
        ({"currency": " usd"}, "currency", "ISO 4217"),
        ({"currency": None}, "currency", "ISO 4217"),
        ({"currency": 840}, "currency", "ISO 4217"),
        ({"source": None}, "source", "token"),
        ({"source": 42}, "source", "token"),
        ({"source": "tk"}, "source", "3-255"),
        ({"source": "t" * 256}, "source", "3-255"),
        ({"source": "tok visa"}, "source", "token"),
        ({"source": "tok/visa"}, "source", "token"),
        ({"idempotency_key": ""}, "idempotency_key", "1-255"),
        ({"idempotency_key": "k" * 256}, "idempotency_key", "1-255"),
        ({"idempotency_key": "order\x0042"}, "idempotency_key", "printable ASCII"),
        ({"idempotency_key": "order\t42"}, "idempotency_key", "printable ASCII"),
        ({"idempotency_key": "commande-é"}, "idempotency_key", "printable ASCII"),
        ({"idempotency_key": None}, "idempotency_key", "1-255"),
        ({"idempotency_key": 42}, "idempotency_key", "1-255"),
        ({"description": 42}, "description", "string"),
        ({"description": "d" * (DESCRIPTION_MAX_CHARS + 1)}, "description", "1000"),
        ({"metadata": "order=42"}, "metadata", "mapping"),
        ({"metadata": [("order", "42")]}, "metadata", "mapping"),
        (
            {"metadata": {f"k{i}": "v" for i in range(METADATA_MAX_KEYS + 1)}},
            "metadata",
            str(METADATA_MAX_KEYS),
        ),
        ({"metadata": {"": "v"}}, "metadata", "keys"),
        ({"metadata": {"k" * (METADATA_MAX_KEY_CHARS + 1): "v"}}, "metadata", "keys"),
        ({"metadata": {42: "v"}}, "metadata", "keys"),
        ({"metadata": {"charge_id": "x"}}, "metadata", "reserved"),
        ({"metadata": {"order": 42}}, "metadata.order", "string"),
        ({"metadata": {"order": None}}, "metadata.order", "string"),
        (
            {"metadata": {"note": "v" * (METADATA_MAX_VALUE_CHARS + 1)}},
            "metadata.note",
            str(METADATA_MAX_VALUE_CHARS),
        ),
    ],
)
def test_every_refusal_names_its_field(changes: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ChargeInputError) as info:
        charge(**changes)
    assert type(info.value) is ChargeInputError
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"source": "tok_visa\n"}, "source"), ({"idempotency_key": "order-42\n"}, "idempotency_key")],
)
def test_trailing_newline_is_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ChargeInputError) as info:
        charge(**changes)
    assert info.value.field == field


# --- raw card numbers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "pan"),
    [
        ({"source": "4242424242424242"}, "source", "4242424242424242"),
        ({"source": "4242 4242 4242 4242"}, "source", "4242 4242 4242 4242"),
        ({"source": "4242-4242-4242-4242"}, "source", "4242-4242-4242-4242"),
        ({"idempotency_key": "378282246310005"}, "idempotency_key", "378282246310005"),
        (
            {"description": "pay with 5555 5555 5555 4444 please"},
            "description",
            "5555 5555 5555 4444",
        ),
        ({"metadata": {"note": "card 6011111111111117"}}, "metadata.note", "6011111111111117"),
    ],
)
def test_raw_card_number_is_refused_and_a_token_suggested(
    changes: dict[str, Any], field: str, pan: str
) -> None:
    with pytest.raises(RawCardNumberError) as info:
        charge(**changes)
    error = info.value
    assert isinstance(error, ChargeInputError)
    assert error.field == field
    message = str(error)
    assert "never accepts card numbers" in message
    assert "token" in message
    assert "tok_" in message
    # The refusal must not copy the card number into logs or responses.
    assert pan not in message
    assert pan.replace(" ", "").replace("-", "") not in message


def test_raw_card_number_as_metadata_key_is_refused() -> None:
    with pytest.raises(RawCardNumberError) as info:
        charge(metadata={"4242 4242 4242 4242": "x"})
    assert info.value.field == "metadata"
    assert "4242" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"currency": "4242 4242 4242 4242"}, "currency"),
        ({"currency": "not-a-currency-but-a-secret"}, "currency"),
        ({"amount": 4242424242424242}, "amount"),
    ],
)
def test_no_refusal_repeats_the_value_it_refuses(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ChargeInputError) as info:
        charge(**changes)
    value = str(next(iter(changes.values())))
    assert info.value.field == field and value not in str(info.value)


@pytest.mark.parametrize("key", [" order-42", "order-42 ", "\u00a0order-42"])
def test_a_key_with_spaces_at_its_ends_is_refused_at_the_door(key: str) -> None:
    with pytest.raises(ChargeInputError) as info:
        charge(idempotency_key=key)
    assert info.value.field == "idempotency_key"
