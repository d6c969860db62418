"""Attack scratch tests: each PASSES when the hole it names exists."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import httpx
import pytest

from payq.cardnumbers import looks_like_card_number, mask_card_numbers
from payq.sentry import FILTERED, scrub
from payq.settings import load_settings
from payq.validation import validate_charge
from tests.conftest import TEST_ENV
from tests.web.conftest import anyio_backend, make_app, serve  # noqa: F401 (fixtures)
from tests.web.test_dashboard import (  # noqa: F401 (fixtures)
    Dead,
    app,
    audit_rows,
    browser,
    dead,
    hidden_fields,
    sign_in,
    sim,
)
from tests.helpers import charge

PAN = "4111 1111 1111 1111"


def ok(**fields: object) -> None:
    base: dict[str, object] = {
        "amount": 100, "currency": "usd", "source": "tok_visa", "idempotency_key": "k-1",
    }
    validate_charge(**{**base, **fields}, max_amount=99_999_999)  # raises if refused


# -- 1. the detector ------------------------------------------------------------------------

GLUED_NEIGHBOUR = [
    f"Booking ABC123 {PAN}",  # a reference glued to letters, then the card
    f"Order A1 {PAN}",
    f"PO-7 {PAN.replace(' ', '')}",
    f"{PAN} 2A",  # something glued after it
    f"{PAN} 12/25x",
    f"ref:A9 {PAN.replace(' ', '')}",
]


@pytest.mark.parametrize("text", GLUED_NEIGHBOUR)
def test_a_glued_neighbour_hides_a_standalone_card(text: str) -> None:
    ok(description=text)
    ok(metadata={"note": text[:500]})
    assert mask_card_numbers(text) == text  # logs keep it
    assert scrub({"message": text}) == {"message": text}  # Sentry keeps it
    assert scrub({"message": text})["message"] != FILTERED


SEPARATORS = {
    "soft hyphen (invisible)": "\u00ad", "LRM (invisible)": "\u200e", "RLM": "\u200f",
    "CGJ": "\u034f", "invisible separator": "\u2063", "colon": ":", "plus": "+", "pipe": "|",
    "star": "*", "tilde": "~", "equals": "=", "hash": "#", "katakana dot": "\u30fb",
    "hyphenation point": "\u2027", "bullet operator": "\u2219", "ideographic stop": "\u3002",
}


@pytest.mark.parametrize("sep", list(SEPARATORS.values()), ids=list(SEPARATORS))
def test_other_separators_are_not_seen(sep: str) -> None:
    text = PAN.replace(" ", sep)
    assert not looks_like_card_number(text)
    ok(description=f"card {text}")


def test_combining_marks_and_keycaps_hide_digits() -> None:
    digits = PAN.replace(" ", "")
    for text in ("".join(d + "\u0301" for d in digits), "".join(d + "\ufe0f\u20e3" for d in digits)):
        ok(description=text)


def test_a_card_in_the_source_field_gets_in() -> None:
    ok(source="4111:1111:1111:1111")  # ':' is allowed in a token and is no separator
    ok(source="tok_4111111111111111")  # '_' glues it to "tok"
    ok(source="card4111111111111111")


def test_false_alarms_on_ordinary_lists() -> None:
    for text in ("Seats 41 42 43 44 45 46 47 48", "Rooms 4201 4202 4203 4204"):
        with pytest.raises(Exception, match="card"):
            ok(description=text)


def test_the_detector_is_slow_on_long_text() -> None:
    for text in ("1 " * 50_000, "1-" * 50_000, "1\u00a0" * 50_000):  # 100 K chars
        t0 = time.perf_counter()
        mask_card_numbers(text)
        assert time.perf_counter() - t0 > 0.4  # ~1 s on this machine


# -- HTTP intake ------------------------------------------------------------------------------

pytestmark = [pytest.mark.usefixtures("clean")]


def _post(client: httpx.AsyncClient, body: object, key: str) -> object:
    return client.post(
        "/v1/charges",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )


@pytest.mark.anyio
async def test_intake_stores_and_echoes_a_card_and_a_422_echoes_a_field_name(serve) -> None:  # noqa: F811
    from tests.web.conftest import INTAKE

    api = serve(INTAKE)
    made = await _post(api, {"amount": 1, "currency": "usd", "source": "tok_visa",
                             "description": f"Booking ABC123 {PAN}"}, "k-glued")
    assert made.status_code == 201 and PAN in made.text
    refused = await _post(api, {"amount": 1, "currency": "usd", "source": "tok_visa",
                                f"A1 {PAN}": "x"}, "k-field")
    assert refused.status_code == 422 and PAN in refused.text  # the field name is echoed
    made = await _post(api, {"amount": 1, "currency": "usd", "source": "4111:1111:1111:1111"},
                       "k-source")
    assert made.status_code == 201


@pytest.mark.anyio
async def test_intake_cpu_per_request_on_a_long_field_name(serve) -> None:  # noqa: F811
    from tests.web.conftest import INTAKE

    api = serve(INTAKE)
    normal_t0 = time.perf_counter()
    await _post(api, {"amount": 1, "currency": "usd", "source": "tok_visa", "x": 1}, "k-n")
    normal = time.perf_counter() - normal_t0
    body = {"amount": 1, "currency": "usd", "source": "tok_visa", "1 " * 15_000: 1}
    t0 = time.perf_counter()
    refused = await _post(api, body, "k-slow")
    slow = time.perf_counter() - t0
    print(f"normal {normal:.3f}s, 30 KB field name {slow:.3f}s")
    assert refused.status_code == 422 and slow > 5 * normal and slow > 0.1


# -- 3. apps --------------------------------------------------------------------------------

SHOP, BILLING = "shop-" + "s" * 24, "billing-" + "b" * 24


@pytest.mark.anyio
async def test_one_app_squats_and_probes_another_apps_keys(serve) -> None:  # noqa: F811
    both = make_app(payq_api_tokens=f"shop={SHOP},billing={BILLING}")
    shop, billing = serve(SHOP, app=both), serve(BILLING, app=both)
    body = {"amount": 1999, "currency": "usd", "source": "tok_visa"}
    # Oracle: billing learns that shop has a charge with key order-77 (409 vs 201).
    assert (await _post(shop, body, "order-77")).status_code == 201
    probe = await _post(billing, {**body, "amount": 1}, "order-77")
    assert probe.status_code == 409 and "another app" in probe.text
    fresh = await _post(billing, {**body, "amount": 1}, "order-78")
    assert fresh.status_code == 201
    # Squatting: billing takes shop's next key first; shop's real charge can never be made.
    assert (await _post(billing, {**body, "amount": 1}, "order-79")).status_code == 201
    blocked = await _post(shop, body, "order-79")
    assert blocked.status_code == 409


# -- dashboard ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_action_tokens_are_not_issued_by_the_server(browser, dead: Dead) -> None:  # noqa: F811
    cid = dead.make("invalid_request")
    client = browser()
    await sign_in(client, name="eve")
    confirm = await client.get(f"/ops/confirm/replay?id={cid}")
    fields = [(k, v) for k, v in hidden_fields(confirm) if k != "action_token"]
    replay_token = dict(hidden_fields(confirm))["action_token"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    # The replay page's token, spent on a purge: accepted.
    purged = await client.post(
        "/ops/actions/purge", content=urlencode([*fields, ("action_token", replay_token)]),
        headers=form,
    )
    assert purged.status_code == 303
    assert charge(cid).purged_at is not None
    # A token the client made up: accepted as well (nothing ties a token to a page).
    cid2 = dead.make("invalid_request")
    fields2 = [(k, v if k != "id" else str(cid2)) for k, v in fields]
    for made_up in ("AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB"):
        acted = await client.post(
            "/ops/actions/replay", content=urlencode([*fields2, ("action_token", made_up)]),
            headers=form,
        )
        assert acted.status_code == 303
    assert [r["action"] for r in audit_rows()] == ["purge", "replay"]


# -- CLI output ----------------------------------------------------------------------------------


def _payq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq.cli", *args],
        env={**os.environ, **TEST_ENV, **env}, capture_output=True, text=True, timeout=60,
    )


def test_payq_health_prints_a_providers_escape_sequence() -> None:
    osc52 = b"\x1b]52;c;ZWNobyBwd25lZA==\x07"

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html>down " + osc52 + b"</html>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = _payq("health", PAYMENT_PROVIDER_URL=url)
    finally:
        server.shutdown()
    assert "\x1b]52" in out.stdout, out.stdout


def test_payq_enqueue_echoes_a_card_in_a_bad_metadata_argument() -> None:
    out = _payq("enqueue", "--amount", "100", "--currency", "usd", "--source", "tok_visa",
                "--key", "k-cli", "--metadata", "4242424242424242")
    assert out.returncode == 2 and "4242424242424242" in out.stderr, out.stderr
