"""Property-based runs against the intake: no input gives a 500, none creates a charge it
should not.

Two runs. Schemathesis generates requests from the OpenAPI document, valid and
invalid (bodies, headers, paths, methods), for every operation, and checks each answer
against the document. A Hypothesis run aims at POST /v1/charges with bodies built
from near-valid values (card numbers, odd Unicode, wrong types, extra fields), where
the schema-driven run rarely lands on a charge that is valid; ``validate_charge``,
the core's own check, is the oracle: 201/200 exactly for the bodies it accepts.
Both count the charge rows around every request.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from payq.errors import ChargeInputError
from payq.settings import get_settings
from payq.validation import ISO_4217, validate_charge
from tests.helpers import unique_key
from tests.producers.intake.test_charges import rows
from tests.webapp import INTAKE, bearer, make_app

CARD = "4111 1111 1111 1111"


def accepted(body: Any, key: str | None) -> bool:
    """The oracle: would ``enqueue_charge`` take this body and key?"""
    if key is None or not isinstance(body, dict):
        return False
    if set(body) - {"amount", "currency", "source", "description", "metadata"}:
        return False
    if not {"amount", "currency", "source"} <= set(body):
        return False
    try:
        validate_charge(**body, idempotency_key=key, max_amount=get_settings().charge_max_amount)
    except ChargeInputError:
        return False
    return True


def check_answer(status: int, before: int, after: int, valid: bool | None) -> None:
    assert status < 500, f"answered {status}"
    if status >= 400:
        assert after == before, f"{status} but a charge row was written"
    elif status == 201:
        assert after == before + 1
    else:
        assert after == before
    if valid is not None and status in (200, 201):
        assert valid, f"{status} for a body the core's validation refuses"


# Loaded when the module is: schemathesis' lazy loader (``from_fixture``) does not run
# under pytest 9. Building the app touches no service.
schema: OpenApiSchema = schemathesis.openapi.from_asgi(
    "/openapi.json", make_app(serve_rate_limit_per_s=100_000), headers=bearer(INTAKE)
)


@pytest.mark.usefixtures("clean")
@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_openapi_document_holds(case: schemathesis.Case) -> None:
    before = rows()
    response = case.call(headers=bearer(INTAKE))
    # "Schema-valid means accepted" cannot hold: no JSON Schema says "not a card number"
    # or "an ISO 4217 code in any case". The core's validation is the oracle instead.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    after = rows()
    valid = None
    if case.method == "POST" and case.path == "/v1/charges":
        key = (case.headers or {}).get("Idempotency-Key")
        valid = accepted(case.body, key) if isinstance(key, str) else False
    check_answer(response.status_code, before, after, valid)


# Valid bodies, and valid bodies with one field replaced, dropped or added: what a buggy
# or hostile client sends (card numbers, odd Unicode, wrong types, extra fields).
_valid = st.fixed_dictionaries(
    {
        "amount": st.integers(1, 99_999_999),
        "currency": st.sampled_from(sorted(ISO_4217)).flatmap(
            lambda c: st.sampled_from([c, c.upper()])
        ),
        "source": st.from_regex(r"[A-Za-z0-9_\-.:]{3,40}", fullmatch=True),
    },
    optional={
        "description": st.none() | st.text(max_size=40),
        "metadata": st.none()
        | st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=3),
    },
)
_odd = st.one_of(
    st.integers(-5, 5),
    st.integers(99_999_990, 100_000_010),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["usd", "xxx", "tok_visa", "tok visa", "\x00", CARD, f"order {CARD}"]),
    st.sampled_from(["4111-1111-1111-1111 exp 12/30", CARD.replace(" ", "")]),
    st.dictionaries(
        st.text(max_size=12), st.one_of(st.text(max_size=8), st.just(CARD)), max_size=3
    ),
    st.just({"charge_id": "x"}),
    st.lists(st.integers(), max_size=2),
)
_names = st.sampled_from(
    ["amount", "currency", "source", "description", "metadata", "idempotency_key", "extra"]
)


def _replaced(body: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    return {**body, name: value}


def _dropped(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


_bodies = st.one_of(
    _valid,
    _valid,
    st.builds(_replaced, _valid, _names, _odd),
    st.builds(_dropped, _valid, _names),
)
_valid_key = st.from_regex(r"[\x20-\x7e]{1,40}", fullmatch=True)
# Weighted towards what is valid (one_of picks a branch evenly), so that the 201/200 side
# of the property is tried as often as the 4xx side.
_keys = st.one_of(_valid_key, _valid_key, _valid_key, st.none(), st.sampled_from(["", " ", CARD]))


@pytest.mark.usefixtures("clean")
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_bodies, key=_keys, repeat=st.booleans())
def test_charges_are_created_exactly_for_valid_input(
    body: dict[str, Any], key: str | None, repeat: bool
) -> None:
    app = make_app(serve_rate_limit_per_s=100_000)
    # A fresh key per example (but the missing, empty and card-number ones, refused
    # anyway), so that an earlier example's charge is not in the way; a repeat sends the
    # same request twice.
    if key and key != CARD:
        key = unique_key(key)
    headers = {**bearer(INTAKE), "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    content = json.dumps(body).encode()
    valid = accepted(body, key)

    async def exchange() -> list[tuple[int, int, int]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
            seen = []
            for _ in range(2 if repeat else 1):
                before = rows()
                response = await client.post("/v1/charges", content=content, headers=headers)
                seen.append((response.status_code, before, rows()))
                if CARD.replace(" ", "") in response.text.replace(" ", "").replace("-", ""):
                    raise AssertionError(f"a card number echoed: {response.text}")
            return seen

    answers = anyio.run(exchange)
    for status, before, after in answers:
        check_answer(status, before, after, valid)
    statuses = [status for status, _, _ in answers]
    event(f"answered {statuses}")
    if valid:
        assert statuses == ([201, 200] if repeat else [201])
    else:
        assert all(400 <= s < 500 for s in statuses), statuses
