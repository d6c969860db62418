"""The ops dashboard in-process: signing in, the session cookie, CSRF, what the pages
show, and replay / reconcile / purge through the confirmation step, against real
PostgreSQL, Redis and the provider simulator."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text

from payq.db import transaction
from payq.figures import attempt_series
from payq.models import operator_actions
from payq.ops.dashboard.pages import chart
from payq.ops.dashboard.signin import SIGN_IN_FAILURES_PER_MIN
from payq.processing import Result, process_charge
from payq.provider import ProviderClient
from payq.settings import load_settings
from producers import enqueue_charge
from producers.intake.auth import SESSION_COOKIE, OpsSessions, Tokens
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim, charge, passed, statuses, unique_key
from tests.ops.endpoints import BREAKER, two_endpoints
from tests.webapp import INTAKE, OPERATOR, bearer, make_app

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean")]

HTML = {"Accept": "text/html,application/xhtml+xml"}


class Dead:
    """Makes dead charges the way workers do: one attempt, budget of one."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.settings = load_settings(payment_provider_url=sim.url, retry_max_attempts=1)
        self.provider = ProviderClient(self.settings)

    def make(self, step: str, amount: int = 1999, currency: str = "usd") -> uuid.UUID:
        """Dead after one attempt ending in ``step``; when that leaves the outcome unclear,
        the lookup by key before it went dead failed too (outcome unknown)."""
        self.sim.faults(script=[step], timeout_delay_s=3, lookup_error_rate=1.0)
        cid = enqueue_charge(amount, currency, "tok_visa", unique_key("dash")).id
        result = process_charge(str(cid), settings=self.settings, provider=self.provider)
        self.sim.faults(lookup_error_rate=0.0)
        assert result is Result.DEAD
        return cid


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


@pytest.fixture
def dead(sim: Sim) -> Iterator[Dead]:
    d = Dead(sim)
    yield d
    d.provider.close()


@pytest.fixture
async def app(sim: Sim) -> AsyncIterator[FastAPI]:
    made = make_app(payment_provider_url=sim.url)
    yield made
    made.state.health.close()


Browser = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def browser(app: FastAPI) -> AsyncIterator[Browser]:
    """Clients that act like a browser on the dashboard: no bearer token, cookies kept."""
    clients: list[httpx.AsyncClient] = []

    def open_one(base_url: str = "http://dash.test") -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url=base_url,
            headers={**HTML, "Origin": base_url},
        )
        clients.append(client)
        return client

    yield open_one
    for client in clients:
        await client.aclose()


async def sign_in(
    client: httpx.AsyncClient, token: str = OPERATOR, name: str = "alice", **extra: str
) -> httpx.Response:
    return await client.post("/ops/login", data={"name": name, "token": token, **extra})


def csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "no CSRF field on the page"
    return found.group(1)


def hidden_fields(page: httpx.Response) -> list[tuple[str, str]]:
    form = page.text[page.text.index('action="/ops/actions/') :]
    return re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form)


async def submit(
    client: httpx.AsyncClient, path: str, fields: list[tuple[str, str]], **headers: str
) -> httpx.Response:
    """A form POST as a browser sends it (repeated fields and all), following its
    redirect to the result's page as a browser does."""
    form = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    return await client.post(path, content=urlencode(fields), headers=form, follow_redirects=True)


def audit_rows() -> list[dict[str, Any]]:
    with transaction() as conn:
        return [dict(r) for r in conn.execute(select(operator_actions)).mappings()]


# -- Signing in ----------------------------------------------------------------------------


