"""``payq.cardnumbers``: card numbers found however they are pasted, and nothing else.

Pure unit tests (no I/O), examples and properties, and the false-alarm measure over a
million identifiers of each kind real web apps use as idempotency keys.
"""

from __future__ import annotations

import random
import string
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payq.cardnumbers import (
    is_card_number,
    is_whole_card_number,
    looks_like_card_number,
    mask_card_numbers,
)
from payq.errors import RawCardNumberError
from payq.validation import validate_charge


def luhn_check_digit(body: str) -> str:
    """The digit that makes ``body + digit`` pass Luhn (written apart from payq's)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # these are doubled once the check digit is appended
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def group(digits: str, sep: str, size: int = 4) -> str:
    return sep.join(digits[i : i + size] for i in range(0, len(digits), size))


# Well-known provider test numbers, and 13-, 18- and 19-digit ones of real networks.
PAN_13 = "4222222222222"  # Visa
PAN_15 = "378282246310005"  # Amex
PAN_18 = "622123456789012348"  # UnionPay
PAN_19 = "6011000000000000001"  # Discover
PANS_16 = ["4242424242424242", "4000056655665556", "5555555555554444", "6011111111111117",
           "2223003122003222", "3566002020360505"]  # fmt: skip
ALL_PANS = [PAN_13, PAN_15, *PANS_16, PAN_18, PAN_19]

#: Everything the issue reproduced passing the old refusal, and more of the same kind.
SEPARATORS = [" ", "  ", "-", ".", "_", "/", "\t", "\u00a0", "\u2009", "\u202f", "\u2013",
              "\u200b", " - ", "\\", ",", "\u3000", ":", "|", "*", "+", "\u00ad", "\u200e",
              "\u2063", "\u30fb", "\u2219"]  # fmt: skip


def test_the_example_numbers_are_what_networks_issue() -> None:
    for pan in ALL_PANS:
        assert luhn_check_digit(pan[:-1]) == pan[-1], pan
        assert is_card_number(pan), pan


@pytest.mark.parametrize("pan", ALL_PANS)
@pytest.mark.parametrize("sep", ["", *SEPARATORS])
def test_card_numbers_are_found_whatever_separates_their_groups(pan: str, sep: str) -> None:
    text = group(pan, sep) if sep else pan
    assert looks_like_card_number(text)
    assert is_whole_card_number(text)


@pytest.mark.parametrize(
    "text",
    [
        "\uff14\uff12\uff14\uff12" * 4,  # full-width digits
        " ".join(["\uff14\uff12\uff14\uff12"] * 4),
        "3782 822463 10005",  # Amex grouping 4-6-5
        "please charge 4242.4242.4242.4242 thanks",
        "card:4242-4242-4242-4242.",
        "pan=5555 5555 5555 4444;exp=12",
        "(378282246310005)",
        "4242 4242 4242 4242 123",  # with its CVV
        "4242424242424242 12/27",  # with its expiry
        "6011111111111117 09/28",
        "call me: 4242\u00a04242\u00a04242\u00a04242",
        # Found by an attacker's review: a neighbour glued to letters hid the card...
        "Booking ABC123 4111 1111 1111 1111",
        "Order A1 4111 1111 1111 1111",
        "PO-7 4111111111111111",
        "4111 1111 1111 1111 2A",
        "ref:A9 4111 1111 1111 1111",
        # ...and so did separators and invisible marks outside a short list.
        "4111:1111:1111:1111",
        "4111|1111|1111|1111",
        "4111*1111*1111*1111",
        "4111\u00ad1111\u00ad1111\u00ad1111",
        "4111\u200e1111\u200f1111\u034f1111",
        "\u0664\u0661\u0661\u0661 1111 1111 1111",  # Arabic-Indic digits
    ],
)
def test_card_numbers_are_found_in_text(text: str) -> None:
    assert looks_like_card_number(text)
    assert "4242" not in mask_card_numbers(text) or "4242 4242" not in mask_card_numbers(text)


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424241",  # Luhn off by one
        "4242 4242 4242 4241",
        "424242424242",  # 12 digits
        "42424242424242424242",  # 20 digits
        "1733400000000",  # a millisecond timestamp: no network starts with 1
        "9999999999999995",  # Luhn-valid, no network's prefix
        "4242424242424242474",  # 19 digits starting 4, Luhn-invalid
        "order-4242424242424242",  # the tail of an identifier, not a number on its own
        "inv_4000056655665556",
        "f47ac10b-58cc-4372-a567-0e02b2c3d479",
        "order 12345, qty 3",
        "tok_visa",
        "",
        "Seats 41 42 43 44 45 46 47 48",  # a list of short numbers
        "pages 1-4, 11-14, 111-114, 4111-4114",
    ],
)
def test_what_is_not_a_card_number_is_not_found(text: str) -> None:
    assert not looks_like_card_number(text)


def test_a_payment_token_holds_no_card_number_even_glued_to_letters() -> None:
    assert looks_like_card_number("tok_4111111111111111", strict=True)
    assert not looks_like_card_number("tok_4111111111111111")  # an identifier, in text
    for source in ("tok_4111111111111111", "4111:1111:1111:1111", "card4111111111111111"):
        with pytest.raises(RawCardNumberError):
            validate_charge(amount=1, currency="usd", source=source, idempotency_key="k-1",
                            max_amount=100)  # fmt: skip


def test_a_card_split_between_a_metadata_key_and_its_value_is_refused() -> None:
    with pytest.raises(RawCardNumberError):
        validate_charge(amount=1, currency="usd", source="tok_visa", idempotency_key="k-1",
                        metadata={"4111 1111": "1111 1111"}, max_amount=100)  # fmt: skip


def test_a_key_is_a_card_number_only_when_it_is_one_itself() -> None:
    assert is_whole_card_number(" 4242 4242 4242 4242 ")
    assert not is_whole_card_number("4242424242424242-retry")
    assert not is_whole_card_number("checkout 4242424242424242")


def test_masking_keeps_the_rest_of_the_line() -> None:
    line = "charge failed for ref 4242.4242.4242.4242 at 2026-12-05 (order-1733400000000)"
    assert mask_card_numbers(line) == (
        "charge failed for ref [card number] at 2026-12-05 (order-1733400000000)"
    )


# --- properties ---------------------------------------------------------------------------

#: (prefix, length) of real networks: Visa 16/13/19, Mastercard, Amex, Discover, JCB...
NETWORKS = [("4", 16), ("4", 13), ("4", 19), ("51", 16), ("2221", 16), ("34", 15),
            ("37", 15), ("6011", 16), ("65", 19), ("3530", 16), ("62", 17), ("36", 14)]  # fmt: skip


@st.composite
def card_numbers(draw: Any) -> str:
    prefix, length = draw(st.sampled_from(NETWORKS))
    body = prefix + draw(st.text("0123456789", min_size=length - len(prefix) - 1,
                                 max_size=length - len(prefix) - 1))  # fmt: skip
    return body + luhn_check_digit(body)


@st.composite
def pasted(draw: Any) -> str:
    """A card number in groups of random sizes (three digits or more, as on cards, but
    for the last), random separators between them."""
    number = draw(card_numbers())
    out, i = "", 0
    while i < len(number):
        size = draw(st.integers(3, 6))
        out += number[i : i + size]
        i += size
        if i < len(number):
            out += draw(st.sampled_from(["", *SEPARATORS]))
    return out


FIELDS = ["source", "idempotency_key", "description", "metadata key", "metadata value"]


@given(card=pasted(), field=st.sampled_from(FIELDS), pre=st.sampled_from(["", "ref ", "card: "]))
def test_a_pasted_card_number_is_refused_in_every_field(card: str, field: str, pre: str) -> None:
    fields: dict[str, Any] = {"amount": 1999, "currency": "usd", "source": "tok_visa",
                              "idempotency_key": "order-1", "max_amount": 99_999_999}  # fmt: skip
    text = pre + card
    if field == "source" or field == "idempotency_key":
        fields[field] = card  # a key is refused when it is a card number itself
    elif field == "description":
        fields["description"] = text
    elif field == "metadata key":
        fields["metadata"] = {text[:40] if len(text) <= 40 else card: "x"}
    else:
        fields["metadata"] = {"note": text}
    with pytest.raises(RawCardNumberError) as refused:
        validate_charge(**fields)
    digits = "".join(ch for ch in card if ch.isdigit())
    assert digits[-8:] not in "".join(ch for ch in str(refused.value) if ch.isdigit())


# --- no false alarms ----------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RNG = random.Random(20261205)


def _ulid() -> str:
    value = (int(time.time() * 1000) + _RNG.randrange(10**11)) << 80 | _RNG.getrandbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def _ms_timestamp() -> str:  # 2020 to 2033
    return str(_RNG.randrange(1_577_836_800_000, 2_000_000_000_000))


def _snowflake() -> str:
    """A Twitter-style snowflake id made from 2024 to 2026 (19 digits, starting 1 or 2).

    A bare number of 13-19 digits that has a network's prefix, length and Luhn digit is a
    card number by every test there is: bare ids of other epochs can be (Discord's from
    early 2020 start 6759, Maestro's), and are refused as a key, as they should be.
    """
    ms = _RNG.randrange(1_704_067_200_000, 1_798_761_600_000) - 1_288_834_974_657
    return str(ms << 22 | _RNG.getrandbits(22))


def _order_id() -> str:
    return f"order-{_RNG.randrange(10**12, 10**16)}"


IDENTIFIERS: dict[str, Callable[[], str]] = {
    "uuid4": lambda: str(uuid.UUID(int=_RNG.getrandbits(128), version=4)),
    "uuid4 hex": lambda: uuid.UUID(int=_RNG.getrandbits(128), version=4).hex,
    "ulid": _ulid,
    "millisecond timestamp": _ms_timestamp,
    "snowflake id": _snowflake,
    "order-<13-16 digit id>": _order_id,
    "order <ms timestamp> (in a description)": lambda: f"order {_ms_timestamp()}",
}


@pytest.mark.parametrize("kind", list(IDENTIFIERS))
def test_a_million_identifiers_of_each_kind_are_never_taken_for_card_numbers(kind: str) -> None:
    make = IDENTIFIERS[kind]
    refused = [
        value for value in (make() for _ in range(1_000_000)) if looks_like_card_number(value)
    ]
    assert refused == [], f"{len(refused)} of a million {kind} refused, e.g. {refused[:3]}"


def test_the_identifiers_tested_look_as_they_should() -> None:
    samples = {kind: make() for kind, make in IDENTIFIERS.items()}
    assert len(samples["uuid4"]) == 36 and len(samples["uuid4 hex"]) == 32
    assert len(samples["ulid"]) == 26 and set(samples["ulid"]) <= set(_CROCKFORD)
    assert len(samples["millisecond timestamp"]) == 13
    assert 18 <= len(samples["snowflake id"]) <= 19
    assert set(samples["order-<13-16 digit id>"][6:]) <= set(string.digits)
