"""payq's exceptions, in one tree.

    PayqError
    ├── ConfigError                 a setting is missing or out of range (exit 2)
    ├── ChargeInputError            bad input at the producer: nothing was written
    │   └── RawCardNumberError      the input looked like a card number
    ├── IdempotencyConflict         same key, different parameters
    ├── ChargeNotFound
    ├── ServiceUnavailable          PostgreSQL or Redis did not answer
    ├── RequestNotSent              a request too late to be sent was not sent (stalled)
    └── ProviderError               an outcome of one provider call
        ├── RetryableProviderError  worth another attempt with the same key
        │   ├── ProviderTimeout         no answer in time: the charge may have happened
        │   ├── ProviderConnectionError no answer: connect error or reset
        │   ├── ProviderUnavailable     5xx, unexpected status or body
        │   ├── ProviderRateLimited     429, carries retry_after_s
        │   └── IdempotencyKeyInUse     409: an earlier attempt is still in flight
        └── FinalProviderError      another attempt cannot help
            ├── CardDeclined            402: a business outcome, the charge failed
            ├── InvalidRequest          400
            ├── AuthenticationFailed    401
            └── IdempotencyKeyReused    409: the key was used with other parameters

Provider errors carry their context as attributes (``status``, ``code``,
``retry_after_s``, and ``answer``: the body as it came, cut to 1 KiB); ``error_class``
is the stable name recorded with each attempt.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "CardDeclined",
    "ChargeInputError",
    "ChargeNotFound",
    "ConfigError",
    "FinalProviderError",
    "IdempotencyConflict",
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "PayqError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RawCardNumberError",
    "RequestNotSent",
    "RetryableProviderError",
    "ServiceUnavailable",
]


class PayqError(Exception):
    """Root of every error payq raises on purpose."""


class ConfigError(PayqError):
    """A setting is missing or invalid. The message names the variable."""


class ChargeInputError(PayqError, ValueError):
    """A charge request was refused at the door; nothing was written or sent."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RawCardNumberError(ChargeInputError):
    """A value looked like a raw card number. payq never accepts one."""


class IdempotencyConflict(PayqError):
    """The idempotency key already belongs to a charge with other parameters, or to
    another app's charge (then ``charge_id`` is ``None``: not this caller's to know)."""

    def __init__(
        self, idempotency_key_hint: str, charge_id: str | None, differing: list[str]
    ) -> None:
        if charge_id is None:
            text = (
                f"idempotency key {idempotency_key_hint} is already used by another app; "
                "use keys of your own (prefix them with your app's name, say)"
            )
        else:
            text = (
                f"idempotency key {idempotency_key_hint} already belongs to charge {charge_id} "
                f"with different {', '.join(differing)}; use a new key for a new charge"
            )
        super().__init__(text)
        self.charge_id = charge_id
        self.differing = differing


class ChargeNotFound(PayqError, LookupError):
    def __init__(self, charge_id: str) -> None:
        super().__init__(f"no charge with id {charge_id}")
        self.charge_id = charge_id


class ServiceUnavailable(PayqError):
    """PostgreSQL or Redis did not answer; says which, and what to check."""


class RequestNotSent(PayqError):
    """A charge request was not sent: the process stalled past the time by which it had
    to reach the provider (within the claim's lease). No byte of it left, or too few for
    the provider to act on."""


class ProviderError(PayqError):
    """One provider call ended without a charge. ``error_class`` names the outcome."""

    error_class = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        answer: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.answer = answer


class RetryableProviderError(ProviderError):
    """Another attempt with the same idempotency key may succeed."""

    error_class = "retryable"
    #: The least time to wait before the next attempt, if the provider said so.
    retry_after_s: float | None = None


class ProviderTimeout(RetryableProviderError):
    error_class = "timeout"


class ProviderConnectionError(RetryableProviderError):
    error_class = "connection_error"


class ProviderConnectionRefused(ProviderConnectionError):
    """No connection could be made (refused, unreachable, a failed handshake): not one
    byte of the request left, so it charged nothing."""


class ProviderUnavailable(RetryableProviderError):
    error_class = "provider_unavailable"


class ProviderRateLimited(RetryableProviderError):
    error_class = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None, status: int = 429) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class IdempotencyKeyInUse(RetryableProviderError):
    error_class = "idempotency_key_in_use"


class FinalProviderError(ProviderError):
    """Another attempt cannot help."""

    error_class = "final"


class CardDeclined(FinalProviderError):
    error_class = "card_declined"

    def __init__(
        self, message: str, *, code: str, provider_charge_id: str | None, status: int = 402
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.provider_charge_id = provider_charge_id


class InvalidRequest(FinalProviderError):
    error_class = "invalid_request"


class AuthenticationFailed(FinalProviderError):
    error_class = "authentication_failed"


class IdempotencyKeyReused(FinalProviderError):
    error_class = "idempotency_key_reused"
