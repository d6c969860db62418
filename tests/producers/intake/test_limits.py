"""Request size and per-token rate: refused before anything is written."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.producers.intake.test_charges import rows
from tests.webapp import INTAKE, INTAKE_NEXT, make_app

pytestmark = pytest.mark.anyio

Serve = Callable[..., httpx.AsyncClient]
HEADERS = {"Content-Type": "application/json", "Idempotency-Key": "order-1"}


def charge_of(size: int) -> bytes:
    """A valid charge whose JSON is ``size`` bytes long (padded with spaces)."""
    body = json.dumps({"amount": 1999, "currency": "usd", "source": "tok_visa"})
    return body.encode().ljust(size)


async def test_body_over_the_limit_is_413_unread(serve: Serve) -> None:
    api = serve(INTAKE, serve_max_body_bytes=2048)
    assert (
        await api.post("/v1/charges", content=charge_of(2048), headers=HEADERS)
    ).status_code == 201
    response = await api.post(
        "/v1/charges", content=charge_of(2049), headers={**HEADERS, "Idempotency-Key": "o-2"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert rows() == 1


async def test_streamed_body_over_the_limit_is_413(serve: Serve) -> None:
    """No Content-Length (chunked): counted as it arrives."""
    api = serve(INTAKE, serve_max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        body = charge_of(4096)
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    response = await api.post("/v1/charges", content=chunks(), headers=HEADERS)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"
    assert rows() == 0


async def test_a_token_over_its_rate_gets_429_with_retry_after(serve: Serve) -> None:
    app = make_app(serve_rate_limit_per_s=3)
    api, other = serve(INTAKE, app=app), serve(INTAKE_NEXT, app=app)
    answers = [
        await api.post("/v1/charges", content=charge_of(100), headers=HEADERS) for _ in range(4)
    ]
    assert [r.status_code for r in answers] == [201, 200, 200, 429]
    limited = answers[-1]
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"] == {
        "code": "rate_limited",
        "message": "more than 3 requests in a second with this token; retry after 1 s",
        "retry_after_s": 1,
    }
    # Each token has its own budget.
    assert (await other.get("/v1/charges/00000000-0000-0000-0000-000000000000")).status_code == 404
