"""The payment provider's client: one pooled ``httpx.Client`` per process.

``create_charge`` returns a ``ProviderCharge`` or raises one of payq's provider
errors; ``classify`` is the one place where HTTP answers (and httpx's errors)
become payq's outcomes, exactly as ``provider-api.md`` lays them out. Nothing
above this module catches ``httpx`` errors.
"""

from __future__ import annotations

import email.utils
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from payq.deadline import DeadlineTransport, SendWindowClosed, deadline
from payq.errors import (
    AuthenticationFailed,
    CardDeclined,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidRequest,
    ProviderConnectionError,
    ProviderConnectionRefused,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    RequestNotSent,
)
from payq.logs import mask_bearer
from payq.settings import Settings

__all__ = [
    "ProviderCharge",
    "ProviderClient",
    "charge_body",
    "classify",
    "clean_text",
    "lookup_answer",
]

#: How much of an answer's body is kept with an attempt, logged, or put in a message.
BODY_LOG_LIMIT = 1024
#: The largest answer payq reads: a charge object is a few hundred bytes. A larger body
#: (a misrouted page, a hostile peer) is read no further and classified as unclear, so a
#: worker's memory never holds more than this per call.
ANSWER_MAX_BYTES = 64 * 1024
#: The longest charge id and decline code payq keeps (the columns they go to).
CHARGE_ID_LIMIT = 255
CODE_LIMIT = 64
#: After giving up on an answer, the client waits this long before it returns. The
#: provider counts a request as in flight until it sees the hang-up; the caller still
#: holds its fleet slot meanwhile, so the next request sent on that slot never overlaps
#: the abandoned one at the provider (PAYMENT_MAX_CONCURRENCY holds there, not only here).
HANG_UP_GRACE_S = 0.2


@dataclass(frozen=True, slots=True)
class ProviderCharge:
    id: str
    status: str
    amount: int
    currency: str


def charge_body(
    *,
    charge_id: str,
    amount: int,
    currency: str,
    source: str,
    description: str | None,
    metadata: dict[str, str],
) -> bytes:
    """The request body for a charge: byte-for-byte the same on every attempt."""
    body: dict[str, Any] = {
        "amount": amount,
        "currency": currency,
        "source": source,
        "metadata": {**metadata, "charge_id": charge_id},
    }
    if description is not None:
        body["description"] = description
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class ProviderClient:
    def __init__(self, settings: Settings) -> None:
        settings.require_provider_key("the provider's client", every_endpoint=False)
        assert settings.payment_provider_api_key is not None
        key = self._key = settings.payment_provider_api_key.get_secret_value()
        self.timeout_s = settings.payment_timeout_s
        self.pool_size = settings.payment_pool_max_connections
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        limits = httpx.Limits(
            max_connections=self.pool_size, max_keepalive_connections=self.pool_size
        )
        self._client = httpx.Client(
            base_url=settings.payment_provider_url,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                # An answer is a few hundred bytes: uncompressed, it is read bounded.
                "Accept-Encoding": "identity",
            },
            timeout=httpx.Timeout(
                self.timeout_s, connect=settings.payment_connect_timeout_ms / 1000
            ),
            transport=DeadlineTransport(limits=limits),
            follow_redirects=False,
        )

    def _scrubbed(self, exc: ProviderError) -> ProviderError:
        """The error with this client's API key masked wherever the answer echoed it."""
        exc.args = tuple(a.replace(self._key, "***") if isinstance(a, str) else a for a in exc.args)
        if exc.answer:
            exc.answer = exc.answer.replace(self._key, "***")
        return exc

    def create_charge(
        self, idempotency_key: str, body: bytes, *, send_by: float | None = None
    ) -> ProviderCharge:
        """POST /v1/charges, ending by ``PAYMENT_TIMEOUT_MS`` whatever the provider does.

        ``send_by`` (a ``time.monotonic()`` moment): if the request has not been written
        by then (the process was frozen), it is not sent at all: ``RequestNotSent``.
        """
        response = self._call(
            "POST", "/v1/charges", content=body, key=idempotency_key, send_by=send_by
        )
        try:
            return classify(response)
        except ProviderError as exc:
            raise self._scrubbed(exc) from None

    def find_charge(self, idempotency_key: str) -> ProviderCharge | CardDeclined | None:
        """Look a charge up by its key without creating one: the charge, its decline
        (returned, not raised), or ``None`` if none was made with this key."""
        response = self._call(
            "GET", "/v1/charges", params={"idempotency_key": idempotency_key}, key=None
        )
        try:
            return lookup_answer(response)
        except ProviderError as exc:
            raise self._scrubbed(exc) from None

    @property
    def in_flight(self) -> int:
        """Calls under way in this process (each holds one pooled connection)."""
        return self._in_flight

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ProviderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        key: str | None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        send_by: float | None = None,
    ) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key is not None else {}
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            with (
                deadline(self.timeout_s, send_by=send_by),
                self._client.stream(
                    method, path, content=content, params=params, headers=headers
                ) as response,
            ):
                return _read_bounded(response)
        except SendWindowClosed:
            raise RequestNotSent(
                "not sent: the process stalled past the time the request had to leave by"
            ) from None
        except httpx.TimeoutException as exc:
            time.sleep(HANG_UP_GRACE_S)
            raise ProviderTimeout(
                f"no answer within {self.timeout_s * 1000:.0f} ms ({type(exc).__name__})"
                + _MAYBE_CHARGED.get(method, "")
            ) from exc
        except httpx.ConnectError as exc:
            raise ProviderConnectionRefused(
                f"no connection to the provider ({type(exc).__name__}: {str(exc)[:200]}); "
                "nothing was sent"
            ) from exc
        except httpx.LocalProtocolError as exc:
            # Its text can quote our own request headers, the API key among them.
            raise ProviderConnectionError(
                f"the request could not be sent ({type(exc).__name__}); check "
                "PAYMENT_PROVIDER_URL and PAYMENT_PROVIDER_API_KEY"
            ) from None
        except httpx.HTTPError as exc:
            time.sleep(HANG_UP_GRACE_S)
            raise ProviderConnectionError(
                f"connection failed before a whole answer ({type(exc).__name__}: "
                f"{str(exc)[:200]})" + _MAYBE_CHARGED.get(method, "")
            ) from exc
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1


