"""Several endpoints: each routing rule, asserted from the providers' side.

Two simulators are two providers with their own books: group ``a`` (the primary) and
group ``b``. What each one's books (``/_charges``) and request log (``/_requests``) hold
for a charge's key is the proof: a charge charged in both groups is charged twice, and
no record of payq's own can hide it. Real PostgreSQL, Redis and simulators over HTTP.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import any_, select, text

from payq.db import transaction
from payq.gate import Pass
from payq.models import operator_actions
from payq.ops.dlq import DeadFilter, replay
from payq.processing import Result, process_charge
from payq.routing import Routes
from payq.settings import Settings, load_settings
from payq.sweep import sweep_once
from producers import enqueue_charge
from provider_sim import SimulatorThread
from tests import helpers
from tests.conftest import API_KEY, REDIS_URL
from tests.helpers import Sim, attempts, charge, lease_passes, unique_key

pytestmark = pytest.mark.usefixtures("clean")

#: A port nothing listens on: connecting is refused before a byte of a request leaves.
CLOSED = "http://127.0.0.1:9"


class Providers:
    """Provider ``a`` (the primary group) and provider ``b``, and payq's routes to them."""

    def __init__(self, a: Sim, b: Sim, client: redis.Redis) -> None:
        self.a, self.b, self.client = a, b, client
        self._routes: list[Routes] = []

    def routes(self, *endpoints: dict[str, Any], attempts: int = 4, **more: Any) -> Routes:
        """Routes to these endpoints (default: ``a`` first, then ``b``)."""
        listed = endpoints or (
            {"name": "a", "url": self.a.url},
            {"name": "b", "url": self.b.url},
        )
        settings = self.settings(list(listed), attempts, **more)
        routes = Routes.build(settings, self.client)
        for route in routes.all:  # nothing runs between tests: no grace for the first slot
            route.gate.fleet.mark_settled()
        routes.settings = settings  # type: ignore[attr-defined]
        self._routes.append(routes)
        return routes

    @staticmethod
    def settings(endpoints: list[dict[str, Any]], attempts: int, **more: Any) -> Settings:
        return load_settings(
            payment_endpoints=json.dumps(endpoints),
            retry_max_attempts=attempts,
            breaker_min_calls=4,
            breaker_open_s=30,
            **more,
        )

    def run(self, cid: uuid.UUID, routes: Routes) -> Result:
        make_due(cid)
        return process_charge(
            str(cid),
            message_id=charge(cid).message_id,
            settings=routes.settings,  # type: ignore[attr-defined]
            routes=routes,
        )

    def close(self) -> None:
        for routes in self._routes:
            routes.close()


def books(sim: Sim, cid: uuid.UUID) -> list[dict[str, Any]]:
    """What this provider charged or declined under the charge's key."""
    key = charge(cid).idempotency_key
    return [b for b in httpx.get(f"{sim.url}/_charges").json() if b["idempotency_key"] == key]


def sent(sim: Sim, cid: uuid.UUID) -> int:
    """How many charge requests this provider saw with the charge's key."""
    return len(sim.requests(charge(cid).idempotency_key))


def make_due(cid: uuid.UUID) -> None:
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET next_attempt_at = now() WHERE id = :id AND status = 'retrying'"
            ),
            {"id": cid},
        )


def open_breaker(routes: Routes, name: str) -> None:
    """Calls through the endpoint's gate that time out, until its breaker opens."""
    route = routes.named(name)
    assert route is not None
    helpers.open_breaker(route.gate)


def enqueue() -> uuid.UUID:
    return enqueue_charge(1999, "usd", "tok_visa", unique_key("route")).id


def audits(cid: uuid.UUID) -> list[dict[str, Any]]:
    with transaction() as conn:
        rows = conn.execute(
            select(operator_actions).where(cid == any_(operator_actions.c.charge_ids))
        )
        return [dict(r) for r in rows.mappings()]


