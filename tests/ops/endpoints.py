"""Two provider endpoints for the operator surfaces' tests: ``a`` (the primary, its own
ledger group) and ``b`` (group ``b``), each a simulator of its own, and payq's routes to
them, as ``tests/test_routing.py`` builds them. Real Redis, PostgreSQL and simulators."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from sqlalchemy import text

from payq.db import transaction
from payq.processing import Result, process_charge
from payq.routing import Route, Routes
from payq.settings import Settings, load_settings
from producers import enqueue_charge
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, REDIS_URL
from tests.helpers import Sim, charge, open_breaker, unique_key

#: The breaker settings of both endpoints (the CLI's environment says the same).
BREAKER = {"breaker_min_calls": 4, "breaker_open_s": 30}


class TwoEndpoints:
    def __init__(self, a: Sim, b: Sim, client: redis.Redis) -> None:
        self.a, self.b, self.client = a, b, client
        self.json = json.dumps([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}])
        self.settings: Settings = load_settings(payment_endpoints=self.json, **BREAKER)
        self.routes = Routes.build(self.settings, client)
        for route in self.routes.all:  # nothing runs between tests: no grace for a slot
            route.gate.fleet.mark_settled()

    @property
    def env(self) -> dict[str, str]:
        """The same configuration for a ``payq`` command."""
        return {"PAYMENT_ENDPOINTS": self.json, **{k.upper(): str(v) for k, v in BREAKER.items()}}

    def route(self, name: str) -> Route:
        route = self.routes.named(name)
        assert route is not None
        return route

    def open_breaker(self, name: str) -> None:
        open_breaker(self.route(name).gate)

    def run(self, cid: uuid.UUID) -> Result:
        """One attempt at the charge (due now), through these routes."""
        with transaction() as conn:
            conn.execute(
                text("UPDATE charges SET next_attempt_at = now() WHERE id = :id"), {"id": cid}
            )
        return process_charge(
            str(cid), message_id=charge(cid).message_id, settings=self.settings, routes=self.routes
        )

    def failover(self) -> tuple[uuid.UUID, uuid.UUID]:
        """A charge charged at ``a``; then ``a`` answers 429 (nothing charged) and its
        breaker opens, so a second charge is charged at ``b``: a failover and a move."""
        first = enqueue()
        assert self.run(first) is Result.SUCCEEDED
        self.a.faults(script=["rate_limit"], retry_after_s=0)
        second = enqueue()
        assert self.run(second) is Result.RETRYING
        self.open_breaker("a")
        assert self.run(second) is Result.SUCCEEDED
        return first, second


def enqueue() -> uuid.UUID:
    return enqueue_charge(1999, "usd", "tok_visa", unique_key("ops-ep")).id


@contextmanager
def two_endpoints() -> Iterator[TwoEndpoints]:
    client = redis.Redis.from_url(REDIS_URL)
    with SimulatorThread(api_key=API_KEY) as a, SimulatorThread(api_key=API_KEY) as b:
        ends = TwoEndpoints(Sim(a.url), Sim(b.url), client)
        try:
            yield ends
        finally:
            ends.routes.close()
    client.close()
