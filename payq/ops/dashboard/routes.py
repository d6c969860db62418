"""The operators' dashboard, under ``/ops``: live figures, the dead-letter list, a
charge's history, and replay / reconcile / purge.

Every ``/ops`` path but the sign-in form and its static files needs an operator (a
``PAYQ_OPERATOR_TOKENS`` bearer token or the session cookie from signing in: ``auth``,
``signin``); the middleware refuses anyone else before routing. Pages add no rule of
their own: they parse input, call what ``payq status`` and ``payq dlq`` call
(``payq.ops.status``, ``payq.ops.dlq``, ``payq.ops.reconcile``) and render the answer as
HTML (``pages``); htmx, vendored in ``static/`` for offline machines, refetches a page's
live fragment every few seconds. Pages read where ``payq.reads`` says (a replica when one
is configured and close enough behind) and say so; actions write on the primary.

A change is two steps: a confirmation page that dry-runs the function and shows what
would change (count, ids, amounts), then a form POST with the session's CSRF token that
runs it, written to ``operator_actions`` under the operator's signed-in name. A filtered
change is bounded to the charges dead when confirmed (``until``): what runs is what was
shown, or less.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlencode

import redis
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.datastructures import ImmutableMultiDict

from payq.broker import get_broker
from payq.db import get_engine
from payq.errors import ChargeNotFound, ServiceUnavailable
from payq.figures import attempt_series, breaker_figures
from payq.ops.cli import parse_when
from payq.ops.dashboard import actions, signin
from payq.ops.dashboard.pages import STATIC_DIR, chart, page
from payq.ops.dashboard.signin import FailedSignIns, refuse_change
from payq.ops.dlq import DeadFilter, dead_charges, purge, replay, show, totals
from payq.ops.reconcile import reconcile
from payq.ops.status import snapshot
from payq.provider import ProviderClient
from payq.reads import read_engine
from payq.routing import Routes
from payq.settings import Settings
from producers.intake.auth import Principal
from producers.intake.blocking import Blocking

__all__ = ["FilterInput", "install", "router"]

log = logging.getLogger("payq.web")

#: Minutes the throughput and latency chart covers.
CHART_MINUTES = 15
#: Dead charges listed on one page (the totals count them all).
LIST_LIMIT = 200
#: Ids a confirmation page lists (the count covers them all).
CONFIRM_SHOWN = 50
#: The replay rate of the dashboard, as ``payq dlq replay``'s default.
REPLAY_RATE_PER_S = 50.0
ACTIONS = ("replay", "reconcile", "purge")

_UNAVAILABLE = (ServiceUnavailable, OperationalError, PoolTimeout, redis.RedisError)

T = TypeVar("T")
P = ParamSpec("P")


def _html_errors(
    route: Callable[P, Awaitable[Response]],
) -> Callable[P, Awaitable[Response]]:
    """A page whose database or Redis did not answer says so in HTML, not the API's JSON."""

    @functools.wraps(route)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> Response:
        request = kwargs["request"]
        assert isinstance(request, Request)
        try:
            return await route(*args, **kwargs)
        except _UNAVAILABLE as exc:
            log.warning("ops page answered 503: %s", exc)
            message = "PostgreSQL or Redis did not answer in time; nothing was changed. Try again."
            return _error(request, "Unavailable", message, 503)
        except ChargeNotFound:
            return _error(request, "Not found", "No such charge.", 404)

    return guarded


def _error(request: Request, title: str, message: str, status: int) -> Response:
    return page(request, "error.html", {"title": title, "message": message}, status)


async def _core(request: Request, call: Callable[[], T]) -> T:
    blocking: Blocking = request.app.state.blocking
    return await blocking.run(call)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# -- Filters: the same as ``payq dlq list`` ------------------------------------------------