async def test_sign_in_sets_an_httponly_strict_cookie_without_the_token(browser: Browser) -> None:
    client = browser()
    form = await client.get("/ops/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    signed = await sign_in(client, next="/ops/dead")
    assert signed.status_code == 303 and signed.headers["location"] == "/ops/dead"
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/ops" in cookie.lower()
    assert "secure" not in attributes  # plain http here: a Secure cookie would never return
    assert OPERATOR not in cookie and OPERATOR[:16] not in cookie
    page = await client.get("/ops")
    assert page.status_code == 200 and "Signed in as <strong>alice</strong>" in page.text


async def test_the_cookie_is_secure_over_https(browser: Browser) -> None:
    signed = await sign_in(browser("https://dash.test"))
    assert signed.status_code == 303 and "secure" in signed.headers["set-cookie"].lower()


@pytest.mark.parametrize("token", ["", "wrong-" + "x" * 30, OPERATOR + "x", INTAKE])
async def test_a_wrong_token_gets_the_form_again_and_tells_nothing(
    browser: Browser, token: str
) -> None:
    client = browser()
    refused = await sign_in(client, token=token)
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    assert "Sign-in failed. Check the token and try again." in refused.text
    assert "intake" not in refused.text.lower()  # not even which kind of token it was
    if token:
        assert token not in refused.text
    assert (await client.get("/ops")).status_code == 303  # still not signed in


async def test_sign_in_needs_a_name_and_goes_only_to_our_own_pages(browser: Browser) -> None:
    client = browser()
    assert (await sign_in(client, name="  ")).status_code == 400
    for target in ("https://evil.example/", "//evil.example/ops", "/v1/charges", "/ops\\x"):
        signed = await sign_in(browser(), next=target)
        assert signed.headers["location"] == "/ops"


async def test_failed_sign_ins_are_limited_per_address(browser: Browser) -> None:
    client = browser()
    for _ in range(SIGN_IN_FAILURES_PER_MIN):
        assert (await sign_in(client, token="wrong-" + "x" * 30)).status_code == 401
    blocked = await sign_in(client)  # the right token, but only after a minute
    assert blocked.status_code == 429 and "set-cookie" not in blocked.headers


async def test_without_a_session_a_browser_is_sent_to_sign_in_and_a_program_gets_401(
    browser: Browser, app: FastAPI
) -> None:
    client = browser()
    to_form = await client.get("/ops/dead")
    assert to_form.status_code == 303 and to_form.headers["location"] == "/ops/login?next=/ops/dead"
    polled = await client.get("/ops/live", headers={"HX-Request": "true"})
    assert polled.status_code == 401 and polled.headers["hx-redirect"] == "/ops/login"
    program = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
    async with program:
        assert (await program.get("/ops")).status_code == 401
        forged = await program.get("/ops", headers={"Cookie": f"{SESSION_COOKIE}=e30.aGk.bm8"})
        assert forged.status_code == 401


async def test_a_tampered_expired_or_foreign_session_is_refused() -> None:
    tokens = Tokens([("default", INTAKE)], [OPERATOR])
    sessions = OpsSessions([OPERATOR])
    holder = tokens.identify(OPERATOR.encode())
    assert holder is not None
    value, principal = sessions.issue(holder, "alice")
    assert principal.session is not None and principal.session.name == "alice"
    assert sessions.read(value) == principal
    assert sessions.read(value[:-2] + ("AA" if value[-2:] != "AA" else "BB")) is None
    assert sessions.read("") is None and sessions.read(None) is None
    # Another token list (a rotation, a removal): every session signed before is void.
    assert OpsSessions([OPERATOR + "-new"]).read(value) is None
    assert OpsSessions([]).read(value) is None
    intake = tokens.identify(INTAKE.encode())
    assert intake is not None
    with pytest.raises(ValueError):
        sessions.issue(intake, "mallory")


async def test_sign_out_needs_the_csrf_token_and_drops_the_cookie(browser: Browser) -> None:
    client = browser()
    await sign_in(client)
    page = await client.get("/ops")
    assert (await client.post("/ops/logout", data={"csrf": "nope"})).status_code == 403
    out = await client.post("/ops/logout", data={"csrf": csrf(page)})
    assert out.status_code == 303 and "max-age=0" in out.headers["set-cookie"].lower()
    assert (await client.get("/ops")).status_code == 303


async def test_static_files_and_the_form_need_no_token(app: FastAPI) -> None:
    anyone = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
    async with anyone:
        script = await anyone.get("/ops/static/htmx.min.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert (await anyone.get("/ops/static/ops.css")).status_code == 200
        escaping = await anyone.get("/ops/static/..%2fauth.py")  # the path arrives decoded
        assert escaping.status_code == 404 and "Tokens" not in escaping.text
        assert (await anyone.get("/ops/login")).status_code == 200


# -- Pages ----------------------------------------------------------------------------------


async def test_pages_are_sent_with_a_strict_policy(browser: Browser) -> None:
    client = browser()
    await sign_in(client)
    page = await client.get("/ops")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe" not in policy
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "same-origin"
    assert "<script>" not in page.text and "style=" not in page.text


async def test_the_overview_shows_the_database_counts_and_refreshes(
    browser: Browser, dead: Dead
) -> None:
    dead.make("invalid_request")
    enqueue_charge(500, "usd", "tok_visa", "pending-1")
    client = browser()
    await sign_in(client)
    page = await client.get("/ops")
    assert page.status_code == 200
    shown = dict(re.findall(r'data-status="(\w+)">\s*<div class="label">\w+</div>\s*'
                            r'<span class="n" data-count="(\d+)"', page.text))  # fmt: skip
    in_db = statuses()
    assert {s: int(n) for s, n in shown.items()} == {
        s: in_db.get(s, 0)
        for s in ("pending", "processing", "retrying", "succeeded", "failed", "dead")
    }
    assert shown["dead"] == "1" and shown["pending"] == "1"
    assert 'hx-trigger="every 4s"' in page.text and "Breaker closed" in page.text
    live = await client.get("/ops/live", headers={"HX-Request": "true"})
    assert live.status_code == 200 and live.text.lstrip().startswith('<section id="live"')
    badge = await client.get("/ops/breaker", headers={"HX-Request": "true"})
    assert 'class="badge breaker-closed"' in badge.text


async def test_a_bearer_token_can_read_but_not_act(app: FastAPI, dead: Dead) -> None:
    cid = dead.make("invalid_request")
    program = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://x", headers=bearer(OPERATOR)
    )
    async with program:
        assert (await program.get("/ops")).status_code == 200
        confirm = await program.get(f"/ops/confirm/replay?id={cid}")
        assert "Sign in to act" in confirm.text and "/ops/actions/" not in confirm.text
        acted = await program.post("/ops/actions/replay", data={"id": str(cid), "csrf": "x"})
        assert acted.status_code == 403
    assert charge(cid).status == "dead" and audit_rows() == []


async def test_the_dead_list_filters_as_the_cli_does(browser: Browser, dead: Dead) -> None:
    refused = dead.make("invalid_request", 1000, "usd")
    unknown = dead.make("timeout", 2500, "usd")
    eur = dead.make("auth", 700, "eur")
    client = browser()
    await sign_in(client)
    everything = await client.get("/ops/dead")
    assert all(str(c) in everything.text for c in (refused, unknown, eur))
    assert "3 dead charges" in everything.text and "7.00 EUR" in everything.text
    assert "outcome unknown" in everything.text
    by_currency = await client.get("/ops/dead", params={"currency": "EUR"})
    assert str(eur) in by_currency.text and str(refused) not in by_currency.text
    by_class = await client.get("/ops/dead", params={"error_class": "timeout", "since": "1h"})
    assert str(unknown) in by_class.text and str(eur) not in by_class.text
    bad = await client.get("/ops/dead", params={"since": "yesterday", "min_amount": "1.5"})
    assert bad.status_code == 400 and "expected an ISO 8601 time" in bad.text
    assert "minor units" in bad.text


async def test_a_charge_page_shows_every_attempt(browser: Browser, dead: Dead) -> None:
    cid = dead.make("timeout")
    client = browser()
    await sign_in(client)
    page = await client.get(f"/ops/charges/{cid}")
    assert page.status_code == 200 and "no_answer" in page.text and "outcome unknown" in page.text
    assert f'href="/ops/confirm/reconcile?id={cid}"' in page.text
    assert (await client.get(f"/ops/charges/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/ops/charges/not-an-id")).status_code == 404
    found = await client.get("/ops/charges", params={"id": f" {cid} "})
    assert found.headers["location"] == f"/ops/charges/{cid}"


# -- Changes: confirm, then POST with the CSRF token -------------------------------------


async def test_replay_asks_first_then_replays_and_is_audited_with_the_name(
    browser: Browser, dead: Dead
) -> None:
    cid = dead.make("error")
    other = dead.make("error")
    client = browser()
    await sign_in(client, name="Alice Operator")
    confirm = await client.get(f"/ops/confirm/replay?id={cid}")
    assert confirm.status_code == 200 and 'data-confirm-count="1"' in confirm.text
    assert str(cid) in confirm.text and "19.99 USD" in confirm.text
    assert charge(cid).status == "dead" and audit_rows() == []  # asking changes nothing
    fields = hidden_fields(confirm)
    assert ("id", str(cid)) in fields
    without_token = [(k, v) for k, v in fields if k != "csrf"]
    assert (await submit(client, "/ops/actions/replay", without_token)).status_code == 403
    foreign = await submit(client, "/ops/actions/replay", fields, Origin="https://evil.example")
    assert foreign.status_code == 403 and charge(cid).status == "dead"
    done = await submit(client, "/ops/actions/replay", fields)
    assert done.status_code == 200 and 'data-done="1"' in done.text
    assert charge(cid).status == "pending" and charge(other).status == "dead"
    [row] = audit_rows()
    assert (row["actor"], row["action"], row["charge_ids"], row["count"]) == (
        "Alice Operator",
        "replay",
        [cid],
        1,
    )


async def test_a_result_page_reloaded_or_resubmitted_does_nothing_twice(
    browser: Browser, dead: Dead
) -> None:
    """Reproduced: reloading a result page replayed again (two audit rows, a 5th attempt)."""
    cid = dead.make("error")
    client = browser()
    await sign_in(client, name="dana")
    confirm = await client.get(f"/ops/confirm/replay?id={cid}")
    fields = hidden_fields(confirm)
    first = await client.post(
        "/ops/actions/replay",
        content=urlencode(fields),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert first.status_code == 303  # POST, then redirect, then GET
    result_url = first.headers["location"]
    assert result_url.startswith("/ops/results/")
    shown = await client.get(result_url)
    assert shown.status_code == 200 and 'data-done="1"' in shown.text
    with transaction() as conn:  # it dies again meanwhile: a replay would now find it
        conn.execute(text("UPDATE charges SET status = 'dead' WHERE id = :id"), {"id": cid})
    again = await submit(client, "/ops/actions/replay", fields)  # the browser's resend
    reloaded = await client.get(result_url)
    assert again.status_code == reloaded.status_code == 200
    assert 'data-done="1"' in again.text and 'data-done="1"' in reloaded.text
    assert [row["action"] for row in audit_rows()] == ["replay"]  # one replay, not two
    assert charge(cid).status == "dead"  # not replayed a second time


async def test_an_action_token_works_only_for_what_its_page_confirmed(
    browser: Browser, dead: Dead
) -> None:
    """Found by an attacker's review: any token-shaped string ran an action, and a replay
    page's token ran a purge."""
    cid = dead.make("error")
    client = browser()
    await sign_in(client, name="erin")
    fields = hidden_fields(await client.get(f"/ops/confirm/replay?id={cid}"))
    as_purge = await submit(client, "/ops/actions/purge", fields)  # the replay's token
    made_up = [(k, "A" * 32 if k == "action_token" else v) for k, v in fields]
    invented = await submit(client, "/ops/actions/replay", made_up)
    other = browser()
    await sign_in(other, name="frank")  # another session, with its own CSRF token
    other_fields = hidden_fields(await other.get(f"/ops/confirm/replay?id={cid}"))
    stolen = [(k, dict(fields)["action_token"] if k == "action_token" else v)
              for k, v in other_fields]  # fmt: skip
    elsewhere = await submit(other, "/ops/actions/replay", stolen)
    assert as_purge.status_code == invented.status_code == elsewhere.status_code == 409
    assert charge(cid).status == "dead" and charge(cid).purged_at is None
    assert audit_rows() == []
    done = await submit(client, "/ops/actions/replay", fields)  # its own: runs, once
    assert 'data-done="1"' in done.text and charge(cid).status == "pending"


async def test_a_filtered_purge_touches_only_what_was_confirmed(
    browser: Browser, dead: Dead
) -> None:
    first = dead.make("invalid_request", 1000)
    client = browser()
    await sign_in(client, name="bob")
    confirm = await client.get("/ops/confirm/purge", params={"reason": "refused"})
    assert 'data-confirm-count="1"' in confirm.text
    later = dead.make("invalid_request", 1200)  # dies after the confirmation
    done = await submit(client, "/ops/actions/purge", hidden_fields(confirm))
    assert 'data-done="1"' in done.text
    assert charge(first).purged_by == "bob" and charge(later).purged_at is None
    [row] = audit_rows()
    assert (row["actor"], row["action"], row["charge_ids"]) == ("bob", "purge", [first])
    assert row["params"]["reason"] == "refused" and "until" in row["params"]


async def test_reconcile_settles_a_charge_the_provider_made(browser: Browser, dead: Dead) -> None:
    cid = dead.make("timeout")  # the simulator charged, then answered too late
    client = browser()
    await sign_in(client, name="carol")
    confirm = await client.get(f"/ops/confirm/reconcile?id={cid}")
    assert 'data-confirm-count="1"' in confirm.text
    done = await submit(client, "/ops/actions/reconcile", hidden_fields(confirm))
    assert done.status_code == 200 and "1 charged (now succeeded)" in done.text
    assert charge(cid).status == "succeeded"
    rows = {row["actor"]: row for row in audit_rows()}
    assert (rows["carol"]["action"], rows["carol"]["params"]["succeeded"]) == ("reconcile", 1)
    # The change itself is the provider's answer's, audited under payq's own name.
    assert (rows["payq"]["action"], rows["payq"]["charge_ids"]) == ("settle", [cid])


async def test_nothing_to_do_offers_no_button(browser: Browser, dead: Dead) -> None:
    cid = dead.make("invalid_request")
    client = browser()
    await sign_in(client)
    confirm = await client.get(f"/ops/confirm/reconcile?id={cid}")  # its outcome is known
    assert 'data-confirm-count="0"' in confirm.text and "/ops/actions/" not in confirm.text
    assert (await client.get("/ops/confirm/delete?id=" + str(cid))).status_code == 404


# -- The chart's figures -------------------------------------------------------------------


def test_attempt_series_is_one_row_a_minute_gaps_filled(dead: Dead) -> None:
    dead.make("error")
    with transaction() as conn:  # an attempt three minutes ago
        conn.execute(
            text(
                "INSERT INTO charge_attempts (charge_id, number, started_at, finished_at, "
                "outcome, latency_ms) SELECT charge_id, 99, now() - interval '3 minutes', "
                "now() - interval '3 minutes', 'succeeded', 40 FROM charge_attempts LIMIT 1"
            )
        )
    series = attempt_series(15)
    assert len(series) == 15
    assert [m.minute for m in series] == sorted(m.minute for m in series)
    assert series[-1].minute - series[0].minute == dt.timedelta(minutes=14)
    assert sum(m.attempts for m in series) == 2 and series[-1].errors >= 0
    assert series[-4].succeeded == 1 and series[-4].p50_ms == 40
    assert sum(1 for m in series if m.attempts == 0) >= 13
    drawn = chart(series)
    assert len(drawn["bars"]) == 15 and drawn["p50"]
    with pytest.raises(ValueError):
        attempt_series(0)


async def test_the_overview_shows_each_endpoint_with_its_own_breaker_and_figures() -> None:
    with two_endpoints() as ends:
        ends.failover()  # a charged one and refused one (429); b charged the other
        held = passed(ends.route("b").gate.enter())  # one call in flight at b
        app = make_app(payment_endpoints=ends.json, **BREAKER)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        headers = {**HTML, **bearer(OPERATOR)}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://dash.test", headers=headers
        ) as client:
            page = await client.get("/ops")
            badge = await client.get("/ops/breaker", headers={"HX-Request": "true"})
        ends.route("b").gate.leave(held, None, keep=False)
        app.state.health.close()
    assert page.status_code == 200, page.text
    rows = dict(re.findall(r'<tr data-endpoint="(\w+)">(.*?)</tr>', page.text, re.S))
    assert set(rows) == {"a", "b"}
    assert 'data-breaker="open"' in rows["a"] and 'data-breaker="closed"' in rows["b"]
    assert 'data-slots="0"' in rows["a"] and 'data-slots="1"' in rows["b"]
    assert 'data-calls="2"' in rows["a"] and 'data-calls="1"' in rows["b"]
    assert 'data-errors="1"' in rows["a"] and "rate_limited 1" in rows["a"]
    assert 'data-errors="0"' in rows["b"]
    assert 'data-charged="1"' in rows["a"] and 'data-charged="1"' in rows["b"]
    assert 'data-failovers="0/1"' in rows["a"] and 'data-failovers="1/0"' in rows["b"]
    assert 'data-moved="0"' in rows["a"] and 'data-moved="1"' in rows["b"]
    assert "Circuit breaker · a" in page.text  # the card is the first-priority endpoint's
    assert 'class="badge breaker-open"' in badge.text  # and so is the header's badge
