"""/healthz, /metrics and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tests.webapp import INTAKE, OPERATOR

pytestmark = pytest.mark.anyio

Serve = Callable[..., httpx.AsyncClient]


async def test_healthz_without_a_token_says_only_whether_charges_are_taken(serve: Serve) -> None:
    response = await serve().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_healthz_with_a_token_lists_every_check(serve: Serve) -> None:
    """The provider is not running here: the system is down, the intake is not."""
    response = await serve(OPERATOR).get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["system"] == "down"
    levels = {c["name"]: c["level"] for c in body["checks"]}
    assert levels["postgres"] == "ok" and levels["redis"] == "ok"
    assert levels["provider"] == "down"


async def test_healthz_is_503_while_postgres_does_not_answer(serve: Serve) -> None:
    """The full checks run on a connection of their own: here, to a closed port."""
    dead = "postgresql+psycopg2://postgres@127.0.0.1:9/payq"
    response = await serve(OPERATOR, database_url=dead).get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down" and body["system"] == "down"
    levels = {c["name"]: c["level"] for c in body["checks"]}
    assert levels["postgres"] == "down" and levels["redis"] == "ok"


async def test_metrics_count_the_intake_requests(serve: Serve) -> None:
    api, operator = serve(INTAKE), serve(OPERATOR)
    await api.get("/v1/charges/00000000-0000-0000-0000-000000000000")
    await serve().get("/v1/charges")  # refused before routing
    response = await operator.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'payq_http_requests_total{method="GET",route="/v1/charges/{charge_id}",status="404"}'
        in text
    )
    assert 'payq_http_requests_total{method="GET",route="unrouted",status="401"}' in text
    assert "payq_http_request_duration_seconds_bucket" in text


async def test_openapi_document_describes_the_intake(serve: Serve) -> None:
    doc = (await serve(INTAKE).get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    post = doc["paths"]["/v1/charges"]["post"]
    assert set(post["responses"]) >= {"200", "201", "401", "409", "413", "415", "422", "429"}
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["amount", "currency", "source"]
    assert body["properties"]["amount"]["maximum"] == 99_999_999
    assert post["parameters"][0]["name"] == "Idempotency-Key"
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == [{}, {"bearer": []}]
    assert "HTTPValidationError" not in json.dumps(doc)
    assert "/openapi.json" not in doc["paths"]
