"""Bearer tokens: who may call which route, checked before any route runs.

``PAYQ_API_TOKENS`` are for the web apps that enqueue (``/v1/...``),
``PAYQ_OPERATOR_TOKENS`` for the ops routes (``/metrics``, the dashboard under ``/ops``);
settings refuse a token in both. Each list may hold several, for rotation.

A middleware checks before routing, so a caller without a valid token learns nothing,
not even whether a path exists (404 vs 401). Tokens are compared as SHA-256 digests with
``hmac.compare_digest`` against every known token, without stopping at a match: timing
tells neither how close a guess was nor which token matched. A missing, malformed or
wrong token gets the same 401, byte for byte. A valid token is held to its rate
(``TokenRateLimit``): 429 with Retry-After.

**Dashboard sessions.** A browser never holds a bearer token: an operator signs in at
``/ops/login`` (token and name) and gets a session cookie; ``/ops`` takes either. The
cookie, signed by ``itsdangerous`` (HMAC-SHA256) and timestamped, holds the token's id
(never the token), the operator's name (for the audit table) and a per-session CSRF
token every form posts back. It is ``HttpOnly``, ``SameSite=Strict``, ``Path=/ops``, and
``Secure`` when uvicorn sees https (directly, or ``X-Forwarded-Proto`` from a proxy in
``FORWARDED_ALLOW_IPS``). The signing key is derived from the operator tokens: every
``payq serve`` behind one balancer accepts the others' sessions, a restart keeps them,
and changing ``PAYQ_OPERATOR_TOKENS`` signs everyone out (forging a session takes an
operator token, the very power it grants). A session lasts ``SESSION_MAX_AGE_S`` (a
shift); signing out deletes the cookie; without operator tokens none is accepted. A
browser asking for a page without a session is sent to the sign-in form (htmx polling
gets a 401 with ``HX-Redirect``); every other caller gets the one 401 above.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from urllib.parse import quote

from itsdangerous import BadData, URLSafeTimedSerializer
from starlette.requests import cookie_parser
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from producers.intake.errors import ErrorCode, error_response
from producers.intake.ratelimit import TokenRateLimit

__all__ = [
    "SESSION_COOKIE",
    "SESSION_MAX_AGE_S",
    "SIGN_IN_PATH",
    "STATIC_PREFIX",
    "Access",
    "Authenticate",
    "OpsSession",
    "OpsSessions",
    "Principal",
    "Role",
    "Tokens",
    "access_for",
]

#: The dashboard's session cookie (scoped to ``/ops``).
SESSION_COOKIE = "payq_ops"
#: How long a dashboard sign-in lasts: a working shift.
SESSION_MAX_AGE_S = 8 * 3600
SIGN_IN_PATH = "/ops/login"
STATIC_PREFIX = "/ops/static/"


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
    if path == SIGN_IN_PATH or path.startswith(STATIC_PREFIX):
        return Access.OPTIONAL  # the sign-in form and its stylesheet: no secret in either
    if path == "/metrics" or path == "/ops" or path.startswith("/ops/"):
        return Access.OPERATOR
    return Access.INTAKE


def _is_ops(path: str) -> bool:
    return path == "/ops" or path.startswith("/ops/")


@dataclass(frozen=True, slots=True)
class OpsSession:
    """A signed-in dashboard operator: the name written to the audit table, and the
    token this session's forms must post back (CSRF)."""

    name: str
    csrf: str


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind a valid token. ``token_id`` is a digest prefix: it names the
    token in logs and rate-limit keys without being usable as one. ``session`` is set
    when the caller is a browser signed in to the dashboard."""

    role: Role
    token_id: str
    session: OpsSession | None = None
    app: str | None = None  # the web app an intake token belongs to


def _token_id(digest: bytes) -> str:
    return digest.hex()[:12]


class Tokens:
    """The known tokens, kept only as digests; an intake token with its app's name."""

    def __init__(self, intake: Iterable[tuple[str, str]], operator: Iterable[str]) -> None:
        self._known: list[tuple[bytes, Role, str | None]] = [
            (hashlib.sha256(token.encode()).digest(), Role.INTAKE, app) for app, token in intake
        ] + [(hashlib.sha256(token.encode()).digest(), Role.OPERATOR, None) for token in operator]

    def identify(self, presented: bytes) -> Principal | None:
        digest = hashlib.sha256(presented).digest()
        found: Principal | None = None
        for known, role, app in self._known:  # every one, no early exit
            if hmac.compare_digest(digest, known) and found is None:
                found = Principal(role, _token_id(known), app=app)
        return found


