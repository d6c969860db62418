"""The web app's fixtures (``tests.webapp``): the intake with the dashboard on it."""

from tests.webapp import anyio_backend, api, serve

__all__ = ["anyio_backend", "api", "serve"]
