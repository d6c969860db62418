"""The provider simulator over real HTTP: the contract of provider-api.md and every fault.

Each test starts its own `SimulatorThread` on a free port and talks to it with httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest

from provider_sim import Faults, SimulatorThread, Step, add_cli_arguments, faults_from_args

API_KEY = "sk_test_simulator"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY: dict[str, Any] = {
    "amount": 1999,
    "currency": "usd",
    "source": "tok_visa",
    "description": "order 8812",
    "metadata": {"charge_id": "c-1"},
}
CHARGE_ID = re.compile(r"ch_[0-9a-f]{24}")

T = TypeVar("T")
Start = Callable[..., SimulatorThread]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start a simulator with the given fault knobs; stopped after the test."""
    started: list[SimulatorThread] = []

    def _start(**knobs: Any) -> SimulatorThread:
        sim = SimulatorThread(API_KEY, Faults(**knobs)).start()
        started.append(sim)
        return sim

    yield _start
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(start: Start) -> SimulatorThread:
    return start()


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, headers=AUTH, timeout=5.0) as c:
        yield c


def connect(sim: SimulatorThread, timeout_s: float = 5.0) -> httpx.Client:
    return httpx.Client(base_url=sim.url, headers=AUTH, timeout=timeout_s)


def charge(client: httpx.Client, key: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return client.post(
        "/v1/charges", json=BODY if body is None else body, headers={"Idempotency-Key": key}
    )


def lookup(client: httpx.Client, key: str) -> httpx.Response:
    return client.get("/v1/charges", params={"idempotency_key": key})


def stats(client: httpx.Client) -> dict[str, Any]:
    data: dict[str, Any] = client.get("/_stats").json()
    return data


def attempts(client: httpx.Client, key: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = client.get("/_requests", params={"idempotency_key": key}).json()
    return data


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --- auth and validation ---------------------------------------------------------


def test_v1_needs_the_bearer_key_and_control_endpoints_do_not(sim: SimulatorThread) -> None:
    with httpx.Client(base_url=sim.url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = anonymous.post(
                "/v1/charges", json=BODY, headers={**headers, "Idempotency-Key": "k"}
            )
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["message"]
        assert anonymous.get("/v1/charges/ch_x").status_code == 401
        assert anonymous.get("/_stats").status_code == 200
        assert anonymous.get("/_faults").status_code == 200
        assert anonymous.get("/_requests", params={"idempotency_key": "k"}).json()[0] == {
            "at": pytest.approx(time.time(), abs=5),
            "status": 401,
            "fault": None,
            "retry_after_s": None,
            "replayed": False,
        }
        assert anonymous.get("/_stats").json()["charges"] == 0


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({}, "Idempotency-Key"),
        ({"Idempotency-Key": ""}, "Idempotency-Key"),
        ({"Idempotency-Key": "k" * 256}, "Idempotency-Key"),
    ],
)
def test_idempotency_key_is_required_and_checked(
    client: httpx.Client, headers: dict[str, str], param: str
) -> None:
    response = client.post("/v1/charges", json=BODY, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"amount": None}, "amount"),
        ({"amount": "1999"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": 19.99}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": 100_000_000}, "amount"),
        ({"currency": "us"}, "currency"),
        ({"currency": "usdd"}, "currency"),
        ({"currency": "u$d"}, "currency"),
        ({"currency": 840}, "currency"),
        ({"source": ""}, "source"),
        ({"source": None}, "source"),
        ({"source": 42}, "source"),
    ],
)
def test_body_validation_names_the_param(
    client: httpx.Client, change: dict[str, Any], param: str
) -> None:
    body = {**BODY, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = charge(client, "key-validation", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"]
    # A 400 stores nothing: the key can be used afresh.
    assert charge(client, "key-validation").status_code == 200


def test_a_body_that_is_not_a_json_object_is_refused(client: httpx.Client) -> None:
    for content in (b"not json", b"[1, 2]"):
        response = client.post("/v1/charges", content=content, headers={"Idempotency-Key": "k"})
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_limits_and_unknown_fields_are_accepted(client: httpx.Client) -> None:
    body = {"amount": 99_999_999, "currency": "EUR", "source": "tok_visa", "extra": [1]}
    response = charge(client, "k-limits", body)
    assert response.status_code == 200
    assert response.json()["currency"] == "eur"
    assert charge(client, "k-one", {**BODY, "amount": 1}).status_code == 200


# --- charges, replays, declines ---------------------------------------------------


def test_charge_then_replay_charges_once(client: httpx.Client) -> None:
    first = charge(client, "k-1")
    assert first.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    body = first.json()
    assert CHARGE_ID.fullmatch(body["id"])
    assert body == {
        "id": body["id"],
        "object": "charge",
        "status": "succeeded",
        "amount": 1999,
        "currency": "usd",
        "created": pytest.approx(int(time.time()), abs=5),
    }
    replay = charge(client, "k-1")
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == body
    counters = stats(client)
    assert (counters["charges"], counters["replays"], counters["duplicate_charges"]) == (1, 1, 0)
    assert counters["requests"] == 2


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("tok_chargeDeclined", "card_declined"),
        ("tok_chargeDeclinedInsufficientFunds", "insufficient_funds"),
        ("tok_chargeDeclinedExpiredCard", "expired_card"),
    ],
)
def test_decline_tokens_are_stored_outcomes(client: httpx.Client, source: str, code: str) -> None:
    body = {**BODY, "source": source}
    first = charge(client, "k-decline", body)
    assert first.status_code == 402
    error = first.json()["error"]
    assert (error["type"], error["code"]) == ("card_error", code)
    assert error["message"]
    assert CHARGE_ID.fullmatch(error["charge"])
    replay = charge(client, "k-decline", body)
    assert replay.status_code == 402
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    found = lookup(client, "k-decline").json()
    assert found["id"] == error["charge"]
    assert found["status"] == "failed"
    assert found["error"]["code"] == code
    assert client.get(f"/v1/charges/{error['charge']}").json() == found
    counters = stats(client)
    assert (counters["charges"], counters["declines"], counters["replays"]) == (0, 1, 1)


