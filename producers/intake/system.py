"""``/healthz``, ``/metrics`` and ``/openapi.json``.

``/healthz`` answers a load balancer: 200 while this intake can take charges, 503
while it cannot. It can while PostgreSQL answers: a charge exists once its row is
committed. Redis is not needed (a charge enqueued while Redis is away is published
by the relay later), nor is the provider (workers defer charges while it is down);
an intake pulled out of a load balancer for either would refuse charges it could
have kept. So the status code follows the PostgreSQL check alone.

Without a token the body is only that verdict. With a valid token (either kind) it
also holds every check of ``payq health``, run afresh, and the worst of them as
``system`` (the status code still follows PostgreSQL alone). See ``HealthProbe``.
"""

from __future__ import annotations

import time
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel
from sqlalchemy import Engine

from payq.db import make_engine
from payq.errors import ServiceUnavailable
from payq.health import Check, Level, check_postgres, run_checks, worst
from payq.settings import Settings
from producers.intake.blocking import Blocking
from producers.intake.errors import JSONBody

__all__ = ["HealthProbe", "router"]

#: How long an anonymous verdict is reused.
VERDICT_TTL_S = 1.0


class CheckOut(BaseModel):
    name: str
    level: Literal["ok", "degraded", "down"]
    detail: str


class HealthOut(BaseModel):
    status: Literal["ok", "down"]
    system: Literal["ok", "degraded", "down"] | None = None
    checks: list[CheckOut] | None = None


class HealthProbe:
    """The verdict for anonymous callers, and the full checks for token holders.

    The verdict asks what a charge would: can it get one of the intake's database
    slots and a connection within ``DB_TIMEOUT_MS``, and does PostgreSQL answer. One
    probe per ``VERDICT_TTL_S`` at most, its answer shared by every caller meanwhile,
    so load balancers cannot crowd the pool.

    The full checks (a provider lookup among them, seconds at worst) run one at a time
    on a connection of their own, as a worker's do: they never hold a slot or a
    connection that charges need. The intake's connections are thus
    ``DATABASE_POOL_MAX_CONNECTIONS`` plus this one.
    """

    def __init__(self, settings: Settings, blocking: Blocking) -> None:
        self._settings = settings
        self._blocking = blocking
        # One run at a time; the next waits at most about one run's worst case.
        self._own = Blocking(1, settings.payment_timeout_s + 2 * settings.db_timeout_ms / 1000)
        self._engine: Engine | None = None
        self._lock = anyio.Lock()
        self._at = -VERDICT_TTL_S
        self._ok = False

    async def accepting(self) -> bool:
        async with self._lock:
            if time.monotonic() - self._at >= VERDICT_TTL_S:
                try:
                    check = await self._blocking.run(check_postgres)
                except ServiceUnavailable:  # every slot stayed busy past DB_TIMEOUT_MS
                    self._ok = False
                else:
                    self._ok = check.level is Level.OK
                self._at = time.monotonic()
            return self._ok

    async def checks(self) -> list[Check]:
        return await self._own.run(lambda: run_checks(self._settings, engine=self._own_engine()))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def _own_engine(self) -> Engine:
        if self._engine is None:  # on first use: an app that is never probed connects nowhere
            one = self._settings.model_copy(update={"database_pool_max_connections": 1})
            self._engine = make_engine(one, "intake-health")
        return self._engine


def _status(ok: bool) -> Literal["ok", "down"]:
    return "ok" if ok else "down"


router = APIRouter(tags=["system"])


@router.get(
    "/healthz",
    summary="Can this intake take charges?",
    response_class=JSONBody,
    responses={
        200: {"model": HealthOut, "description": "PostgreSQL answers: charges are taken."},
        503: {"model": HealthOut, "description": "PostgreSQL does not answer."},
    },
    openapi_extra={"security": [{}, {"bearer": []}]},
)
async def healthz(request: Request) -> JSONBody:
    health: HealthProbe = request.app.state.health
    if request.state.principal is None:
        ok = await health.accepting()
        return JSONBody({"status": _status(ok)}, status_code=200 if ok else 503)
    checks = await health.checks()
    ok = all(c.level is Level.OK for c in checks if c.name == "postgres")
    body = HealthOut(
        status=_status(ok),
        system=worst(checks).name.lower(),  # type: ignore[arg-type]
        checks=[CheckOut.model_validate(c.as_dict()) for c in checks],
    )
    return JSONBody(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics of this process (operator token)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONBody:
    return JSONBody(request.app.openapi())