class FilterInput:
    """A dead-letter filter as a form sends it: parsed, with what was typed kept for the
    form and an error per refused field."""

    FIELDS = ("reason", "error_class", "since", "until", "min_amount", "max_amount", "currency")

    def __init__(self, params: ImmutableMultiDict[str, Any]) -> None:
        self.values = {f: str(params.get(f) or "").strip() for f in self.FIELDS}
        self.include_purged = params.get("include_purged") in ("1", "on")
        self.errors: dict[str, str] = {}
        self.ids: list[uuid.UUID] = []
        for text in params.getlist("id"):
            try:
                self.ids.append(uuid.UUID(str(text)))
            except ValueError:
                self.errors["id"] = "not a charge id"
        times = {f: self._time(f) for f in ("since", "until")}
        amounts = {f: self._amount(f) for f in ("min_amount", "max_amount")}
        currency = self.values["currency"]
        if currency and not re.fullmatch(r"[A-Za-z]{3}", currency):
            self.errors["currency"] = "three letters, e.g. usd"
        self.filter = DeadFilter(
            ids=tuple(self.ids),
            reason=self.values["reason"] or None,
            error_class=self.values["error_class"] or None,
            since=times["since"],
            until=times["until"],
            min_amount=amounts["min_amount"],
            max_amount=amounts["max_amount"],
            currency=currency or None,
            include_purged=self.include_purged,
        )

    def _time(self, field: str) -> dt.datetime | None:
        text = self.values[field]
        try:
            return parse_when(text) if text else None
        except argparse.ArgumentTypeError as exc:
            self.errors[field] = str(exc)
            return None

    def _amount(self, field: str) -> int | None:
        text = self.values[field]
        if text and not text.isdigit():
            self.errors[field] = "minor units, a whole number (1999 for 19.99)"
            return None
        return int(text) if text else None

    def frozen(self) -> DeadFilter:
        """The filter bound to now: ages become times, and a filter that names no ids
        stops at this moment, so charges that die after it was confirmed are not touched."""
        flt = self.filter
        if flt.ids:
            return flt
        now = dt.datetime.now(dt.UTC)
        return dataclasses.replace(flt, until=min(flt.until or now, now))

    def query(self) -> str:
        """The filter as a query string (for links between pages)."""
        pairs = [(k, v) for k, v in self.values.items() if v]
        pairs += [("id", str(i)) for i in self.ids]
        if self.include_purged:
            pairs.append(("include_purged", "1"))
        return urlencode(pairs)


def _hidden(flt: DeadFilter) -> list[tuple[str, str]]:
    """A filter as the confirmation form's hidden fields (times as ISO text)."""
    fields: list[tuple[str, str]] = [("id", str(i)) for i in flt.ids]
    for name in ("reason", "error_class", "min_amount", "max_amount", "currency"):
        value = getattr(flt, name)
        if value is not None:
            fields.append((name, str(value)))
    for name in ("since", "until"):
        when = getattr(flt, name)
        if when is not None:
            fields.append((name, when.isoformat()))
    if flt.include_purged:
        fields.append(("include_purged", "1"))
    return fields


def _which(flt: DeadFilter) -> list[str]:
    """A filter in words, for the confirmation page."""
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    words = [
        (flt.ids, f"{len(flt.ids)} named charge{'s' if len(flt.ids) != 1 else ''}"),
        (flt.reason, f"reason contains “{flt.reason}”"),
        (flt.error_class, f"last error {flt.error_class}"),
        (flt.since, f"dead since {flt.since:{stamp}}" if flt.since else ""),
        (flt.until, f"dead before {flt.until:{stamp}}" if flt.until else ""),
        (flt.min_amount is not None, f"amount at least {flt.min_amount} (minor units)"),
        (flt.max_amount is not None, f"amount at most {flt.max_amount} (minor units)"),
        (flt.currency, f"in {(flt.currency or '').upper()}"),
        (flt.include_purged, "purged ones too"),
    ]
    return [text for given, text in words if given] or ["every dead charge"]


# -- Routes ---------------------------------------------------------------------------------

router = APIRouter(prefix="/ops", tags=["ops"], include_in_schema=False)


def _live_figures(settings: Settings) -> dict[str, Any]:
    snap = snapshot(settings)
    snap["chart"] = chart(attempt_series(CHART_MINUTES, read_engine()))
    snap["dead_preview"] = dead_charges(DeadFilter(), limit=6)
    errors = snap["provider"]["last_60_min"]["errors_by_class"]
    snap["errors_max"] = max(errors.values(), default=1)
    return snap


async def _overview(request: Request, template: str) -> Response:
    settings = _settings(request)
    snap = await _core(request, lambda: _live_figures(settings))
    return page(request, template, {"snap": snap, "breaker": snap["breaker"]})