def test_same_key_with_other_parameters_is_key_reused(client: httpx.Client) -> None:
    assert charge(client, "k-2").status_code == 200
    for other in ({**BODY, "amount": 2000}, {**BODY, "metadata": {"charge_id": "c-2"}}):
        response = charge(client, "k-2", other)
        assert response.status_code == 409
        assert response.json()["error"] == {
            "type": "idempotency_error",
            "code": "idempotency_key_reused",
            "message": response.json()["error"]["message"],
        }
    # Key order does not matter: the body is compared after parsing.
    reordered = dict(reversed(list(BODY.items())))
    assert charge(client, "k-2", reordered).headers["Idempotent-Replayed"] == "true"
    assert stats(client)["charges"] == 1


def test_key_in_use_while_the_first_request_is_in_flight(start: Start) -> None:
    sim = start(latency_ms=600)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=sim.url, headers=AUTH, timeout=5.0) as c:
            headers = {"Idempotency-Key": "k-busy"}
            first = asyncio.create_task(c.post("/v1/charges", json=BODY, headers=headers))
            await asyncio.sleep(0.2)
            same = c.post("/v1/charges", json=BODY, headers=headers)
            other = c.post("/v1/charges", json={**BODY, "amount": 1}, headers=headers)
            found = c.get("/v1/charges", params={"idempotency_key": "k-busy"})
            rest = await asyncio.gather(same, other, found)
            return [await first, *rest]

    first, same, other, found = run(scenario())
    assert first.status_code == 200
    assert (same.status_code, same.json()["error"]["code"]) == (409, "idempotency_key_in_use")
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_key_reused")
    assert (found.status_code, found.json()["error"]["code"]) == (409, "idempotency_key_in_use")
    with connect(sim) as c:
        assert lookup(c, "k-busy").json()["id"] == first.json()["id"]
        assert stats(c)["charges"] == 1


def test_lookup_by_key_and_by_id(client: httpx.Client) -> None:
    missing = lookup(client, "k-3")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    created = charge(client, "k-3").json()
    assert lookup(client, "k-3").json() == created
    assert client.get(f"/v1/charges/{created['id']}").json() == created
    unknown = client.get("/v1/charges/ch_000000000000000000000000")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/charges").status_code == 400
    assert stats(client)["charges"] == 1


# --- script steps ----------------------------------------------------------------


SCRIPT_EXPECTATIONS = [
    ("ok", 200, None, True),
    ("decline", 402, "card_declined", True),
    ("error", 503, None, False),
    ("rate_limit", 429, None, False),
    ("invalid_request", 400, None, False),
    ("auth", 401, None, False),
    ("key_in_use", 409, "idempotency_key_in_use", False),
    ("key_reused", 409, "idempotency_key_reused", False),
    ("bad_body", 200, None, False),
    ("unexpected_status", 418, None, False),
    ("timeout", 200, None, True),
    ("trickle", 200, None, True),
    ("slow", 200, None, True),
]