def where(cid: uuid.UUID) -> list[tuple[str, str, str]]:
    """Each charge request's endpoint, ledger group and outcome, in order."""
    return [(a["endpoint"], a["ledger_group"], a["outcome"]) for a in attempts(cid)]


@pytest.fixture
def providers() -> Iterator[Providers]:
    client = redis.Redis.from_url(REDIS_URL)
    with SimulatorThread(api_key=API_KEY) as a, SimulatorThread(api_key=API_KEY) as b:
        p = Providers(Sim(a.url), Sim(b.url), client)
        yield p
        p.close()
    client.close()


def test_a_charge_goes_to_the_first_endpoint_whose_breaker_admits_it(providers: Providers) -> None:
    routes = providers.routes()
    first = enqueue()
    assert providers.run(first, routes) is Result.SUCCEEDED
    assert (len(books(providers.a, first)), sent(providers.b, first)) == (1, 0)
    assert charge(first).charged_endpoint == "a"

    open_breaker(routes, "a")
    second = enqueue()
    assert providers.run(second, routes) is Result.SUCCEEDED
    assert (sent(providers.a, second), len(books(providers.b, second))) == (0, 1)
    assert where(second) == [("b", "b", "succeeded")]
    assert charge(second).charged_endpoint == "b"


def test_a_busy_first_endpoint_is_waited_for_not_spilled_over(providers: Providers) -> None:
    """Failover is for a sick endpoint (its breaker open), not a busy one: while every
    slot of the first endpoint is in use, a charge waits a moment for one."""
    endpoints = (
        {"name": "a", "url": providers.a.url, "max_concurrency": 1},
        {"name": "b", "url": providers.b.url},
    )
    routes, other_process = providers.routes(*endpoints), providers.routes(*endpoints)
    a = other_process.named("a")
    assert a is not None and isinstance(a.gate.enter(), Pass)  # a's one slot, taken
    cid = enqueue()
    assert providers.run(cid, routes) is Result.DEFERRED
    assert (sent(providers.a, cid), sent(providers.b, cid), charge(cid).attempts) == (0, 0, 0)


def test_within_its_group_a_retry_may_go_to_another_endpoint_with_the_same_key(
    providers: Providers,
) -> None:
    # Two URLs of one account (here: one simulator), and provider b.
    routes = providers.routes(
        {"name": "a1", "url": providers.a.url, "group": "acme"},
        {"name": "a2", "url": providers.a.url, "group": "acme"},
        {"name": "b", "url": providers.b.url},
    )
    providers.a.faults(script=["error"])  # a 503: real providers sometimes charge first
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    open_breaker(routes, "a1")
    assert providers.run(cid, routes) is Result.SUCCEEDED
    assert where(cid) == [("a1", "acme", "unclear"), ("a2", "acme", "succeeded")]
    assert (sent(providers.a, cid), len(books(providers.a, cid)), sent(providers.b, cid)) == (
        2,
        1,
        0,
    )


