"""The HTTP intake (``payq serve``): ``enqueue_charge`` and ``get_charge`` for web apps
in any language, plus ``/healthz``, ``/metrics`` and the place of the ops dashboard
(``/ops``).

An entry point like the CLI: routes parse and check the request's shape, call the
same core functions as every other caller, and turn payq's errors into HTTP answers
in one place (``errors``). Modules: ``app`` (the wiring), ``charges``, ``system``,
``ops``, ``auth`` (tokens and roles), ``ratelimit``, ``bodylimit``, ``blocking``
(the core's blocking calls, within the database pool), ``metrics``, ``server``
(uvicorn). Importing it loads FastAPI: the CLI imports it only inside ``payq serve``.
"""

from payq.web.app import create_app

__all__ = ["create_app"]
