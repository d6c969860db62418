"""``POST /v1/charges`` and ``GET /v1/charges/{charge_id}``: ``enqueue_charge`` and
``get_charge`` over HTTP, with no rule of their own.

The body is ``enqueue_charge``'s arguments as JSON, the idempotency key travels in
the ``Idempotency-Key`` header. 201: a new charge; 200: the charge an earlier request
with the same key and the same parameters made; 409: the key belongs to a charge with
other parameters; 422: every refused field, listed.

The body is parsed here, strictly (no NaN, no duplicate keys, nothing but the known
fields), and then judged by ``payq.validation``, the same function ``enqueue_charge``
uses. That function stops at the first bad field; an HTTP client wants every one in a
single answer, so each field it was given is also put to it alone, beside accepted
placeholders for the others. Its checks are per field, so this lists exactly the
fields it refuses, and it stays the one judge.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel

from payq.cardnumbers import looks_like_card_number
from payq.constants import ChargeStatus
from payq.errors import ChargeInputError
from payq.models import Charge
from payq.settings import Settings
from payq.validation import (
    DESCRIPTION_MAX_CHARS,
    METADATA_MAX_KEY_CHARS,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    validate_charge,
)
from producers.enqueue import app_key, enqueue_charge_result, get_charge
from producers.intake.blocking import Blocking
from producers.intake.errors import (
    ApiError,
    ErrorCode,
    FieldError,
    JSONBody,
    field_error,
    from_input_error,
    responses,
)

__all__ = ["ChargeOut", "charge_body_schema", "router"]

#: The body's fields: ``enqueue_charge``'s arguments but the key (a header).
FIELDS = ("amount", "currency", "source", "description", "metadata")
REQUIRED = ("amount", "currency", "source")
# Values validation accepts, put beside the one field under test.
_PLACEHOLDERS: dict[str, object] = {
    "amount": 1,
    "currency": "usd",
    "source": "tok_placeholder",
    "idempotency_key": "placeholder",
    "description": None,
    "metadata": None,
}


class ChargeOut(BaseModel):
    """A charge as the intake shows it. The payment token (``source``) is not echoed."""

    id: uuid.UUID
    idempotency_key: str
    amount: int
    currency: str
    description: str | None
    metadata: dict[str, str]
    status: ChargeStatus
    attempts: int
    provider_charge_id: str | None
    decline_code: str | None
    last_error_class: str | None
    dead_reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, charge: Charge) -> ChargeOut:
        values = {name: getattr(charge, name) for name in cls.model_fields}
        values["idempotency_key"] = app_key(charge)  # as the app sent it
        return cls.model_validate(values)


def charge_body_schema(max_amount: int) -> dict[str, Any]:
    """The body's JSON Schema for the OpenAPI document, from the validation module's own
    limits. It describes; ``payq.validation`` decides (it also refuses card numbers,
    unknown currencies, the reserved metadata key ``charge_id``, oversized metadata)."""
    return {
        "type": "object",
        "required": list(REQUIRED),
        "additionalProperties": False,
        "properties": {
            "amount": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_amount,
                "description": "minor units (cents): 1999 is 19.99",
            },
            "currency": {
                "type": "string",
                "pattern": "^[A-Za-z]{3}$",
                "description": "ISO 4217 code, e.g. usd",
            },
            "source": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_.:-]{3,255}$",
                "description": "a payment token issued by the provider, e.g. tok_visa; "
                "never a card number",
            },
            "description": {"type": ["string", "null"], "maxLength": DESCRIPTION_MAX_CHARS},
            "metadata": {
                "type": ["object", "null"],
                "maxProperties": METADATA_MAX_KEYS,
                "propertyNames": {"minLength": 1, "maxLength": METADATA_MAX_KEY_CHARS},
                "additionalProperties": {"type": "string", "maxLength": METADATA_MAX_VALUE_CHARS},
            },
        },
    }


_KEY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "1-255 printable ASCII characters; the same key with the same body "
    "returns the same charge, never a second one",
    "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
}


def _blocking(request: Request) -> Blocking:
    blocking: Blocking = request.app.state.blocking
    return blocking


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


router = APIRouter(prefix="/v1", tags=["charges"])


@router.post(
    "/charges",
    summary="Enqueue a charge",
    status_code=201,
    response_class=JSONBody,
    responses={
        201: {"model": ChargeOut, "description": "A new charge, queued."},
        200: {
            "model": ChargeOut,
            "description": "The charge an earlier request with this key and these parameters "
            "made (nothing new was created).",
        },
        **responses(409, 413, 415, 422),
    },
    openapi_extra={
        "parameters": [_KEY_HEADER],
        "requestBody": {
            "required": True,
            # Filled in per app (its CHARGE_MAX_AMOUNT) by the OpenAPI document's builder.
            "content": {"application/json": {"schema": {}}},
        },
    },
)
async def create_charge(
    request: Request,
    blocking: Annotated[Blocking, Depends(_blocking)],
    settings: Annotated[Settings, Depends(_settings)],
) -> JSONBody:
    _require_json(request)
    key, key_errors = _idempotency_key(request)
    fields, body_errors = _parse_body(await request.body())
    errors = body_errors + key_errors
    given = dict(fields)
    if key is not None:
        given["idempotency_key"] = key
    # Off the event loop: reading every field for card numbers is CPU work.
    refused = await anyio.to_thread.run_sync(input_errors, given, settings.charge_max_amount)
    errors += [from_input_error(e) for e in refused]
    if errors:
        raise ApiError(
            422, ErrorCode.INVALID_REQUEST, "the charge was refused; see errors", errors=errors
        )
    app = request.state.principal.app
    result = await blocking.run(lambda: enqueue_charge_result(**given, app=app))
    return JSONBody(
        ChargeOut.of(result.charge).model_dump(mode="json"),
        status_code=201 if result.created else 200,
    )


@router.get(
    "/charges/{charge_id}",
    summary="Look a charge up",
    response_class=JSONBody,
    responses={200: {"model": ChargeOut, "description": "The charge."}, **responses(404)},
)
async def read_charge(
    request: Request,
    charge_id: Annotated[str, Path(description="the id POST /v1/charges answered with")],
    blocking: Annotated[Blocking, Depends(_blocking)],
) -> JSONBody:
    app = request.state.principal.app  # an app reads its own charges only
    charge = await blocking.run(lambda: get_charge(charge_id, app=app))
    return JSONBody(ChargeOut.of(charge).model_dump(mode="json"))


def input_errors(fields: Mapping[str, object], max_amount: int) -> list[ChargeInputError]:
    """Every refusal ``validate_charge`` makes of these fields, one field at a time."""
    errors = []
    for name, value in fields.items():
        try:
            validate_charge(**{**_PLACEHOLDERS, name: value}, max_amount=max_amount)
        except ChargeInputError as exc:
            errors.append(exc)
    return errors


def _require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "send the charge as a JSON body with Content-Type: application/json",
        )


def _idempotency_key(request: Request) -> tuple[str | None, list[FieldError]]:
    values = request.headers.getlist("idempotency-key")
    if not values:
        return None, [
            field_error(
                "Idempotency-Key",
                "missing",
                "required: a key of your own for this charge",
                "header",
            )
        ]
    if len(values) > 1:
        return None, [
            field_error("Idempotency-Key", "multiple_values", "send the header once", "header")
        ]
    return values[0], []


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _DuplicateKey(name)
        result[name] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _shown(name: str) -> str:
    """An unknown field's name as an error may name it: short, and no card number in it
    (else only that the body has an unknown field)."""
    if len(name) > 40 or looks_like_card_number(name, strict=True):
        return "body"
    return name


def _parse_body(raw: bytes) -> tuple[dict[str, Any], list[FieldError]]:
    """The body's known fields, and what is wrong with its shape."""
    try:
        body = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except UnicodeDecodeError:
        return {}, [field_error("body", "invalid_json", "the body is not UTF-8 text")]
    except _DuplicateKey as exc:
        return {}, [
            field_error(
                str(exc) if str(exc) in FIELDS else "body",
                "duplicate_field",
                "a field appears twice in the body",
            )
        ]
    except json.JSONDecodeError as exc:
        return {}, [
            field_error(
                "body",
                "invalid_json",
                f"the body is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            )
        ]
    except (ValueError, RecursionError):  # NaN, a number too long, nesting too deep
        return {}, [field_error("body", "invalid_json", "the body is not JSON payq can read")]
    if not isinstance(body, dict):
        return {}, [field_error("body", "invalid", "the body must be a JSON object")]
    errors = [field_error(name, "missing", "required") for name in REQUIRED if name not in body]
    for name in body:
        if name == "idempotency_key":
            errors.append(
                field_error(
                    name, "unknown_field", "send the idempotency key in the Idempotency-Key header"
                )
            )
        elif name not in FIELDS:
            errors.append(field_error(_shown(name), "unknown_field", "not a field of a charge"))
    return {name: value for name, value in body.items() if name in FIELDS}, errors