@pytest.mark.parametrize("step", ["timeout", "error", "reset", "key_in_use"])
def test_after_an_answer_that_may_have_charged_the_charge_waits_for_its_group(
    providers: Providers, step: str
) -> None:
    routes = providers.routes()
    providers.a.faults(script=[step], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    open_breaker(routes, "a")
    before = charge(cid).attempts
    # Not to b: a may have charged, and a cannot say (its lookups fail too).
    assert providers.run(cid, routes) is Result.DEFERRED
    assert charge(cid).attempts == before  # waiting used no attempt
    assert sent(providers.b, cid) == 0

    providers.client.delete(routes.all[0].gate.breaker.state_key)  # a is back
    assert providers.run(cid, routes) is Result.SUCCEEDED
    assert len(books(providers.a, cid)) == 1 and sent(providers.b, cid) == 0
    assert providers.a.stats()["duplicate_charges"] == 0


@pytest.mark.parametrize("step", ["error", "reset", "key_in_use"])
def test_a_lookup_that_finds_nothing_in_its_group_frees_the_charge(
    providers: Providers, step: str
) -> None:
    routes = providers.routes()
    providers.a.faults(script=[step])  # each stores nothing at a
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert charge(cid).ledger_group == "a"
    open_breaker(routes, "a")
    if step == "reset":
        # No answer: the request may still be on its way to a, until its claim plus the
        # lease. A 404 before then proves nothing: it waits for a.
        assert providers.run(cid, routes) is Result.DEFERRED
        assert sent(providers.b, cid) == 0
        lease_passes(cid)
    assert providers.run(cid, routes) is Result.SUCCEEDED
    assert (books(providers.a, cid), len(books(providers.b, cid))) == ([], 1)
    assert {(a["endpoint"], a["outcome"]) for a in attempts(cid, kind="lookup")} == {
        ("a", "not_found")
    }
    assert charge(cid).charged_endpoint == "b"
    assert [a["action"] for a in audits(cid)] == ["unpin"]


def test_a_lookup_that_finds_the_charge_in_its_group_settles_it(providers: Providers) -> None:
    routes = providers.routes()
    providers.a.faults(script=["timeout"], timeout_delay_s=2.5)  # charged, then no answer
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    open_breaker(routes, "a")
    assert providers.run(cid, routes) is Result.SUCCEEDED
    [book] = books(providers.a, cid)
    assert (charge(cid).provider_charge_id, charge(cid).charged_endpoint) == (book["id"], "a")
    assert sent(providers.b, cid) == 0


def test_a_request_that_charged_nothing_lets_the_charge_move(providers: Providers) -> None:
    routes = providers.routes()
    providers.a.faults(script=["rate_limit"], retry_after_s=0)  # a 429 charges nothing
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert charge(cid).ledger_group is None  # proven: pinned nowhere
    open_breaker(routes, "a")
    assert providers.run(cid, routes) is Result.SUCCEEDED
    assert (books(providers.a, cid), len(books(providers.b, cid))) == ([], 1)
    assert where(cid) == [("a", "a", "no_charge"), ("b", "b", "succeeded")]


def test_a_refused_connection_sent_nothing_so_the_charge_may_move(providers: Providers) -> None:
    routes = providers.routes(
        {"name": "down", "url": CLOSED}, {"name": "b", "url": providers.b.url}
    )
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    open_breaker(routes, "down")
    assert providers.run(cid, routes) is Result.SUCCEEDED
    assert len(books(providers.b, cid)) == 1
    assert where(cid) == [("down", "down", "refused"), ("b", "b", "succeeded")]


def test_a_no_charge_answer_after_an_unclear_one_proves_nothing(providers: Providers) -> None:
    # a charges, then times out; the retry's 429 says nothing of the first request.
    routes = providers.routes()
    providers.a.faults(
        script=["timeout", "rate_limit"],
        timeout_delay_s=2.5,
        retry_after_s=0,
        lookup_error_rate=1.0,
    )
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert providers.run(cid, routes) is Result.RETRYING
    assert charge(cid).ledger_group == "a"
    open_breaker(routes, "a")
    assert providers.run(cid, routes) is Result.DEFERRED
    assert len(books(providers.a, cid)) == 1 and sent(providers.b, cid) == 0


def test_a_decline_stays_a_decline(providers: Providers) -> None:
    routes = providers.routes()
    providers.a.faults(script=["decline"])
    cid = enqueue()
    assert providers.run(cid, routes) is Result.FAILED
    assert charge(cid).charged_endpoint == "a"
    assert sent(providers.b, cid) == 0


def test_a_soft_decline_moves_the_charge_to_a_group_that_has_not_declined_it(
    providers: Providers,
) -> None:
    routes = providers.routes(payment_soft_declines="card_declined")
    providers.a.faults(script=["decline"])  # 402 card_declined, stored by a
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert providers.run(cid, routes) is Result.SUCCEEDED  # not to a again, though healthy
    assert [b["status"] for b in books(providers.a, cid)] == ["failed"]
    assert [b["status"] for b in books(providers.b, cid)] == ["succeeded"]
    assert where(cid) == [("a", "a", "declined"), ("b", "b", "succeeded")]


def test_a_soft_decline_in_every_group_stands(providers: Providers) -> None:
    routes = providers.routes(payment_soft_declines="card_declined")
    providers.a.faults(script=["decline"])
    providers.b.faults(script=["decline"])
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert providers.run(cid, routes) is Result.FAILED
    assert (charge(cid).decline_code, charge(cid).charged_endpoint) == ("card_declined", "b")
    assert (sent(providers.a, cid), sent(providers.b, cid)) == (1, 1)


def test_the_claim_refuses_an_endpoint_outside_the_charges_pin(providers: Providers) -> None:
    """A worker that read no pin (or a stale one) and picked provider b cannot claim a
    charge pinned to a: its claim is refused, nothing is sent, no attempt is used."""
    routes = providers.routes()
    providers.a.faults(script=["error"])
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    only_b = providers.routes({"name": "b", "url": providers.b.url})
    before = charge(cid).attempts
    assert providers.run(cid, only_b) is Result.DEFERRED
    assert charge(cid).attempts == before
    assert sent(providers.b, cid) == 0


def dead_unknown_sent_to_both(providers: Providers, routes: Routes, b_step: str) -> uuid.UUID:
    """A charge a refused with a 429 (moved on), then b got with ``b_step`` and could not
    be asked about (its lookups fail): dead of unknown outcome, sent to both groups."""
    providers.a.faults(script=["rate_limit"], retry_after_s=0)
    providers.b.faults(script=[b_step], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    open_breaker(routes, "a")
    assert providers.run(cid, routes) is Result.DEAD
    assert charge(cid).dead_outcome == "unknown"
    providers.client.delete(routes.all[0].gate.breaker.state_key)
    providers.b.faults(lookup_error_rate=0.0)
    lease_passes(cid)  # b's request could still be on its way until then
    return cid


def test_the_sweep_settles_a_charge_by_the_group_that_charged_it(providers: Providers) -> None:
    routes = providers.routes(attempts=2)
    cid = dead_unknown_sent_to_both(providers, routes, "timeout")  # b charged it
    swept = sweep_once(routes.settings, budget=5, routes=routes)  # type: ignore[attr-defined]
    assert swept.settled == 1
    [book] = books(providers.b, cid)
    assert books(providers.a, cid) == []
    assert (charge(cid).status, charge(cid).provider_charge_id) == ("succeeded", book["id"])
    assert charge(cid).charged_endpoint == "b"


def test_not_charged_needs_every_group_it_was_sent_to(providers: Providers) -> None:
    routes = providers.routes(attempts=2)
    cid = dead_unknown_sent_to_both(providers, routes, "error")  # b stored nothing
    swept = sweep_once(routes.settings, budget=5, routes=routes)  # type: ignore[attr-defined]
    assert swept.verified == 1
    assert [(a["endpoint"], a["outcome"]) for a in attempts(cid, kind="lookup")][-2:] == [
        ("a", "not_found"),
        ("b", "not_found"),
    ]
    assert (charge(cid).dead_outcome, charge(cid).ledger_group) == ("verified_not_charged", None)
    assert books(providers.a, cid) == [] and books(providers.b, cid) == []


def test_a_replayed_charge_keeps_its_pin(providers: Providers) -> None:
    routes = providers.routes(attempts=1)
    providers.a.faults(script=["timeout"], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, routes) is Result.DEAD  # a charged it; nobody could tell
    assert (charge(cid).dead_outcome, charge(cid).ledger_group) == ("unknown", "a")
    replay(DeadFilter(ids=[cid]), actor="test")
    open_breaker(routes, "a")
    assert providers.run(cid, routes) is Result.DEFERRED  # pinned: not to b
    assert sent(providers.b, cid) == 0
    providers.a.faults(lookup_error_rate=0.0)
    assert providers.run(cid, routes) is Result.SUCCEEDED  # a's lookup settles it
    assert len(books(providers.a, cid)) == 1 and sent(providers.b, cid) == 0