class OpsSessions:
    """Issues and checks the dashboard's signed session values (see the module's text)."""

    def __init__(self, operator_tokens: Iterable[str]) -> None:
        tokens = sorted(operator_tokens)
        self._ids = frozenset(_token_id(hashlib.sha256(t.encode()).digest()) for t in tokens)
        key = hmac.new(b"payq ops session v1", "\n".join(tokens).encode(), "sha256").digest()
        self._serializer = URLSafeTimedSerializer(key, salt="payq.ops.session")

    def issue(self, principal: Principal, name: str) -> tuple[str, Principal]:
        """A new session for an operator token's holder: the cookie's value, and the
        principal it stands for (with a fresh CSRF token)."""
        if principal.role is not Role.OPERATOR or principal.token_id not in self._ids:
            raise ValueError("only an operator token opens a dashboard session")
        session = OpsSession(name=name, csrf=secrets.token_urlsafe(24))
        value = self._serializer.dumps(
            {"t": principal.token_id, "n": session.name, "c": session.csrf}
        )
        return value, Principal(Role.OPERATOR, principal.token_id, session)

    def read(self, value: str | None) -> Principal | None:
        """The principal of a session value, or ``None`` if it is missing, forged,
        tampered with, older than ``SESSION_MAX_AGE_S`` or of a token no longer known."""
        if not value or not self._ids:
            return None
        try:
            data = self._serializer.loads(value, max_age=SESSION_MAX_AGE_S)
        except BadData:
            return None
        if not isinstance(data, dict):
            return None
        token_id, name, csrf = data.get("t"), data.get("n"), data.get("c")
        if not all(isinstance(v, str) and v for v in (token_id, name, csrf)):
            return None
        if token_id not in self._ids:
            return None
        return Principal(Role.OPERATOR, str(token_id), OpsSession(str(name), str(csrf)))


def _header(scope: Scope, name: bytes) -> bytes:
    return b", ".join(v for k, v in scope["headers"] if k == name)


def _cookie(scope: Scope, name: str) -> str | None:
    header = b"; ".join(v for k, v in scope["headers"] if k == b"cookie")
    return cookie_parser(header.decode("latin-1")).get(name) if header else None


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
# htmx follows HX-Redirect whatever the status: an expired session's polling lands on
# the sign-in form instead of failing quietly.
_UNAUTHORIZED_HTMX = error_response(
    401,
    ErrorCode.UNAUTHORIZED,
    "a valid bearer token is required (Authorization: Bearer <token>)",
    headers={"WWW-Authenticate": "Bearer", "HX-Redirect": SIGN_IN_PATH},
)


def _to_sign_in(scope: Scope, had_cookie: bool) -> RedirectResponse:
    """A browser's page request without a valid session: to the form, then back here."""
    target = scope["path"] if scope["method"] in ("GET", "HEAD") else "/ops"
    response = RedirectResponse(f"{SIGN_IN_PATH}?next={quote(target, safe='/')}", 303)
    if had_cookie:  # expired or no longer valid: drop it
        response.delete_cookie(SESSION_COOKIE, path="/ops", httponly=True, samesite="strict")
    return response


class Authenticate:
    """ASGI middleware: every HTTP request passes here before routing.

    Puts the caller's ``Principal`` (or ``None`` on an open route without a token)
    in ``scope["state"]["principal"]``, where routes read it as
    ``request.state.principal``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: Tokens,
        rate_limit: TokenRateLimit,
        sessions: OpsSessions | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.rate_limit = rate_limit
        self.sessions = sessions or OpsSessions(())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        access = access_for(path)
        sent, token = _bearer_token(scope)
        principal = self.tokens.identify(token) if token is not None else None
        if principal is None and not sent and access is Access.OPERATOR and _is_ops(path):
            cookie = _cookie(scope, SESSION_COOKIE)
            principal = self.sessions.read(cookie)
            if principal is None and _header(scope, b"hx-request") == b"true":
                await _UNAUTHORIZED_HTMX(scope, receive, send)
                return
            if principal is None and b"text/html" in _header(scope, b"accept"):
                await _to_sign_in(scope, cookie is not None)(scope, receive, send)
                return
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
