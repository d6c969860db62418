"""One error shape for every answer that is not a success, and the one place where
payq's errors (and the framework's) become HTTP statuses.

    {"error": {"code": "invalid_request", "message": "the charge was refused; see errors",
               "errors": [{"field": "amount", "location": "body", "code": "invalid",
                           "message": "must be between 1 and 99999999 minor units, got 0"}]}}

``code`` is stable, for programs to branch on; ``message`` is for people. No body holds
a stack trace, an exception's own text from a library, a token or a card number: every
text that may carry the caller's input passes ``scrub`` on its way out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from payq.cardnumbers import mask_card_numbers
from payq.errors import (
    ChargeInputError,
    ChargeNotFound,
    IdempotencyConflict,
    RawCardNumberError,
    ServiceUnavailable,
)

__all__ = [
    "ApiError",
    "ErrorBody",
    "ErrorCode",
    "FieldError",
    "JSONBody",
    "error_body",
    "error_response",
    "field_error",
    "from_input_error",
    "install_error_handlers",
    "responses",
    "scrub",
    "unavailable",
]

log = logging.getLogger("payq.web")

#: Seconds a client is told to wait after a 503 before sending the same request again.
RETRY_AFTER_UNAVAILABLE_S = 1
_MESSAGE_MAX_CHARS = 300


class ErrorCode(StrEnum):
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "idempotency_conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_REQUEST = "invalid_request"
    RATE_LIMITED = "rate_limited"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL = "internal_error"
    HTTP_ERROR = "http_error"


class FieldError(BaseModel):
    """What is wrong with one field of a request."""

    model_config = ConfigDict(frozen=True)

    field: str
    location: Literal["body", "header", "path"]
    #: ``invalid``, ``card_number``, ``missing``, ``unknown_field``, ``duplicate_field``,
    #: ``invalid_json`` or ``multiple_values``.
    code: str
    message: str


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    errors: list[FieldError] | None = None
    charge_id: str | None = None
    differing: list[str] | None = None
    retry_after_s: int | None = None


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {...}}``."""

    error: ErrorDetail


class JSONBody(JSONResponse):
    """JSON that is plain ASCII on the wire: a lone surrogate or other oddity a caller
    sent can never make rendering an answer fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


class ApiError(Exception):
    """An answer other than success, raised from a route and rendered by the handler."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.extra = extra


def scrub(text: str, limit: int = _MESSAGE_MAX_CHARS) -> str:
    """``text`` safe to send back: no card number, valid UTF-8, bounded length."""
    text = mask_card_numbers(text, "[redacted]")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def field_error(
    field: str,
    code: str,
    message: str,
    location: Literal["body", "header", "path"] = "body",
) -> FieldError:
    return FieldError(field=scrub(field, 80), location=location, code=code, message=scrub(message))


def from_input_error(exc: ChargeInputError) -> FieldError:
    """The core's refusal of one field, as a field error. The idempotency key travels in
    the ``Idempotency-Key`` header, so its errors are reported there."""
    message = str(exc).removeprefix(f"{exc.field}: ")
    code = "card_number" if isinstance(exc, RawCardNumberError) else "invalid"
    if exc.field == "idempotency_key":
        return field_error("Idempotency-Key", code, message, "header")
    return field_error(exc.field, code, message)


def error_body(
    code: ErrorCode, message: str, *, errors: Sequence[FieldError] = (), **extra: Any
) -> dict[str, Any]:
    detail = ErrorDetail(code=code, message=scrub(message), errors=list(errors) or None, **extra)
    return {"error": detail.model_dump(mode="json", exclude_none=True)}


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    *,
    errors: Sequence[FieldError] = (),
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONBody:
    return JSONBody(
        error_body(code, message, errors=errors, **extra), status_code=status, headers=headers
    )


def unavailable(message: str) -> JSONBody:
    return error_response(
        503,
        ErrorCode.SERVICE_UNAVAILABLE,
        message,
        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
        retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
    )