@router.get("")
@_html_errors
async def dashboard(request: Request) -> Response:
    return await _overview(request, "dashboard.html")


@router.get("/live")
@_html_errors
async def live(request: Request) -> Response:
    """The overview's live part alone, for the page's refresh every few seconds."""
    return await _overview(request, "_live.html")


@router.get("/breaker")
@_html_errors
async def breaker(request: Request) -> Response:
    """The header's state badge, refreshed on every page."""
    settings = _settings(request)

    def figures() -> dict[str, Any]:  # the first-priority endpoint's, as payq status's
        gate = Routes.build(settings, get_broker().client).primary.gate
        return breaker_figures(gate.breaker)

    return page(request, "_breaker.html", {"breaker": await _core(request, figures)})


@router.get("/dead")
@_html_errors
async def dead_list(request: Request) -> Response:
    given = FilterInput(request.query_params)
    dead: list[Any] = []
    sums: dict[str, tuple[int, int]] = {}
    if not given.errors:
        dead, sums = await _core(
            request, lambda: (dead_charges(given.filter, limit=LIST_LIMIT), totals(given.filter))
        )
    count = sum(n for n, _ in sums.values())
    return page(
        request,
        "dead.html",
        {"given": given, "dead": dead, "sums": sums, "count": count, "query": given.query()},
        400 if given.errors else 200,
    )


@router.get("/charges")
async def open_charge(request: Request, id: str = "") -> Response:
    """The header's "open a charge" box."""
    try:
        return RedirectResponse(f"/ops/charges/{uuid.UUID(id.strip())}", 303)
    except ValueError:
        message = "That is not a charge id (one looks like 4ae6db59-0a2c-4657-…)."
        return _error(request, "Not a charge id", message, 404)


async def _charge(request: Request, charge_id: str, template: str) -> Response:
    try:
        cid = uuid.UUID(charge_id)
    except ValueError:
        raise ChargeNotFound(charge_id) from None
    dead, attempts = await _core(request, lambda: show(cid))
    now = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    context = {"dead": dead, "c": dead.charge, "attempts": attempts, "now": now}
    return page(request, template, context)


@router.get("/charges/{charge_id}")
@_html_errors
async def charge_page(request: Request, charge_id: str) -> Response:
    return await _charge(request, charge_id, "charge.html")


@router.get("/charges/{charge_id}/live")
@_html_errors
async def charge_live(request: Request, charge_id: str) -> Response:
    return await _charge(request, charge_id, "_charge.html")


def _dry_run(action: str, flt: DeadFilter, actor: str, settings: Settings) -> dict[str, Any]:
    """What ``action`` would do: the function's own dry run, and the money involved."""
    skipped: dict[uuid.UUID, str] = {}
    if action == "replay":
        report = replay(flt, actor=actor, dry_run=True, settings=settings)
        ids, skipped = report.planned, report.skipped
    elif action == "purge":
        ids = purge(flt, actor=actor, dry_run=True)
    else:
        ids = reconcile(flt, actor=actor, dry_run=True, settings=settings).planned
    # The money of what the dry run found on the primary: from the primary too.
    money = totals(DeadFilter(ids=ids, include_purged=True), get_engine()) if ids else {}
    return {"ids": ids, "skipped": skipped, "totals": money}


@router.get("/confirm/{action}")
@_html_errors
async def confirm(request: Request, action: str) -> Response:
    if action not in ACTIONS:
        return _error(request, "Not found", "No such action.", 404)
    given = FilterInput(request.query_params)
    if given.errors:
        problems = "; ".join(f"{k}: {v}" for k, v in given.errors.items())
        return _error(request, "Bad filter", problems, 400)
    flt = given.frozen()
    principal: Principal = request.state.principal
    actor = principal.session.name if principal.session else "?"
    settings = _settings(request)
    plan = await _core(request, lambda: _dry_run(action, flt, actor, settings))
    context = {
        "action": action,
        "flt": flt,
        "which": _which(flt),
        "hidden": _hidden(flt),
        "plan": plan,
        "shown": CONFIRM_SHOWN,
        "rate": REPLAY_RATE_PER_S,
        "back": f"/ops/charges/{flt.ids[0]}" if len(flt.ids) == 1 else f"/ops/dead?{given.query()}",
    }
    if principal.session is not None and plan["ids"]:
        secret = principal.session.csrf
        context["action_token"] = await _core(
            request,
            lambda: actions.issue(action=action, flt=flt.describe(), session_secret=secret),
        )
    return page(request, "confirm.html", context)


