"""Signing in to the dashboard and out of it, and the check every change passes.

``/ops/login`` takes an operator token and the operator's name (for the audit table) and
answers with the session cookie described in ``auth``. A wrong, intake or malformed token
gets the same form back with the same neutral line; only the refusal and the caller's
address are logged. An address that failed ``SIGN_IN_FAILURES_PER_MIN`` times in a minute
is refused (429) before its next token is looked at, so a script hammering the form
gets nowhere and stays quiet.

A change (replay, reconcile, purge, signing out) must come from a signed-in session (the
audit needs a name), carry that session's CSRF token (compared in constant time), and,
when the browser sends ``Origin``, come from this server. The token backs up
SameSite=Strict for browsers or proxies that get SameSite wrong.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from payq.ops.dashboard.pages import page
from producers.intake.auth import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    SIGN_IN_PATH,
    OpsSessions,
    Principal,
    Tokens,
)

__all__ = ["SIGN_IN_FAILURES_PER_MIN", "FailedSignIns", "refuse_change", "router"]

log = logging.getLogger("payq.web")

#: Failed sign-ins one address may make in a minute.
SIGN_IN_FAILURES_PER_MIN = 10
# Any printable text: it is only ever shown escaped, and stored as the audit's actor.
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,64}")

router = APIRouter(prefix="/ops", include_in_schema=False)


class FailedSignIns:
    """Failed sign-ins by address, in a moving window (``limits``, in this process's
    memory like the intake's rate limit). Only failures count: an operator who signs in
    often is never held back."""

    def __init__(self, per_min: int = SIGN_IN_FAILURES_PER_MIN) -> None:
        self._item = RateLimitItemPerMinute(per_min)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def blocked(self, address: str) -> bool:
        return not self._limiter.test(self._item, address)

    def failed(self, address: str) -> None:
        self._limiter.hit(self._item, address)


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a page of ours, never another site."""
    if target and (target == "/ops" or target.startswith("/ops/")) and "\\" not in target:
        return target
    return "/ops"


def _same_origin(request: Request) -> bool:
    """A browser's POST names the origin of the page it came from; it must be ours."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host")


@router.get("/login")
async def sign_in_form(request: Request, next: str | None = None) -> Response:
    return page(request, "login.html", {"next": _safe_next(next), "name": ""})


@router.post("/login")
async def sign_in(request: Request) -> Response:
    form = await request.form()
    name = str(form.get("name") or "").strip()
    token = str(form.get("token") or "").strip()
    context = {"next": _safe_next(str(form.get("next") or "")), "name": name}
    address = request.client.host if request.client else "unknown"

    def again(error: str, status: int) -> Response:
        return page(request, "login.html", {**context, "error": error}, status)

    if not _same_origin(request):
        return again("Sign in from this page.", 403)
    failures: FailedSignIns = request.app.state.sign_in_failures
    if failures.blocked(address):
        return again("Too many failed attempts; wait a minute and try again.", 429)
    if not _NAME.fullmatch(name):
        return again(
            "Give your name (up to 64 characters): your actions are recorded under it.", 400
        )
    tokens: Tokens = request.app.state.tokens
    sessions: OpsSessions = request.app.state.sessions
    holder = tokens.identify(token.encode())
    try:
        value, principal = sessions.issue(holder, name) if holder else ("", None)
    except ValueError:  # a valid token, but not an operator's: the same answer
        value, principal = "", None
    if principal is None:
        failures.failed(address)
        log.warning("dashboard sign-in refused from %s", address)
        return again("Sign-in failed. Check the token and try again.", 401)
    log.info("dashboard sign-in: %r (operator token %s) from %s", name, principal.token_id, address)
    response = RedirectResponse(context["next"], 303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_MAX_AGE_S,
        path="/ops",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


def refuse_change(request: Request, form: Mapping[str, Any]) -> Response | None:
    """``None`` if this POST may change something, else the page that says why not."""
    principal: Principal = request.state.principal
    if principal.session is None:
        message = "Changes need a signed-in operator (the audit trail records your name): sign in."
        return page(request, "error.html", {"title": "Sign in to act", "message": message}, 403)
    sent = str(form.get("csrf") or "").encode()
    if not (_same_origin(request) and hmac.compare_digest(sent, principal.session.csrf.encode())):
        message = "This form has expired or did not come from this dashboard. Reload the page."
        return page(request, "error.html", {"title": "Refused", "message": message}, 403)
    return None


@router.post("/logout")
async def sign_out(request: Request) -> Response:
    refused = refuse_change(request, await request.form())
    if refused is not None:
        return refused
    response = RedirectResponse(SIGN_IN_PATH, 303)
    response.delete_cookie(SESSION_COOKIE, path="/ops", httponly=True, samesite="strict")
    return response
