"""The HTTP intake: ``enqueue_charge`` and ``get_charge`` for web apps in any language,
plus ``/healthz``, ``/metrics`` and ``/openapi.json``.

A producer like ``producers.enqueue``, over HTTP: routes check the request's shape, call
the same core functions, and turn payq's errors into HTTP answers in one place
(``errors``). Modules: ``app`` (the wiring), ``charges``, ``system``, ``auth`` (tokens,
roles, operator sessions), ``ratelimit``, ``bodylimit``, ``blocking`` (the core's
blocking calls, within the database pool), ``metrics``. Importing it loads FastAPI.
"""

from producers.intake.app import create_app

__all__ = ["create_app"]
