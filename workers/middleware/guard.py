"""Refuse to boot a worker whose threads could outnumber its connection pools."""

from __future__ import annotations

import logging
from typing import Any

from dramatiq.middleware import Middleware

from payq import db
from payq.errors import ConfigError
from payq.settings import Settings

__all__ = ["PoolGuard"]

log = logging.getLogger("payq.worker")


class PoolGuard(Middleware):
    """Checks the pools against the worker's threads at boot, and names its connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        try:
            self.settings.check_worker_pools(worker.worker_threads)
        except ConfigError as exc:
            log.critical("worker refused to start: %s", exc)
            raise SystemExit(2) from None
        db.set_role("worker")
