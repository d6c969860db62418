"""The dashboard in a real browser against a live system: Debian's Chromium, headless,
driven by Playwright, against a real ``payq serve`` and ``payq worker`` (processes of
their own), the provider simulator, PostgreSQL and Redis.

An operator signs in, sees the counts the database holds, opens a dead charge, replays
it after confirming, and watches it become succeeded; the audit table has the row
under the operator's name. On the way a screenshot of the overview is taken; with
``PAYQ_DASHBOARD_SCREENSHOT=docs/dashboard.png`` it is also written there (the README's).

Playwright's own browser download is not used (not reachable here): it drives the
system Chromium. Where that is missing the test installs it with apt-get when it runs
as root (as CI does), and otherwise fails saying what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from devservices import free_port
from payq.db import transaction
from payq.models import operator_actions
from payq.ops.waiting import wait_for_http
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim, charge, statuses, wait_until
from tests.processes import PayqProcess
from tests.webapp import INTAKE, OPERATOR

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = (
    "the browser test needs Debian's Chromium at /usr/bin/chromium: install it with "
    "`apt-get install -y chromium` (as root), and Playwright for Python with "
    "`.venv/bin/pip install -e '.[dev]'` (no `playwright install`: the system browser is used)"
)
OPERATOR_NAME = "Dana Operator"
STATUSES = ("pending", "processing", "retrying", "succeeded", "failed", "dead")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium's path, installed first where we may (root with apt-get)."""
    if not CHROMIUM.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}\n{INSTALL_HINT}")
    if not CHROMIUM.exists():
        pytest.fail(INSTALL_HINT)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(INSTALL_HINT)
    return str(CHROMIUM)


