"""Bearer tokens: intake vs operator, rotation, and a 401 that tells nothing."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from payq.errors import ConfigError
from producers.intake.auth import Access, Role, Tokens, access_for
from tests.webapp import INTAKE, INTAKE_NEXT, OPERATOR, intake_settings

pytestmark = pytest.mark.anyio

CHARGE = json.dumps({"amount": 1999, "currency": "usd", "source": "tok_visa"}).encode()
POST_HEADERS = {"Content-Type": "application/json", "Idempotency-Key": "order-1"}

Serve = Callable[..., httpx.AsyncClient]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {INTAKE}",
        f"Bearer {INTAKE}x",
        f"Bearer {INTAKE[:-1]}",
        "Bearer \u00e9t\u00e9",
        f"Bearer {INTAKE}, Bearer {INTAKE}",
    ],
)
async def test_no_valid_token_is_the_same_401_everywhere(
    serve: Serve, authorization: str | None
) -> None:
    client = serve()
    headers = {} if authorization is None else {"Authorization": authorization.encode()}
    answers = [
        await client.post("/v1/charges", content=CHARGE, headers={**POST_HEADERS, **headers}),
        await client.get("/v1/charges/00000000-0000-0000-0000-000000000000", headers=headers),
        await client.get("/no/such/path", headers=headers),
        await client.get("/metrics", headers=headers),
        await client.get("/ops/anything", headers=headers),
        await client.get("/openapi.json", headers=headers),
        await client.delete("/v1/charges", headers=headers),
    ]
    if authorization is not None:  # a token sent to /healthz must be a valid one
        answers.append(await client.get("/healthz", headers=headers))
    for response in answers:
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.content == answers[0].content
    assert answers[0].json() == {
        "error": {
            "code": "unauthorized",
            "message": "a valid bearer token is required (Authorization: Bearer <token>)",
        }
    }


async def test_two_intake_tokens_work_side_by_side(serve: Serve) -> None:
    """Rotation: the new token works before the old one is removed."""
    for token in (INTAKE, INTAKE_NEXT):
        response = await serve(token).post("/v1/charges", content=CHARGE, headers=POST_HEADERS)
        assert response.status_code in (200, 201)
    after = serve(INTAKE, payq_api_tokens=INTAKE_NEXT)  # the old token removed
    assert (await after.get("/openapi.json")).status_code == 401


async def test_intake_and_operator_tokens_are_kept_apart(serve: Serve) -> None:
    intake, operator = serve(INTAKE), serve(OPERATOR)
    assert (await intake.get("/metrics")).status_code == 403
    assert (await intake.get("/ops/")).json()["error"]["code"] == "forbidden"
    refused = await operator.post("/v1/charges", content=CHARGE, headers=POST_HEADERS)
    assert refused.status_code == 403
    assert (await operator.get("/metrics")).status_code == 200
    assert (await operator.get("/ops/dashboard")).status_code == 404  # not built yet
    for client in (intake, operator):
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/healthz")).json()["checks"]


async def test_without_operator_tokens_the_ops_routes_refuse_everyone(serve: Serve) -> None:
    client = serve(INTAKE, payq_operator_tokens=None)
    assert (await client.get("/metrics")).status_code == 403
    assert (await serve(OPERATOR, payq_operator_tokens=None).get("/metrics")).status_code == 401


def test_access_of_paths() -> None:
    assert access_for("/healthz") is Access.OPTIONAL
    assert access_for("/openapi.json") is Access.ANY
    assert access_for("/metrics") is Access.OPERATOR
    assert access_for("/ops") is Access.OPERATOR and access_for("/ops/x") is Access.OPERATOR
    assert access_for("/opsx") is Access.INTAKE and access_for("/v1/charges") is Access.INTAKE
    assert not Access.OPERATOR.allows(Role.INTAKE) and not Access.INTAKE.allows(Role.OPERATOR)


def test_tokens_identify_by_digest() -> None:
    tokens = Tokens([("shop", INTAKE), ("shop", INTAKE_NEXT)], [OPERATOR])
    first, second = tokens.identify(INTAKE.encode()), tokens.identify(INTAKE_NEXT.encode())
    assert first is not None and second is not None
    assert first.role is Role.INTAKE and first.token_id != second.token_id
    assert INTAKE not in first.token_id
    operator = tokens.identify(OPERATOR.encode())
    assert operator is not None and operator.role is Role.OPERATOR
    assert tokens.identify(b"") is None and tokens.identify(b"\xff" * 40) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"payq_api_tokens": "short"}, "PAYQ_API_TOKENS: each token must be 16-512"),
        ({"payq_api_tokens": f"{INTAKE} {INTAKE_NEXT}"}, "PAYQ_API_TOKENS: each token"),
        ({"payq_operator_tokens": INTAKE}, "PAYQ_OPERATOR_TOKENS: shares a token"),
    ],
)
def test_bad_tokens_are_refused_without_echoing_them(
    overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        intake_settings(**overrides)
    assert INTAKE not in str(caught.value) and "short" not in str(caught.value)


def test_token_lists_are_split_on_commas() -> None:
    settings = intake_settings(payq_api_tokens=f" {INTAKE} ,{INTAKE_NEXT},")
    assert settings.intake_tokens == (INTAKE, INTAKE_NEXT)
    assert INTAKE not in repr(settings)
