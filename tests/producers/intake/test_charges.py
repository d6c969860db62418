"""POST /v1/charges and GET /v1/charges/{id} against real PostgreSQL and Redis."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from payq.db import transaction
from payq.models import charges
from tests.producers.test_enqueue import queued_ids
from tests.webapp import INTAKE, make_app

pytestmark = pytest.mark.anyio

CARD = "4242 4242 4242 4242"
CHARGE = {"amount": 1999, "currency": "USD", "source": "tok_visa"}


def rows() -> int:
    with transaction() as conn:
        return int(conn.execute(select(func.count()).select_from(charges)).scalar_one())


async def post(
    api: httpx.AsyncClient, body: Any, key: str | None = "order-1", **headers: str
) -> httpx.Response:
    sent = {"Content-Type": "application/json", **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await api.post("/v1/charges", content=content, headers=sent)


def fields(response: httpx.Response) -> dict[str, tuple[str, str]]:
    """field -> (location, code) of a 422."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    return {e["field"]: (e["location"], e["code"]) for e in error["errors"]}


async def test_new_charge_is_201_and_queued(api: httpx.AsyncClient) -> None:
    body = {**CHARGE, "description": "order 1", "metadata": {"order": "1"}}
    response = await post(api, body)
    assert response.status_code == 201, response.text
    charge = response.json()
    assert charge["status"] == "pending" and charge["currency"] == "usd"
    assert charge["amount"] == 1999 and charge["metadata"] == {"order": "1"}
    assert charge["idempotency_key"] == "order-1"
    assert "source" not in charge  # the payment token is not echoed
    assert queued_ids() == [charge["id"]] and rows() == 1
    looked_up = await api.get(f"/v1/charges/{charge['id']}")
    assert looked_up.status_code == 200 and looked_up.json() == charge


async def test_repeat_is_200_with_the_same_charge(api: httpx.AsyncClient) -> None:
    first = await post(api, CHARGE)
    again = await post(api, {**CHARGE, "currency": "usd"})  # normalised: the same parameters
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert rows() == 1 and queued_ids() == [first.json()["id"]]


