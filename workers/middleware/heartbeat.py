"""The process's heartbeat in Redis, from boot to shutdown (``payq.liveness``): its claims
name it, and once it is proven dead the relay takes its charges over at once."""

from __future__ import annotations

from typing import Any

from dramatiq.middleware import Middleware

from payq.liveness import Heartbeat
from payq.settings import Settings

__all__ = ["Beating"]


class Beating(Middleware):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.heartbeat: Heartbeat | None = None

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        # In the worker process itself (a fork of Dramatiq's master): its own holder,
        # started before the first message is taken, so that its claims name it.
        self.heartbeat = Heartbeat(
            broker.client, broker.namespace, self.settings, alias=broker.broker_id
        )
        self.heartbeat.start()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        # Every message is finished: nothing left to take over. Silent from now on.
        if self.heartbeat is not None:
            self.heartbeat.stop()