def _act(action: str, flt: DeadFilter, actor: str, settings: Settings) -> dict[str, Any]:
    """Run the action for real, as the CLI does, and what it did, for the result page
    (plain JSON: it is kept with the action's token)."""
    return _as_json(_run_action(action, flt, actor, settings))


def _as_json(result: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {str(k): v for k, v in value.items()}
        if isinstance(value, dict)
        else [str(v) for v in value]
        for name, value in result.items()
    }


def _run_action(action: str, flt: DeadFilter, actor: str, settings: Settings) -> dict[str, Any]:
    if action == "replay":
        report = replay(flt, actor=actor, rate_per_s=REPLAY_RATE_PER_S, settings=settings)
        done, left = report.replayed, dict(report.skipped)
    elif action == "purge":
        done, left = purge(flt, actor=actor), {}
    else:
        provider = ProviderClient(settings)
        try:
            result = reconcile(flt, actor=actor, provider=provider, settings=settings)
        finally:
            provider.close()
        done, left = result.settled, dict(result.pending)
        return {
            "done": done,
            "left": left,
            "succeeded": result.succeeded,
            "failed": result.failed,
            "not_charged": result.not_charged,
        }
    for cid in flt.ids:
        if cid not in done and cid not in left:
            left[cid] = "not a dead charge in the view (not dead any more, or purged)"
    return {"done": done, "left": left}


@router.post("/actions/{action}")
@_html_errors
async def act(request: Request, action: str) -> Response:
    if action not in ACTIONS:
        return _error(request, "Not found", "No such action.", 404)
    form = await request.form()
    refused = refuse_change(request, form)
    if refused is not None:
        return refused
    given = FilterInput(form)
    token = str(form.get("action_token") or "")
    if given.errors or given.filter.is_empty() or not _TOKEN.fullmatch(token):
        return _error(request, "Bad request", "Start from a confirmation page.", 400)
    principal: Principal = request.state.principal
    assert principal.session is not None
    actor = principal.session.name
    results = RedirectResponse(f"/ops/results/{token}", 303)
    flt = given.filter
    secret = principal.session.csrf
    claimed = await _core(
        request,
        lambda: actions.claim(
            token, action=action, flt=flt.describe(), session_secret=secret, actor=actor
        ),
    )
    if claimed is actions.Claim.USED:
        return results  # submitted before (a reload, a second tab): shown, not redone
    if claimed is actions.Claim.REFUSED:
        message = (
            "This confirmation is not valid for this action any more (expired, changed, or "
            "from another page): start again from the dead letters."
        )
        return _error(request, "Confirm again", message, 409)
    settings = _settings(request)
    result = await _core(request, lambda: _act(action, flt, actor, settings))
    result["back"] = f"/ops/charges/{flt.ids[0]}" if len(flt.ids) == 1 else "/ops/dead"
    await _core(request, lambda: actions.finish(token, result))
    log.info(
        "dashboard %s by %r (token %s): %d done, %d left",
        action,
        actor,
        principal.token_id,
        len(result["done"]),
        len(result["left"]),
    )
    return results


_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")


@router.get("/results/{token}")
@_html_errors
async def result_page(request: Request, token: str) -> Response:
    """What a confirmed action did: a page of its own, safe to reload."""
    found = await _core(request, lambda: actions.stored(token)) if _TOKEN.fullmatch(token) else None
    if found is None:
        return _error(request, "Not found", "No such action.", 404)
    if found["result"] is None:
        return page(request, "working.html", {"action": found["action"]})
    result = found["result"]
    return page(
        request,
        "result.html",
        {"action": found["action"], "result": result, "back": result["back"],
         "actor": found["actor"]},
    )  # fmt: skip


def install(app: FastAPI) -> FastAPI:
    """The dashboard's routes, its static files, and what signing in needs, on the intake's
    app (``producers.intake.create_app``: its tokens and sessions on ``app.state``)."""
    app.state.sign_in_failures = FailedSignIns()
    app.include_router(signin.router)
    app.include_router(router)
    app.mount("/ops/static", StaticFiles(directory=STATIC_DIR), name="ops-static")
    return app