# Statuses the framework raises itself (no route, wrong method, body over the limit), with
# texts of our own: a library's ``detail`` is never passed on.
_HTTP_STATUSES = {
    404: (ErrorCode.NOT_FOUND, "no such route"),
    405: (ErrorCode.METHOD_NOT_ALLOWED, "this route does not take that method; see Allow"),
    413: (ErrorCode.PAYLOAD_TOO_LARGE, "the request body is larger than this server accepts"),
}


async def _api_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status, exc.code, exc.message, errors=exc.errors, headers=exc.headers, **exc.extra
    )


async def _http_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_STATUSES.get(exc.status_code, (ErrorCode.HTTP_ERROR, "request refused"))
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return error_response(exc.status_code, code, message, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONBody:
    """The framework's own parameter checks (the intake parses its body itself)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for item in exc.errors():
        loc = [str(part) for part in item.get("loc", ())]
        where = loc[0] if loc and loc[0] in ("body", "header", "path") else "body"
        errors.append(
            field_error(".".join(loc[1:]) or where, "invalid", str(item.get("msg")), where)  # type: ignore[arg-type]
        )
    return error_response(
        422, ErrorCode.INVALID_REQUEST, "the request was refused; see errors", errors=errors
    )


async def _not_found(request: Request, exc: Exception) -> JSONBody:
    return error_response(404, ErrorCode.NOT_FOUND, "no charge with this id")


async def _conflict(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, IdempotencyConflict)
    if exc.charge_id is None:  # another app's charge: not even its id is this caller's
        return error_response(
            409,
            ErrorCode.CONFLICT,
            "this Idempotency-Key is already used by another app's charge; use keys of your "
            "own (prefix them with your app's name, say)",
        )
    return error_response(
        409,
        ErrorCode.CONFLICT,
        f"this Idempotency-Key already belongs to a charge with a different "
        f"{', '.join(exc.differing)}; use a new key for a new charge",
        charge_id=exc.charge_id,
        differing=exc.differing,
    )


async def _input_error(request: Request, exc: Exception) -> JSONBody:
    """A refusal the routes did not catch first (the routes list every bad field)."""
    assert isinstance(exc, ChargeInputError)
    return error_response(
        422,
        ErrorCode.INVALID_REQUEST,
        "the charge was refused; see errors",
        errors=[from_input_error(exc)],
    )


async def _service_unavailable(request: Request, exc: Exception) -> JSONBody:
    log.warning("answered 503: %s", exc)
    return unavailable(
        "the charge store did not answer; nothing was written. Send the same request again "
        "(same Idempotency-Key) in a moment"
    )


async def _internal(request: Request, exc: Exception) -> JSONBody:
    # The server logs the traceback (Starlette re-raises after this answer is sent).
    return error_response(500, ErrorCode.INTERNAL, "an unexpected error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ChargeNotFound, _not_found)
    app.add_exception_handler(IdempotencyConflict, _conflict)
    app.add_exception_handler(ChargeInputError, _input_error)
    for unavailable_error in (ServiceUnavailable, OperationalError, PoolTimeout, redis.RedisError):
        app.add_exception_handler(unavailable_error, _service_unavailable)
    app.add_exception_handler(Exception, _internal)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for these error statuses, all with the one error shape."""
    described = {
        401: "No valid bearer token (missing, unknown or malformed: the same answer).",
        403: "The token is valid but not for this route (intake vs operator).",
        404: "Not found.",
        409: "The Idempotency-Key belongs to a charge with other parameters.",
        413: "The body is larger than SERVE_MAX_BODY_BYTES.",
        415: "The body is not sent as application/json.",
        422: "Bad input: every refused field is listed under errors.",
        429: "This token sent more than SERVE_RATE_LIMIT_PER_S requests in a second; see "
        "Retry-After.",
        503: "PostgreSQL did not answer; nothing was written. See Retry-After.",
    }
    return {s: {"model": ErrorBody, "description": described[s]} for s in statuses}