def test_script_covers_every_step_but_reset() -> None:
    scripted = {step for step, *_ in SCRIPT_EXPECTATIONS} | {"reset"}
    assert scripted == {step.value for step in Step}


@pytest.mark.parametrize(("step", "status", "code", "stored"), SCRIPT_EXPECTATIONS)
def test_script_step(start: Start, step: str, status: int, code: str | None, stored: bool) -> None:
    sim = start(script=[step], timeout_delay_s=0.2, trickle_duration_s=0.2)
    with connect(sim) as c:
        response = charge(c, "k-script")
        assert response.status_code == status
        if code is not None:
            assert response.json()["error"]["code"] == code
        if step == "bad_body":
            assert response.json() == {"hello": "world"}
        if step == "unexpected_status":
            assert response.headers["content-type"].startswith("text/plain")
        if status == 200 and step != "bad_body":
            assert CHARGE_ID.fullmatch(response.json()["id"])
        assert c.get("/_faults").json()["script"] == []
        assert lookup(c, "k-script").status_code == (200 if stored else 404)
        log = attempts(c, "k-script")
        assert log[0]["status"] == status
        assert log[0]["fault"] == (None if step == "ok" else step)
        # The script is used up: the next request is processed normally.
        follow = charge(c, "k-script")
        assert follow.status_code == (status if stored else 200)
        assert follow.headers.get("Idempotent-Replayed") == ("true" if stored else None)
        assert stats(c)["duplicate_charges"] == 0


def test_script_is_consumed_in_order(start: Start) -> None:
    sim = start(script=["error", "rate_limit", "ok"], retry_after_s=1)
    with connect(sim) as c:
        statuses = [charge(c, "k-seq").status_code for _ in range(4)]
        assert statuses == [503, 429, 200, 200]
        log = attempts(c, "k-seq")
        assert [entry["status"] for entry in log] == [503, 429, 200, 200]
        assert [entry["fault"] for entry in log] == ["error", "rate_limit", None, None]
        assert [entry["retry_after_s"] for entry in log] == [None, 1, None, None]
        assert [entry["replayed"] for entry in log] == [False, False, False, True]
        assert [entry["at"] for entry in log] == sorted(entry["at"] for entry in log)
        assert attempts(c, "other-key") == []


# --- random faults ----------------------------------------------------------------


def test_rate_limit_carries_retry_after(start: Start) -> None:
    sim = start(rate_limit_rate=1.0, retry_after_s=3)
    with connect(sim) as c:
        response = charge(c, "k-429")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "3"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert attempts(c, "k-429")[0]["retry_after_s"] == 3
        assert lookup(c, "k-429").status_code == 404


def test_error_rate_answers_5xx_and_stores_nothing(start: Start) -> None:
    sim = start(error_rate=1.0, seed=7)
    with connect(sim) as c:
        statuses = {charge(c, "k-5xx").status_code for _ in range(20)}
        assert statuses <= {500, 502, 503, 504}
        assert len(statuses) > 1
        assert charge(c, "k-5xx").json() == {
            "error": {"type": "api_error", "message": "simulated provider error"}
        }
        c.post("/_faults", json={"error_rate": 0})
        assert charge(c, "k-5xx").status_code == 200


def test_decline_rate_declines_and_stores(start: Start) -> None:
    sim = start(decline_rate=1.0)
    with connect(sim) as c:
        response = charge(c, "k-dr")
        assert (response.status_code, response.json()["error"]["code"]) == (402, "card_declined")
        assert attempts(c, "k-dr")[0]["fault"] == "decline"
        assert charge(c, "k-dr").headers["Idempotent-Replayed"] == "true"