class LiveSystem:
    def __init__(self, base: str, sim: Sim) -> None:
        self.base = base
        self.sim = sim

    def post_charge(self, key: str, source: str = "tok_visa", amount: int = 4999) -> uuid.UUID:
        """A charge as a web app sends one: over HTTP, with an intake token."""
        answer = httpx.post(
            f"{self.base}/v1/charges",
            json={"amount": amount, "currency": "usd", "source": source, "description": key},
            headers={"Authorization": f"Bearer {INTAKE}", "Idempotency-Key": key},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        return uuid.UUID(answer.json()["id"])


@pytest.fixture
def live() -> Iterator[LiveSystem]:
    """The provider simulator, one worker process (2 threads) and ``payq serve``."""
    with SimulatorThread(api_key=API_KEY) as thread:
        port = free_port()
        env = {
            "PAYMENT_PROVIDER_URL": thread.url,
            "PAYQ_API_TOKENS": INTAKE,
            "PAYQ_OPERATOR_TOKENS": OPERATOR,
        }
        with (
            PayqProcess("serve", "--port", str(port), env=env),
            PayqProcess("worker", "--processes", "1", "--threads", "2", env=env),
        ):
            base = f"http://127.0.0.1:{port}"

            wait_for_http(f"{base}/healthz", timeout_s=30)
            yield LiveSystem(base, Sim(thread.url))


def final(ids: list[uuid.UUID]) -> bool:
    return all(charge(cid).status in ("succeeded", "failed", "dead") for cid in ids)


def make_a_day(live: LiveSystem) -> uuid.UUID:
    """One charge the provider refuses once (dead), then a workload with faults:
    charges of every final status, retries and errors for the figures."""
    live.sim.faults(script=["invalid_request"])
    target = live.post_charge("order-refused-once", amount=12_500)
    wait_until(lambda: charge(target).status == "dead", 30, "the refused charge to go dead")
    live.sim.faults(
        latency_ms=40, latency_jitter_ms=80, error_rate=0.15, rate_limit_rate=0.04,
        retry_after_s=1, reset_rate=0.03, seed=11,
    )  # fmt: skip
    sources = ["tok_visa"] * 8 + ["tok_chargeDeclined", "tok_invalidRevoked"]
    made = enqueue_charges(
        [
            {
                "amount": 500 + (i * 733) % 15_000,
                "currency": "usd" if i % 5 else "eur",
                "source": sources[i % len(sources)],
                "idempotency_key": f"browser-{i}",
                "description": f"order {i}",
            }
            for i in range(60)
        ]
    )
    ids = [c.id for c in made]
    wait_until(lambda: final(ids), 90, "the workload to end final")
    live.sim.faults(error_rate=0, rate_limit_rate=0, reset_rate=0)
    return target


def _problem(message: Any) -> bool:
    expected = message.text.startswith("Failed to load resource") and message.location.get(
        "url", ""
    ).endswith("/ops/login")
    return bool(message.type == "error" and not expected)


def audit_rows() -> list[dict[str, Any]]:
    with transaction() as conn:
        return [dict(r) for r in conn.execute(select(operator_actions)).mappings()]


def test_an_operator_replays_a_dead_charge_in_the_browser(
    chromium: str, live: LiveSystem, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    target = make_a_day(live)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            page = context.new_page()
            page.set_default_timeout(15_000)
            # A CSP refusal or a failed script shows up here: the pages must have none
            # (but the sign-in form's own 401 after a wrong token, which Chromium logs).
            page.on("console", lambda m: _problem(m) and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))

            # Not signed in: the dashboard sends the browser to the form.
            page.goto(f"{live.base}/ops")
            expect(page).to_have_url(f"{live.base}/ops/login?next=/ops")
            page.fill("#name", OPERATOR_NAME)
            page.fill("#token", OPERATOR + "-wrong")
            page.click("button[type=submit]")
            expect(page.locator(".notice.bad")).to_have_text(
                "Sign-in failed. Check the token and try again."
            )
            page.fill("#token", OPERATOR)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{live.base}/ops")
            [cookie] = context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert OPERATOR not in cookie["value"]
            expect(page.locator(".who")).to_contain_text(OPERATOR_NAME)

            # The counts are the database's (nothing moves now: every charge is final).
            in_db = statuses()
            for status in STATUSES:
                shown = page.locator(f'[data-status="{status}"] [data-count]')
                expect(shown).to_have_attribute("data-count", str(in_db.get(status, 0)))
            assert in_db.get("succeeded", 0) > 0 and in_db.get("failed", 0) > 0
            # The live part refreshes by itself; the worker's report appears in it.
            expect(page.locator("[data-worker]")).to_have_count(1, timeout=20_000)
            expect(page.locator("#breaker")).to_have_text("Breaker closed")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if wanted := os.environ.get("PAYQ_DASHBOARD_SCREENSHOT"):
                shutil.copyfile(tmp_path / "dashboard.png", wanted)

            # Open the dead charge from the dead-letter list.
            page.click("nav >> text=Dead letters")
            page.click(f'a[href="/ops/charges/{target}"]')
            expect(page.locator("[data-charge-status]")).to_have_text("dead")
            expect(page.locator("#charge table")).to_contain_text("invalid_request")

            # Replay it: a confirmation first, then the change.
            page.click("text=Replay…")
            expect(page.locator("[data-confirm-count]")).to_have_attribute(
                "data-confirm-count", "1"
            )
            expect(page.locator(".ids")).to_contain_text(str(target))
            assert charge(target).status == "dead"
            page.click("#confirm")
            expect(page.locator("[data-result]")).to_have_attribute("data-done", "1")
            page.click("text=Follow the charge")
            # The charge page refreshes itself until the worker has charged it.
            expect(page.locator("[data-charge-status]")).to_have_text("succeeded", timeout=30_000)
            expect(page.locator("#charge table tbody tr")).to_have_count(2)

            page.click(".out button")
            expect(page).to_have_url(f"{live.base}/ops/login")
            page.goto(f"{live.base}/ops")
            expect(page).to_have_url(f"{live.base}/ops/login?next=/ops")
        finally:
            browser.close()
    assert problems == [], problems
    assert charge(target).status == "succeeded"
    [row] = audit_rows()
    assert (row["actor"], row["action"], row["charge_ids"], row["count"]) == (
        OPERATOR_NAME,
        "replay",
        [target],
        1,
    )
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
