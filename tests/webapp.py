"""The web app served by `payq serve`, for the intake's and the dashboard's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from payq.settings import Settings, load_settings

INTAKE = "intake-" + "a" * 24
INTAKE_NEXT = "intake-" + "b" * 24  # a second intake token, as during a rotation
OPERATOR = "operator-" + "c" * 24


def intake_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "payq_api_tokens": f"{INTAKE},{INTAKE_NEXT}",
        "payq_operator_tokens": OPERATOR,
        **overrides,
    }
    return load_settings(**values)


def make_app(**overrides: Any) -> FastAPI:
    from payq_cli.serve import build_app

    return build_app(intake_settings(**overrides))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def serve(clean: None) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """A client of a new app with these setting overrides (or of ``app``), sending ``token``."""
    clients: list[httpx.AsyncClient] = []
    apps: list[FastAPI] = []

    def start(
        token: str | None = None, app: FastAPI | None = None, **overrides: Any
    ) -> httpx.AsyncClient:
        if app is None:
            app = make_app(**overrides)
            apps.append(app)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        client = httpx.AsyncClient(
            transport=transport,
            base_url="http://intake",
            headers=bearer(token) if token else None,
        )
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for app in apps:
        app.state.health.close()


@pytest.fixture
def api(serve: Callable[..., httpx.AsyncClient]) -> httpx.AsyncClient:
    """A client of the default app that sends the intake token."""
    return serve(INTAKE)
