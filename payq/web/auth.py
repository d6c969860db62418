"""Bearer tokens: who may call which route, checked before any route runs.

Two kinds of token, from two settings: ``PAYQ_API_TOKENS`` for the web apps that
enqueue (``/v1/...``), ``PAYQ_OPERATOR_TOKENS`` for the ops routes (``/metrics``,
the dashboard under ``/ops``). A token is of one kind only (settings refuse a token
in both lists). Each list may hold several tokens, so one can be rotated: add the
new token, move the callers over, remove the old one.

The check is a middleware rather than a per-route dependency so that nothing,
not even whether a path exists (404 vs 401), is told to a caller without a valid
token. Tokens are compared as SHA-256 digests with ``hmac.compare_digest``, against
every known token without stopping at a match: the time taken says nothing about
how close a guess was, nor about which token matched. A missing, malformed or wrong
token gets the same 401 answer, byte for byte.

A valid token is then held to its rate (``TokenRateLimit``): 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum

from starlette.types import ASGIApp, Receive, Scope, Send

from payq.web.errors import ErrorCode, error_response
from payq.web.ratelimit import TokenRateLimit

__all__ = ["Access", "Authenticate", "Principal", "Role", "Tokens", "access_for"]


class Role(StrEnum):
    INTAKE = "intake"
    OPERATOR = "operator"


class Access(Enum):
    """What a route needs."""

    OPTIONAL = "optional"  # anyone; a valid token sees more (/healthz)
    ANY = "any"  # a valid token of either kind (/openapi.json)
    INTAKE = "intake"
    OPERATOR = "operator"

    def allows(self, role: Role) -> bool:
        return self in (Access.OPTIONAL, Access.ANY) or self.value == role.value


def access_for(path: str) -> Access:
    """The access a path needs. Unknown paths need an intake token, like the API:
    without one, a caller cannot even learn that a path does not exist."""
    if path == "/healthz":
        return Access.OPTIONAL
    if path == "/openapi.json":
        return Access.ANY
    if path == "/metrics" or path == "/ops" or path.startswith("/ops/"):
        return Access.OPERATOR
    return Access.INTAKE


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind a valid token. ``token_id`` is a digest prefix: it names the
    token in logs and rate-limit keys without being usable as one."""

    role: Role
    token_id: str


class Tokens:
    """The known tokens, kept only as digests."""

    def __init__(self, intake: Iterable[str], operator: Iterable[str]) -> None:
        self._known = [
            (hashlib.sha256(token.encode()).digest(), role)
            for tokens, role in ((intake, Role.INTAKE), (operator, Role.OPERATOR))
            for token in tokens
        ]

    def identify(self, presented: bytes) -> Principal | None:
        digest = hashlib.sha256(presented).digest()
        found: Principal | None = None
        for known, role in self._known:  # every one, no early exit
            if hmac.compare_digest(digest, known) and found is None:
                found = Principal(role, known.hex()[:12])
        return found


def _bearer_token(scope: Scope) -> tuple[bool, bytes | None]:
    """(whether an Authorization header was sent, the bearer token in it if well formed)."""
    values = [v for k, v in scope["headers"] if k == b"authorization"]
    if not values:
        return False, None
    if len(values) > 1:
        return True, None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return True, None
    return True, token


_UNAUTHORIZED = error_response(
    401,
    ErrorCode.UNAUTHORIZED,
    "a valid bearer token is required (Authorization: Bearer <token>)",
    headers={"WWW-Authenticate": "Bearer"},
)
_FORBIDDEN = error_response(403, ErrorCode.FORBIDDEN, "this token may not use this route")


class Authenticate:
    """ASGI middleware: every HTTP request passes here before routing.

    Puts the caller's ``Principal`` (or ``None`` on an open route without a token)
    in ``scope["state"]["principal"]``, where routes read it as
    ``request.state.principal``.
    """

    def __init__(self, app: ASGIApp, *, tokens: Tokens, rate_limit: TokenRateLimit) -> None:
        self.app = app
        self.tokens = tokens
        self.rate_limit = rate_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access = access_for(scope["path"])
        sent, token = _bearer_token(scope)
        principal = self.tokens.identify(token) if token is not None else None
        if principal is None and (sent or access is not Access.OPTIONAL):
            await _UNAUTHORIZED(scope, receive, send)
            return
        if principal is not None:
            if not access.allows(principal.role):
                await _FORBIDDEN(scope, receive, send)
                return
            wait_s = self.rate_limit.check(principal.token_id)
            if wait_s is not None:
                retry_after = max(1, math.ceil(wait_s))
                response = error_response(
                    429,
                    ErrorCode.RATE_LIMITED,
                    f"more than {self.rate_limit.per_s} requests in a second with this token; "
                    f"retry after {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                    retry_after_s=retry_after,
                )
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
