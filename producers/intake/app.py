"""The intake's one wiring place: ``create_app(settings)`` builds the ASGI app.

Requests pass, outermost first: ``RequestMetrics`` (counts everything), then
``Authenticate`` (token, role, rate limit), ``RejectLargeBody`` (the size limit), then
the routes: ``charges`` (``/v1``) and ``system`` (``/healthz``, ``/metrics``,
``/openapi.json``). ``payq serve`` adds the operators' dashboard (``/ops``,
``payq.ops.dashboard.install``) to the same app; its sign-in uses the tokens and
sessions kept here on ``app.state``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from payq import __version__
from payq.settings import Settings, get_settings
from producers.intake import charges, system
from producers.intake.auth import Authenticate, OpsSessions, Tokens
from producers.intake.blocking import Blocking
from producers.intake.bodylimit import RejectLargeBody
from producers.intake.errors import install_error_handlers, responses
from producers.intake.metrics import RequestMetrics
from producers.intake.ratelimit import TokenRateLimit

__all__ = ["create_app"]

_DESCRIPTION = """\
Enqueue payment charges over HTTP: the same function, validation and idempotency as
`producers.enqueue_charge`. Authenticate with `Authorization: Bearer <token>`: a token of
`PAYQ_API_TOKENS` for `/v1`, of `PAYQ_OPERATOR_TOKENS` for `/metrics` and `/ops`. Every
error has one shape: `{"error": {"code", "message", "errors"?: [{"field", "location",
"code", "message"}]}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="payq intake",
        version=__version__,
        description=_DESCRIPTION,
        openapi_url=None,  # served by system.openapi, behind a token
        docs_url=None,
        redoc_url=None,
        responses=responses(401, 403, 429, 503),
    )
    blocking = Blocking(settings.database_pool_max_connections, settings.db_timeout_ms / 1000)
    app.state.settings = settings
    app.state.blocking = blocking
    app.state.health = system.HealthProbe(settings, blocking)
    install_error_handlers(app)
    app.include_router(charges.router)
    app.include_router(system.router)
    tokens = Tokens(settings.intake_apps, settings.operator_tokens)
    sessions = OpsSessions(settings.operator_tokens)
    app.state.tokens = tokens
    app.state.sessions = sessions
    # add_middleware puts each one outside those before it.
    app.add_middleware(RejectLargeBody, max_bytes=settings.serve_max_body_bytes)
    app.add_middleware(
        Authenticate,
        tokens=tokens,
        rate_limit=TokenRateLimit(settings.serve_rate_limit_per_s),
        sessions=sessions,
    )
    app.add_middleware(RequestMetrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document, plus what it cannot know: the hand-parsed body's schema, the
    bearer scheme (checked by middleware, not by dependencies)."""
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    post = doc["paths"]["/v1/charges"]["post"]
    post["requestBody"]["content"]["application/json"]["schema"] = charges.charge_body_schema(
        settings.charge_max_amount
    )
    # The framework's own 422 model never answers (the intake's errors have one shape).
    for operation in (op for path in doc["paths"].values() for op in path.values()):
        if (
            operation["responses"]
            .get("422", {})
            .get("content", {})
            .get("application/json", {})
            .get("schema", {})
            .get("$ref", "")
            .endswith("/HTTPValidationError")
        ):
            del operation["responses"]["422"]
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    doc["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "PAYQ_API_TOKENS for /v1; PAYQ_OPERATOR_TOKENS for /metrics and /ops",
        }
    }
    doc["security"] = [{"bearer": []}]
    return doc