def test_timeout_charges_first_and_a_retry_during_the_wait_is_a_replay(start: Start) -> None:
    sim = start(timeout_rate=1.0, timeout_delay_s=1.5)
    with connect(sim, timeout_s=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        charge(impatient, "k-slow")
    with connect(sim) as c:
        assert stats(c)["charges"] == 1
        found = lookup(c, "k-slow")
        assert found.status_code == 200
        retry = charge(c, "k-slow")
        assert retry.status_code == 200
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json() == found.json()
        # The client hung up: the first attempt never got its answer.
        wait_for(lambda: stats(c)["in_flight"] == 0)
        log = attempts(c, "k-slow")
        assert [(e["status"], e["fault"]) for e in log] == [(None, "timeout"), (200, None)]
        assert stats(c)["charges"] == 1


def test_timeout_answers_late_when_the_client_waits(start: Start) -> None:
    sim = start(timeout_rate=1.0, timeout_delay_s=0.4)
    with connect(sim) as c:
        began = time.monotonic()
        response = charge(c, "k-late")
        assert time.monotonic() - began >= 0.4
        assert response.status_code == 200
        assert attempts(c, "k-late")[0]["status"] == 200


def test_trickle_sends_headers_at_once_and_the_body_slowly(start: Start) -> None:
    sim = start(trickle_rate=1.0, trickle_duration_s=1.0)
    with connect(sim) as c:
        began = time.monotonic()
        with c.stream(
            "POST", "/v1/charges", json=BODY, headers={"Idempotency-Key": "k-trickle"}
        ) as response:
            headers_after_s = time.monotonic() - began
            chunks = list(response.iter_bytes())
        body_after_s = time.monotonic() - began
        assert response.status_code == 200
        assert headers_after_s < 0.3
        assert body_after_s >= 0.8
        assert len(chunks) > 10
        body = httpx.Response(200, content=b"".join(chunks)).json()
        assert body["object"] == "charge"
        assert CHARGE_ID.fullmatch(body["id"])
        assert stats(c)["charges"] == 1
        assert lookup(c, "k-trickle").json()["id"] == body["id"]


def test_reset_gives_a_client_side_error_and_stores_nothing(start: Start) -> None:
    sim = start(reset_rate=1.0)
    with connect(sim) as c:
        with pytest.raises(httpx.TransportError):
            charge(c, "k-reset")
        log = attempts(c, "k-reset")
        assert [(e["status"], e["fault"]) for e in log] == [(None, "reset")]
        assert lookup(c, "k-reset").status_code == 404
        counters = stats(c)
        assert (counters["charges"], counters["in_flight"]) == (0, 0)
        assert counters["by_status"]["no_answer"] == 1


def test_outage_fails_everything_then_recovers(sim: SimulatorThread, client: httpx.Client) -> None:
    assert client.post("/_faults", json={"outage_s": 0.6}).json()["outage_remaining_s"] > 0.3
    assert charge(client, "k-out").status_code == 503
    assert lookup(client, "k-out").status_code == 503
    assert client.get("/v1/charges/ch_x").status_code == 503
    assert attempts(client, "k-out")[0]["fault"] == "outage"
    wait_for(lambda: client.get("/_faults").json()["outage_remaining_s"] == 0)
    assert charge(client, "k-out").status_code == 200


def test_outage_in_reset_mode_drops_connections(start: Start) -> None:
    sim = start(outage_s=5.0, outage_mode="reset")
    with connect(sim) as c:
        with pytest.raises(httpx.TransportError):
            charge(c, "k-out-reset")
        c.post("/_faults", json={"outage_s": 0})
        assert charge(c, "k-out-reset").status_code == 200


def test_latency_applies_to_every_v1_answer(start: Start) -> None:
    sim = start(latency_ms=200, latency_jitter_ms=100)
    with connect(sim) as c:
        for method, path in (("POST", "/v1/charges"), ("GET", "/v1/charges?idempotency_key=k")):
            began = time.monotonic()
            c.request(method, path, json=BODY, headers={"Idempotency-Key": "k"})
            assert 0.2 <= time.monotonic() - began < 1.0
        began = time.monotonic()
        stats(c)
        assert time.monotonic() - began < 0.2


# --- concurrency -----------------------------------------------------------------


def test_250_requests_in_flight_at_once(start: Start) -> None:
    sim = start(latency_ms=1000)

    async def scenario() -> tuple[list[int], float]:
        # Several clients: one httpx pool is slow to open hundreds of connections at once.
        clients = [
            httpx.AsyncClient(
                base_url=sim.url,
                headers=AUTH,
                timeout=10.0,
                limits=httpx.Limits(max_connections=25),
            )
            for _ in range(10)
        ]
        try:
            calls = [
                clients[n % 10].post(
                    "/v1/charges", json=BODY, headers={"Idempotency-Key": f"k-{n}"}
                )
                for n in range(250)
            ]
            began = time.monotonic()
            responses = await asyncio.gather(*calls)
            return [r.status_code for r in responses], time.monotonic() - began
        finally:
            for c in clients:
                await c.aclose()

    statuses, elapsed_s = run(scenario())
    assert statuses == [200] * 250
    assert elapsed_s < 4.0
    with connect(sim) as c:
        counters = stats(c)
    assert counters["max_in_flight"] >= 200
    assert (counters["charges"], counters["in_flight"], counters["duplicate_charges"]) == (
        250,
        0,
        0,
    )


def test_concurrent_same_key_requests_charge_once(start: Start) -> None:
    sim = start(latency_ms=300)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=sim.url, headers=AUTH, timeout=5.0) as c:
            calls = [
                c.post("/v1/charges", json=BODY, headers={"Idempotency-Key": "k-same"})
                for _ in range(50)
            ]
            return list(await asyncio.gather(*calls))

    responses = run(scenario())
    created = [
        r for r in responses if r.status_code == 200 and "Idempotent-Replayed" not in r.headers
    ]
    assert len(created) == 1
    assert all(r.status_code in (200, 409) for r in responses)
    with connect(sim) as c:
        counters = stats(c)
        assert (counters["charges"], counters["duplicate_charges"]) == (1, 0)
        # The counting is honest: once the stored outcome is lost, a resend charges again.
        assert c.post("/_keys/forget").json() == {"forgotten": 1}
        assert charge(c, "k-same").status_code == 200
        assert stats(c)["duplicate_charges"] == 1