#: Said of a call that got no answer: only a charge request may have charged.
_MAYBE_CHARGED = {"POST": "; the charge may or may not have happened"}


def _read_bounded(response: httpx.Response) -> httpx.Response:
    """The answer with its body read, but never more than ``ANSWER_MAX_BYTES`` of it."""
    length = response.headers.get("content-length", "")
    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
    if length.isdigit() and int(length) <= ANSWER_MAX_BYTES and not encoded:
        response.read()  # said small, and h11 holds it to what it said
        return response
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > ANSWER_MAX_BYTES:
            raise ProviderUnavailable(
                f"answer larger than {ANSWER_MAX_BYTES // 1024} KiB, status "
                f"{response.status_code}: read no further",
                status=response.status_code,
                answer=clean_text(bytes(body[:BODY_LOG_LIMIT]).decode("utf-8", "replace")),
            )
    headers = [
        (name, value)
        for name, value in response.headers.items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=bytes(body), request=response.request
    )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _cut(response: httpx.Response) -> str:
    """The start of the body as text that any log line or database column takes, with
    any bearer token in it masked (a proxy that echoes our request back)."""
    text = response.content[:BODY_LOG_LIMIT].decode("utf-8", "replace")
    return clean_text(mask_bearer(text))


def clean_text(text: str, limit: int = BODY_LOG_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, as any column and log line takes it: no NUL
    (PostgreSQL's text refuses it), no lone surrogate (UTF-8 cannot encode it)."""
    text = text[:limit].replace("\x00", "\\0")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _bounded(value: Any, limit: int) -> str | None:
    """A provider's id or code as payq keeps it: a string, cut; ``None`` if absent."""
    if value is None or isinstance(value, dict | list):
        return None
    return clean_text(str(value), limit) or None


def _charge_object(data: Any) -> ProviderCharge | None:
    """A charge object (``"object": "charge"`` with an id), normalized; else ``None``."""
    if not isinstance(data, dict) or data.get("object") != "charge":
        return None
    charge_id = _bounded(data.get("id"), CHARGE_ID_LIMIT)
    if charge_id is None:
        return None
    amount = data.get("amount")
    return ProviderCharge(
        id=charge_id,
        status=clean_text(str(data.get("status")), 32),
        amount=amount if type(amount) is int else 0,
        currency=clean_text(str(data.get("currency", "")), 8),
    )


def lookup_answer(response: httpx.Response) -> ProviderCharge | CardDeclined | None:
    """A lookup by key's answer: the charge, its decline, ``None`` (404), or an error raised.

    Whatever the provider sends, only payq's provider errors come out of here.
    """
    try:
        return _lookup_answer(response)
    except ProviderError:
        raise
    except Exception as exc:  # a malformed answer is provider trouble, never a crash
        raise ProviderUnavailable(
            f"unreadable lookup answer, status {response.status_code} ({type(exc).__name__})",
            status=response.status_code,
            answer=_cut(response),
        ) from None


def _lookup_answer(response: httpx.Response) -> ProviderCharge | CardDeclined | None:
    if response.status_code == 404:
        # Only the provider's own "no such charge" proves nothing was charged: a 404
        # from anything else on the way (a wrong base URL, a proxy's page) says nothing.
        data = _json(response)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("type") == "invalid_request_error":
            return None
        raise ProviderUnavailable(
            f"lookup answered 404 without the provider's error object (a wrong "
            f"PAYMENT_PROVIDER_URL or endpoint url?): {_cut(response)}",
            status=404,
            answer=_cut(response),
        )
    if response.status_code == 200:
        data = _json(response)
        charge = _charge_object(data)
        if charge is not None and charge.status == "succeeded":
            return charge
        if charge is not None and charge.status == "failed":
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            code = _bounded(error.get("code"), CODE_LIMIT) or "card_declined"
            return CardDeclined(
                clean_text(str(error.get("message") or f"card declined ({code})")),
                code=code,
                provider_charge_id=charge.id,
                status=200,
            )
        raise ProviderUnavailable(
            f"lookup answered 200 with no charge object it could read: {_cut(response)}",
            status=200,
            answer=_cut(response),
        )
    return classify(response)


RETRY_AFTER_MAX_S = 3600.0


def _retry_after_s(value: str | None) -> float | None:
    """Seconds or an HTTP date; ``None`` when absent or unreadable; at most an hour."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (ValueError, TypeError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_S)


def classify(response: httpx.Response) -> ProviderCharge:
    """Turn one provider answer into a ``ProviderCharge`` or raise the matching error.

    Whatever the provider sends, only payq's provider errors come out of here.
    """
    try:
        return _classify(response)
    except ProviderError as exc:
        exc.answer = _cut(response)
        raise
    except Exception as exc:  # a malformed answer is provider trouble, never a crash
        raise ProviderUnavailable(
            f"unreadable answer, status {response.status_code} ({type(exc).__name__}): "
            f"{_cut(response)}",
            status=response.status_code,
            answer=_cut(response),
        ) from None


def _classify(response: httpx.Response) -> ProviderCharge:
    status = response.status_code
    data = _json(response)
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, dict) else {}
    message = clean_text(str(error.get("message") or ""))
    code = error.get("code")

    if status == 200:
        charge = _charge_object(data)
        if charge is not None and charge.status == "succeeded":
            return charge
        raise ProviderUnavailable(
            f"200 whose body is not a succeeded charge object: {_cut(response)}", status=status
        )
    # A 402 without a card error in it (a middlebox's "Payment Required" page) is not the
    # provider's stored decline: it says nothing about the charge.
    if status == 402 and error.get("type") == "card_error":
        decline_code = _bounded(code, CODE_LIMIT) or "card_declined"
        raise CardDeclined(
            message or f"card declined ({decline_code})",
            code=decline_code,
            provider_charge_id=_bounded(error.get("charge"), CHARGE_ID_LIMIT),
        )
    if status == 400:
        param = error.get("param")
        raise InvalidRequest(
            f"provider refused the request: {message or _cut(response)}"
            + (f" (param {param})" if param else ""),
            status=status,
        )
    if status == 401:
        raise AuthenticationFailed(
            "provider refused the API key: fix PAYMENT_PROVIDER_API_KEY, then replay the charge",
            status=status,
        )
    if status == 409 and code == "idempotency_key_in_use":
        raise IdempotencyKeyInUse(
            "an earlier attempt with this key is still in flight at the provider",
            status=status,
            code=code,
        )
    if status == 409 and code == "idempotency_key_reused":
        raise IdempotencyKeyReused(
            "the provider saw this idempotency key with other parameters", status=status, code=code
        )
    if status == 429:
        raise ProviderRateLimited(
            "rate limited by the provider",
            retry_after_s=_retry_after_s(response.headers.get("Retry-After")),
        )
    if 500 <= status <= 599:
        raise ProviderUnavailable(f"provider error {status}: {_cut(response)}", status=status)
    raise ProviderUnavailable(f"unexpected status {status}: {_cut(response)}", status=status)
