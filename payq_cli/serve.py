"""``payq serve``: the intake under uvicorn, bound to ``SERVE_HOST`` (127.0.0.1 unless
told otherwise).

Without an intake token it does not start: an intake that answers every request 401
looks alive to a load balancer while refusing every charge, and is found out late; a
start that fails with one line naming ``PAYQ_API_TOKENS`` is found out at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from payq.errors import ConfigError
from payq.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["build_app", "serve"]

log = logging.getLogger("payq.web")


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    if not settings.intake_tokens:
        raise ConfigError(
            "PAYQ_API_TOKENS: no intake token set; set one or more (comma-separated), e.g. "
            "from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    import uvicorn

    from payq import db
    from payq.sentry import init_sentry

    init_sentry(settings, component="intake")
    db.set_role("intake")
    host = host or settings.serve_host
    port = port or settings.serve_port
    log.info(
        "intake on http://%s:%d: %d intake and %d operator tokens, at most %d requests/s per "
        "token, bodies up to %d bytes, %d database slots",
        host,
        port,
        len(settings.intake_tokens),
        len(settings.operator_tokens),
        settings.serve_rate_limit_per_s,
        settings.serve_max_body_bytes,
        settings.database_pool_max_connections,
    )
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_drop_color_message)
    if not settings.operator_tokens:
        log.info("PAYQ_OPERATOR_TOKENS is empty: /metrics and /ops refuse every request")
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # payq's logging (LOG_FORMAT) formats uvicorn's lines too
        server_header=False,
        lifespan="off",
    )
    try:
        uvicorn.Server(config).run()
    finally:
        app.state.health.close()
        db.reset_engine()


def _drop_color_message(record: logging.LogRecord) -> bool:
    """uvicorn attaches an ANSI-coloured copy of some messages as ``color_message``;
    payq's formatters would print it as one more field."""
    record.__dict__.pop("color_message", None)
    return True


def build_app(settings: Settings | None = None) -> FastAPI:
    """What ``payq serve`` serves: the intake, with the operators' dashboard on it."""
    from payq.ops.dashboard import install
    from producers.intake import create_app

    return install(create_app(settings))