# --- control endpoints and knobs ---------------------------------------------------


def test_faults_endpoint_merges_validates_and_resets(client: httpx.Client) -> None:
    defaults = client.get("/_faults").json()
    assert defaults["error_rate"] == 0 and defaults["retry_after_s"] == 2
    assert defaults["outage_remaining_s"] == 0 and defaults["script"] == []
    merged = client.post("/_faults", json={"error_rate": 0.5, "latency_ms": 5}).json()
    assert (merged["error_rate"], merged["latency_ms"]) == (0.5, 5)
    merged = client.post("/_faults", json={"decline_rate": 0.25}).json()
    assert (merged["error_rate"], merged["decline_rate"]) == (0.5, 0.25)
    for bad, knob in (
        ({"error_rate": 2}, "error_rate"),
        ({"retry_after_s": 1.5}, "retry_after_s"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"script": ["explode"]}, "script"),
        ({"outage_mode": "maybe"}, "outage_mode"),
        ({"no_such_knob": 1}, "no_such_knob"),
    ):
        response = client.post("/_faults", json=bad)
        assert response.status_code == 400
        assert knob in response.json()["error"]["message"]
    assert client.get("/_faults").json()["error_rate"] == 0.5
    assert client.post("/_faults", content=b"{oops").status_code == 400
    assert client.post("/_faults", json={"reset": True}).json() == defaults


def test_stats_reset(client: httpx.Client) -> None:
    charge(client, "k-r")
    charge(client, "k-r")
    reset = client.post("/_stats/reset").json()
    assert reset["requests"] == reset["charges"] == reset["replays"] == 0
    assert attempts(client, "k-r") == []
    assert charge(client, "k-r").headers.get("Idempotent-Replayed") is None


def test_faults_value_object_refuses_nonsense() -> None:
    assert Faults() == Faults.from_dict({})
    assert Faults(script=("ok", "reset")).script == ("ok", "reset")
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=1.5)
    with pytest.raises(ValueError, match="decline_rate"):
        Faults.from_dict({"decline_rate": True})
    with pytest.raises(ValueError, match="unknown fault knob 'bogus'"):
        Faults.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="seed"):
        Faults.from_dict({"seed": "x"})
    assert Faults.from_dict({"outage_mode": 503}).outage_mode == "503"


