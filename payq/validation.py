"""Checks on a charge request at the door, before anything is written.

Raw card numbers are refused wherever they appear (source, description, metadata keys
and values, the idempotency key when the key itself is one), however they were pasted
(``payq.cardnumbers``): payq only ever handles the provider's payment tokens. No error
repeats the value it refuses: it may be the very number that must not get out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from payq.cardnumbers import is_whole_card_number, looks_like_card_number
from payq.errors import ChargeInputError, RawCardNumberError

__all__ = ["ChargeRequest", "looks_like_card_number", "validate_charge"]

# ISO 4217 active codes (2026). A currency outside this list is refused.
ISO_4217 = frozenset(
    """
    aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob bov brl bsd btn
    bwp byn bzd cad cdf che chf chw clf clp cny cop cou crc cuc cup cve czk djf dkk dop dzd egp
    ern etb eur fjd fkp gbp gel ghs gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr iqd irr isk
    jmd jod jpy kes kgs khr kmf kpw krw kwd kyd kzt lak lbp lkr lrd lsl lyd mad mdl mga mkd mmk
    mnt mop mru mur mvr mwk mxn mxv myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr pln
    pyg qar ron rsd rub rwf sar sbd scr sdg sek sgd shp sle sll sos srd ssp stn svc syp szl thb
    tjs tmt tnd top try ttd twd tzs uah ugx usd usn uyi uyu uyw uzs ved ves vnd vuv wst xaf xcd
    xcg xof xpf yer zar zmw zwg zwl
    """.split()  # noqa: SIM905 - a word list reads better than 180 quoted strings
)

METADATA_MAX_KEYS = 50
METADATA_MAX_KEY_CHARS = 40
METADATA_MAX_VALUE_CHARS = 500
METADATA_MAX_BYTES = 8192
DESCRIPTION_MAX_CHARS = 1000
_TOKEN = re.compile(r"[A-Za-z0-9_\-.:]{3,255}")
_KEY = re.compile(r"[\x20-\x7e]{1,255}")


def _refuse_unstorable(field_name: str, value: str) -> None:
    if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
        raise ChargeInputError(
            field_name, "contains a NUL or an unpaired surrogate character; send valid UTF-8 text"
        )


def _refuse_card(field_name: str, value: str, *, whole: bool = False, strict: bool = False) -> None:
    found = is_whole_card_number(value) if whole else looks_like_card_number(value, strict=strict)
    if found:
        raise RawCardNumberError(
            field_name,
            "looks like a raw card number; payq never accepts card numbers. Tokenize the "
            "card with the payment provider and pass its token (e.g. tok_...) as source",
        )


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """A validated charge request, normalised (currency lower-case)."""

    amount: int
    currency: str
    source: str
    idempotency_key: str
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    app: str | None = None  # the web app that sent it (the intake's token), if any


def validate_charge(
    *,
    amount: object,
    currency: object,
    source: object,
    idempotency_key: object,
    description: object = None,
    metadata: object = None,
    max_amount: int,
) -> ChargeRequest:
    """Return the normalised request or raise ``ChargeInputError`` naming the field."""
    amount = _checked_amount(amount, max_amount)
    if not isinstance(currency, str) or currency.lower() not in ISO_4217:
        raise ChargeInputError(
            "currency", "must be a three-letter ISO 4217 code such as 'usd' or 'eur'"
        )
    source = _checked_source(source)
    idempotency_key = _checked_key(idempotency_key)
    if description is not None:
        if not isinstance(description, str) or len(description) > DESCRIPTION_MAX_CHARS:
            raise ChargeInputError(
                "description", f"must be a string of at most {DESCRIPTION_MAX_CHARS} characters"
            )
        _refuse_unstorable("description", description)
        _refuse_card("description", description)
    return ChargeRequest(
        amount=amount,
        currency=currency.lower(),
        source=source,
        idempotency_key=idempotency_key,
        description=description,
        metadata=_validate_metadata(metadata),
    )


def _checked_amount(amount: object, max_amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ChargeInputError(
            "amount",
            f"must be an integer number of minor units (cents), got {type(amount).__name__}",
        )
    if not 1 <= amount <= max_amount:
        raise ChargeInputError(
            "amount",
            f"must be between 1 and {max_amount} minor units, got "
            + ("less" if amount < 1 else "more"),
        )
    return amount


def _checked_source(source: object) -> str:
    if not isinstance(source, str):
        raise ChargeInputError("source", "must be a payment token string such as 'tok_visa'")
    _refuse_card("source", source, strict=True)  # a token has no reason to hold one
    if not _TOKEN.fullmatch(source):
        raise ChargeInputError(
            "source",
            "must be a payment token issued by the provider (3-255 letters, digits, '_', '-', "
            "'.', ':')",
        )
    return source


def _checked_key(idempotency_key: object) -> str:
    if isinstance(idempotency_key, str):
        _refuse_card("idempotency_key", idempotency_key, whole=True)
    if not isinstance(idempotency_key, str) or not _KEY.fullmatch(idempotency_key):
        raise ChargeInputError(
            "idempotency_key", "must be 1-255 printable ASCII characters (no control characters)"
        )
    if idempotency_key != idempotency_key.strip():
        raise ChargeInputError(
            "idempotency_key",
            "starts or ends with a space; send the key without it (HTTP would drop it, and "
            "the provider would then see another key)",
        )
    return idempotency_key


def _validate_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ChargeInputError("metadata", "must be a mapping of string keys to string values")
    if len(metadata) > METADATA_MAX_KEYS:
        raise ChargeInputError("metadata", f"may hold at most {METADATA_MAX_KEYS} keys")
    clean: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= METADATA_MAX_KEY_CHARS:
            raise ChargeInputError(
                "metadata", f"keys must be strings of 1-{METADATA_MAX_KEY_CHARS} characters"
            )
        _refuse_unstorable("metadata", key)
        _refuse_card("metadata", key)
        if key == "charge_id":
            raise ChargeInputError("metadata", "'charge_id' is reserved: payq sets it")
        if not isinstance(value, str) or len(value) > METADATA_MAX_VALUE_CHARS:
            raise ChargeInputError(
                f"metadata.{key}",
                f"must be a string of at most {METADATA_MAX_VALUE_CHARS} characters",
            )
        _refuse_unstorable(f"metadata.{key}", value)
        _refuse_card(f"metadata.{key}", value)
        _refuse_card(f"metadata.{key}", f"{key} {value}")  # split across the key and value
        clean[key] = value
    if len(json.dumps(clean)) > METADATA_MAX_BYTES:
        raise ChargeInputError("metadata", f"must encode to at most {METADATA_MAX_BYTES} bytes")
    return clean
