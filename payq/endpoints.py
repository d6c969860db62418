"""The provider endpoints payq may call, each with its own settings and ledger group.

``PAYMENT_ENDPOINTS`` is one JSON list, one object per endpoint::

    [{"name": "eu", "url": "https://eu.pay.example", "group": "acme"},
     {"name": "us", "url": "https://us.pay.example", "group": "acme"},
     {"name": "backup", "url": "https://pay.other.example", "api_key": "sk_...",
      "priority": 2}]

Endpoints of one **ledger group** share one idempotency namespace (one account behind
several URLs): a charge may go to any of them with its key. Different groups are
different books, so a charge is pinned to the group it was last sent to until that
group is proven not to have charged it (``payq.routing``). ``priority``: lower first
(default: the endpoint's place in the list); ``weight`` splits traffic among endpoints
of equal priority. Every other field defaults to the matching ``PAYMENT_*`` or
``BREAKER_*`` setting, and ``group`` to the endpoint's own name (its own books).

Without ``PAYMENT_ENDPOINTS``, ``PAYMENT_PROVIDER_URL`` and ``PAYMENT_PROVIDER_API_KEY``
make one endpoint named ``default``, exactly as before there were several.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

__all__ = ["DEFAULT_ENDPOINT", "EndpointSpec", "base_url_problem", "parse_endpoints"]

#: The one endpoint of a configuration without ``PAYMENT_ENDPOINTS``.
DEFAULT_ENDPOINT = "default"

_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"

#: Endpoint fields that override a setting of the same meaning, and that setting.
OVERRIDES = {
    "timeout_ms": "payment_timeout_ms",
    "connect_timeout_ms": "payment_connect_timeout_ms",
    "pool_max_connections": "payment_pool_max_connections",
    "max_concurrency": "payment_max_concurrency",
    "breaker_failure_rate": "breaker_failure_rate",
    "breaker_slow_call_rate": "breaker_slow_call_rate",
    "breaker_slow_call_ms": "breaker_slow_call_ms",
    "breaker_min_calls": "breaker_min_calls",
    "breaker_window_s": "breaker_window_s",
    "breaker_open_s": "breaker_open_s",
    "breaker_half_open_probes": "breaker_half_open_probes",
}


#: The most endpoints PAYMENT_ENDPOINTS may list.
MAX_ENDPOINTS = 32


def base_url_problem(url: str) -> str | None:
    """What is wrong with a provider's base URL, or ``None``: http(s), a host, a port that
    exists, no credentials (the key goes in ``api_key``), no query or fragment (paths
    such as ``/v1/charges`` are added to it), at most 2048 characters. Never quotes it."""
    if len(url) > 2048:
        return "is longer than 2048 characters"
    try:
        parsed = httpx.URL(url)
        parsed.netloc  # noqa: B018  (encodes the host: IDNA errors show here)
    except Exception as exc:  # httpx's own, IDNA's, or any other: not usable
        return f"is not a usable URL ({type(exc).__name__})"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "must be an http:// or https:// URL with a host"
    if parsed.userinfo:
        return "must not hold credentials (user:password@); put the key in api_key"
    if parsed.query or parsed.fragment or "?" in url or "#" in url:
        return "must be a base URL, without ? or # (payq adds /v1/charges to it)"
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        return "has a port outside 1-65535"
    return None


class _Entry(BaseModel):
    """One object of ``PAYMENT_ENDPOINTS``, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(pattern=_NAME)
    url: str = Field(pattern=r"^https?://[^\s]+$")
    api_key: SecretStr | None = Field(None, min_length=1, max_length=512)
    group: str | None = Field(None, pattern=_NAME)
    priority: int | None = Field(None, ge=1, le=1000)
    weight: int = Field(1, ge=1, le=1000)
    timeout_ms: int | None = Field(None, ge=100, le=600_000)
    connect_timeout_ms: int | None = Field(None, ge=10, le=600_000)
    pool_max_connections: int | None = Field(None, ge=1, le=1000)
    max_concurrency: int | None = Field(None, ge=1, le=100_000)
    breaker_failure_rate: float | None = Field(None, gt=0, le=1)
    breaker_slow_call_rate: float | None = Field(None, gt=0, le=1)
    breaker_slow_call_ms: int | None = Field(None, ge=1, le=600_000)
    breaker_min_calls: int | None = Field(None, ge=1, le=100_000)
    breaker_window_s: int | None = Field(None, ge=1, le=3600)
    breaker_open_s: int | None = Field(None, ge=1, le=3600)
    breaker_half_open_probes: int | None = Field(None, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _usable(cls, url: str) -> str:
        problem = base_url_problem(url)
        if problem:
            raise ValueError(problem)
        return url


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint as ``PAYMENT_ENDPOINTS`` gives it: ``overrides`` are the settings it
    sets for itself (its URL, maybe its key, timeouts, pool, limit, breaker)."""

    index: int  # its place in the list, from 1
    name: str
    group: str
    priority: int
    weight: int
    overrides: dict[str, Any] = field(repr=False)


def parse_endpoints(text: str | None) -> tuple[EndpointSpec, ...]:
    """The endpoints ``PAYMENT_ENDPOINTS`` lists (none when unset or blank); ``ValueError``
    with one line naming the entry and field when it is wrong (never its values: it holds
    API keys). ``Settings.endpoints`` resolves them against the other settings."""
    if text is None or not text.strip():
        return ()
    return tuple(_spec(i, entry) for i, entry in enumerate(_entries(text), 1))


def _spec(index: int, entry: _Entry) -> EndpointSpec:
    overrides: dict[str, Any] = {"payment_provider_url": entry.url}
    if entry.api_key is not None:
        overrides["payment_provider_api_key"] = entry.api_key
    for name, setting in OVERRIDES.items():
        value = getattr(entry, name)
        if value is not None:
            overrides[setting] = value
    return EndpointSpec(
        index=index,
        name=entry.name,
        group=entry.group or entry.name,
        priority=entry.priority if entry.priority is not None else index,
        weight=entry.weight,
        overrides=overrides,
    )


def _entries(text: str) -> list[_Entry]:
    try:
        data = json.loads(text, object_pairs_hook=_no_repeats)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"PAYMENT_ENDPOINTS: not valid JSON ({exc.msg} at character {exc.pos}); write a "
            'list of objects such as [{"name": "eu", "url": "https://..."}] (in .env, quote '
            "a value over several lines)"
        ) from None
    except _Repeated as exc:
        raise ValueError(
            f"PAYMENT_ENDPOINTS: a field is given twice in one entry ({exc})"
        ) from None
    if not isinstance(data, list) or not data:
        raise ValueError(
            "PAYMENT_ENDPOINTS: must be a non-empty JSON list of endpoint objects "
            '([{"name": "eu", "url": "https://..."}]), or unset for one endpoint'
        )
    if len(data) > MAX_ENDPOINTS:
        raise ValueError(f"PAYMENT_ENDPOINTS: at most {MAX_ENDPOINTS} endpoints (got {len(data)})")
    entries = []
    for i, item in enumerate(data, 1):
        try:
            entries.append(_Entry.model_validate(item))
        except ValidationError as exc:
            raise ValueError(f"PAYMENT_ENDPOINTS: entry {i}: {_describe(exc)}") from None
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"PAYMENT_ENDPOINTS: endpoint names must differ ({', '.join(twice)} twice)"
        )
    return entries


class _Repeated(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise _Repeated(", ".join(twice)[:100])
    return dict(pairs)


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ()))
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "string_pattern_mismatch":
        message = (
            "must be an http:// or https:// URL"
            if where == "url"
            else "must be 1-32 lower-case letters, digits, '_' or '-' (a letter or digit first)"
        )
    if error.get("type") == "extra_forbidden":
        known = ", ".join(_Entry.model_fields)
        message = f"unknown field (known: {known})"
    if error.get("type") == "model_type":
        return "must be a JSON object"
    return f"{where}: {message}" if where else message