def test_cli_arguments_build_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYMENT_PROVIDER_API_KEY", "sk_from_env")
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    ns = parser.parse_args(
        ["--port", "9000", "--latency-ms", "50", "--error-rate", "0.1", "--script", "ok,reset"]
    )
    assert (ns.host, ns.port, ns.api_key) == ("127.0.0.1", [9000], "sk_from_env")
    assert parser.parse_args(["--port", "9000,9001"]).port == [9000, 9001]
    for bad in ("9000,x", "9000,9000", "70000"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--port", bad])
    faults = faults_from_args(ns)
    assert (faults.latency_ms, faults.error_rate, faults.script) == (50, 0.1, ("ok", "reset"))
    assert faults.retry_after_s == 2
    with pytest.raises(ValueError, match="timeout_rate"):
        faults_from_args(parser.parse_args(["--timeout-rate", "3"]))


def test_simulator_thread_helpers() -> None:
    with SimulatorThread(API_KEY) as sim:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", sim.url)
        assert sim.set_faults(latency_ms=1)["latency_ms"] == 1
        assert sim.stats()["requests"] == 0
    sim.stop()  # stopping twice is harmless
    with pytest.raises(ValueError, match="api_key"):
        SimulatorThread("")


def test_a_client_hanging_up_mid_trickle_gets_no_answer_but_is_charged(start: Start) -> None:
    sim = start(script=["trickle"], trickle_duration_s=3.0)
    with connect(sim, timeout_s=5.0) as c:
        with c.stream(
            "POST", "/v1/charges", json=BODY, headers={"Idempotency-Key": "k-gone"}
        ) as response:
            assert response.status_code == 200
            next(response.iter_raw())
        # Leaving the block closes the connection half way through the body.
        wait_for(lambda: stats(c)["in_flight"] == 0)
        assert attempts(c, "k-gone")[0]["status"] is None
        assert stats(c)["charges"] == 1
        assert charge(c, "k-gone").headers["Idempotent-Replayed"] == "true"


def test_stop_is_quick_while_a_client_still_waits(start: Start) -> None:
    sim = start(timeout_rate=1.0, timeout_delay_s=30.0)
    with ThreadPoolExecutor(1) as pool, connect(sim, timeout_s=30.0) as c:
        waiting = pool.submit(charge, c, "k-stop")
        wait_for(lambda: sim.state.stats()["charges"] == 1)
        began = time.monotonic()
        sim.stop()
        assert time.monotonic() - began < 3.0
        with pytest.raises(httpx.TransportError):
            waiting.result(timeout=5.0)


def test_start_reports_a_port_in_use(sim: SimulatorThread) -> None:
    with pytest.raises(OSError):
        SimulatorThread(API_KEY, port=sim.port).start()


def test_a_token_the_provider_never_issued_is_refused() -> None:
    with SimulatorThread(api_key=API_KEY) as thread:
        response = httpx.post(
            f"{thread.url}/v1/charges",
            headers={"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "k-unknown-token"},
            json={"amount": 100, "currency": "usd", "source": "tok_invalidRevoked"},
        )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "no such payment token",
        "param": "source",
    }


def test_a_slow_request_holds_its_key_in_use_and_lookups_can_fail(start: Start) -> None:
    sim = start(script=["slow"], timeout_delay_s=1.0, lookup_error_rate=1.0)
    with connect(sim) as c, connect(sim) as other:
        import threading

        first: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: first.append(charge(c, "k-slow")))
        thread.start()
        time.sleep(0.3)
        second = charge(other, "k-slow")  # while the first is still being processed
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "idempotency_key_in_use"
        assert lookup(other, "k-slow").status_code == 503  # lookup_error_rate
        thread.join()
        assert first[0].status_code == 200
        other.post("/_faults", json={"lookup_error_rate": 0})
        assert lookup(other, "k-slow").json()["id"] == first[0].json()["id"]
        books = other.get("/_charges").json()
        assert books == [{"idempotency_key": "k-slow", "id": first[0].json()["id"],
                          "status": "succeeded"}]  # fmt: skip


def test_one_command_runs_several_independent_providers() -> None:
    """``payq provider-sim --port A,B``: two providers, each its own books and knobs."""
    from devservices import free_port

    ports = [free_port(), free_port()]
    command = [
        sys.executable,
        "-m",
        "payq_cli",
        "provider-sim",
        "--port",
        ",".join(map(str, ports)),
    ]
    env = {**os.environ, "PAYMENT_PROVIDER_API_KEY": API_KEY}
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE) as process:
        try:
            first, second = (f"http://127.0.0.1:{p}" for p in ports)
            wait_for(lambda: _answers(first) and _answers(second), timeout_s=20)
            headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "k-one"}
            assert httpx.post(f"{first}/v1/charges", json=BODY, headers=headers).status_code == 200
            httpx.post(f"{second}/_faults", json={"error_rate": 1.0}).raise_for_status()
            assert httpx.post(f"{second}/v1/charges", json=BODY, headers=headers).status_code >= 500
            assert httpx.post(f"{first}/v1/charges", json=BODY, headers=headers).status_code == 200
            one, two = (httpx.get(f"{url}/_stats").json() for url in (first, second))
            assert (one["charges"], one["replays"], two["charges"]) == (1, 1, 0)
            assert one["duplicate_charges"] == two["duplicate_charges"] == 0
            assert len(httpx.get(f"{first}/_charges").json()) == 1
            assert httpx.get(f"{second}/_charges").json() == []
        finally:
            process.terminate()
            process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/_stats", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