async def test_same_key_other_parameters_is_409(api: httpx.AsyncClient) -> None:
    first = await post(api, CHARGE)
    response = await post(api, {**CHARGE, "amount": 2999, "description": "x"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "idempotency_conflict"
    assert error["charge_id"] == first.json()["id"]
    assert error["differing"] == ["amount", "description"]
    assert rows() == 1


async def test_every_bad_field_is_listed(api: httpx.AsyncClient) -> None:
    body = {
        "amount": 0,
        "currency": "xyz",
        "source": "no spaces allowed",
        "description": 5,
        "metadata": {"charge_id": "1"},
        "colour": "red",
    }
    assert fields(await post(api, body, key="\t")) == {
        "amount": ("body", "invalid"),
        "currency": ("body", "invalid"),
        "source": ("body", "invalid"),
        "description": ("body", "invalid"),
        "metadata": ("body", "invalid"),
        "colour": ("body", "unknown_field"),
        "Idempotency-Key": ("header", "invalid"),
    }
    assert rows() == 0


async def test_missing_fields_and_key(api: httpx.AsyncClient) -> None:
    assert fields(await post(api, {"amount": 5}, key=None)) == {
        "currency": ("body", "missing"),
        "source": ("body", "missing"),
        "Idempotency-Key": ("header", "missing"),
    }


async def test_key_in_the_body_is_pointed_to_the_header(api: httpx.AsyncClient) -> None:
    got = fields(await post(api, {**CHARGE, "idempotency_key": "k"}))
    assert got == {"idempotency_key": ("body", "unknown_field")}
    assert "Idempotency-Key header" in (await post(api, {**CHARGE, "idempotency_key": "k"})).text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**CHARGE, "source": CARD}, "source"),
        ({**CHARGE, "source": CARD.replace(" ", "")}, "source"),
        ({**CHARGE, "description": f"card {CARD} exp 12/29"}, "description"),
        ({**CHARGE, "metadata": {"note": CARD.replace(" ", "-")}}, "metadata.note"),
        ({**CHARGE, "metadata": {CARD.replace(" ", ""): "x"}}, "metadata"),
    ],
)
async def test_card_numbers_are_named_and_never_echoed(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await post(api, body)
    assert fields(response)[field] == ("body", "card_number")
    assert "card number" in response.text
    assert "4242" not in response.text
    assert rows() == 0


async def test_card_number_in_the_key_or_elsewhere_is_not_echoed(api: httpx.AsyncClient) -> None:
    response = await post(api, CHARGE, key=CARD)
    assert fields(response) == {"Idempotency-Key": ("header", "card_number")}
    for body in (
        {**CHARGE, "currency": CARD},
        {**CHARGE, "amount": 4242424242424242},
        {**CHARGE, CARD: 1},
    ):
        response = await post(api, body)
        assert response.status_code == 422 and "4242" not in response.text, response.text
    assert "4242" not in (await api.get(f"/v1/charges/{CARD.replace(' ', '')}")).text
    assert rows() == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1, 2]",
        b'"text"',
        b'{"amount": NaN, "currency": "usd", "source": "tok_visa"}',
        b'{"amount": 1, "amount": 2, "currency": "usd", "source": "tok_visa"}',
        b'{"amount": 1' + b"0" * 5000 + b', "currency": "usd", "source": "tok_visa"}',
        b"[" * 16_000 + b"]" * 16_000,
        b'{"amount": 1999, "currency": "usd", "source": "tok_\xff"}',
        b'{"amount": 1999.0, "currency": "usd", "source": "tok_visa"}',
        b'{"amount": true, "currency": "usd", "source": "tok_visa"}',
        b'{"amount": 1999, "currency": "usd", "source": "tok_visa", "description": "\\ud800"}',
    ],
)
async def test_malformed_bodies_are_422(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post(
        "/v1/charges",
        content=raw,
        headers={"Content-Type": "application/json", "Idempotency-Key": "k"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["errors"]
    assert rows() == 0


async def test_only_json_is_taken(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/v1/charges", data={"amount": "1999"}, headers={"Idempotency-Key": "k"}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    with_charset = await post(api, CHARGE, **{"Content-Type": "application/json; charset=utf-8"})
    assert with_charset.status_code == 201


async def test_the_key_header_once(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/v1/charges",
        content=json.dumps(CHARGE).encode(),
        headers=[
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "a"),
            ("Idempotency-Key", "b"),
        ],
    )
    assert fields(response) == {"Idempotency-Key": ("header", "multiple_values")}


async def test_unknown_charge_and_route_and_method(api: httpx.AsyncClient) -> None:
    missing = await api.get("/v1/charges/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert (await api.get("/v1/nothing")).json()["error"]["code"] == "not_found"
    wrong = await api.delete("/v1/charges")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    assert wrong.json()["error"]["code"] == "method_not_allowed"


async def test_postgres_down_is_503_with_nothing_written(
    serve: Callable[..., httpx.AsyncClient],
) -> None:
    from payq.db import ENGINE, make_engine
    from payq.runtime import runtime
    from payq.settings import get_settings

    app = make_app()
    api, anonymous = serve(INTAKE, app=app), serve(app=app)
    dead = make_engine(
        get_settings().model_copy(
            update={"database_url": "postgresql+psycopg2://postgres@127.0.0.1:9/payq"}
        )
    )
    try:
        with runtime().replaced(ENGINE, dead):
            response = await post(api, CHARGE)
            healthz = await anonymous.get("/healthz")
    finally:
        dead.dispose()
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and "nothing was written" in error["message"]
    assert "psycopg2" not in response.text and "127.0.0.1" not in response.text
    assert healthz.status_code == 503 and healthz.json() == {"status": "down"}
    assert rows() == 0


SHOP = "shop-" + "s" * 24
BILLING = "billing-" + "b" * 24


async def test_an_app_sees_its_own_charges_and_no_other_apps_ids(serve: Any) -> None:
    """Reproduced: any intake token read any charge, and a 409 named another app's charge
    (and, found by an attacker's review, an app could learn or take another's keys)."""
    one_app = make_app(payq_api_tokens=f"shop={SHOP},billing={BILLING}")
    shop, billing = serve(SHOP, app=one_app), serve(BILLING, app=one_app)
    body = {"amount": 1999, "currency": "usd", "source": "tok_visa"}
    made = await shop.post("/v1/charges", json=body, headers={"Idempotency-Key": "order-77"})
    assert made.status_code == 201
    charge_id = made.json()["id"]
    assert (await shop.get(f"/v1/charges/{charge_id}")).status_code == 200
    assert (await billing.get(f"/v1/charges/{charge_id}")).status_code == 404  # not its own
    # Each app has keys of its own: billing's "order-77" is another charge, nothing told of
    # shop's, and billing could not have taken shop's key before shop used it either.
    own = await billing.post("/v1/charges", json=body, headers={"Idempotency-Key": "order-77"})
    assert own.status_code == 201 and own.json()["id"] != charge_id
    assert own.json()["idempotency_key"] == made.json()["idempotency_key"] == "order-77"
    with transaction() as conn:
        keys = sorted(conn.execute(select(charges.c.idempotency_key)).scalars())
    assert keys == ["billing:order-77", "shop:order-77"]  # as the provider sees them


async def test_an_unknown_field_named_like_a_card_is_not_echoed(serve: Any) -> None:
    client = serve(INTAKE)
    body = {"amount": 1999, "currency": "usd", "source": "tok_visa", "A1 4111 1111 1111 1111": 1}
    refused = await client.post("/v1/charges", json=body, headers={"Idempotency-Key": "k-echo"})
    assert refused.status_code == 422
    assert "1111" not in refused.text
