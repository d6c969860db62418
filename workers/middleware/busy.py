"""How many messages this worker process is on right now, and has done."""

from __future__ import annotations

import threading
from typing import Any

from dramatiq.middleware import Middleware

__all__ = ["BusyCount"]


class BusyCount(Middleware):
    def __init__(self) -> None:
        self.busy = 0
        self.processed = 0
        self.threads = 0
        self._lock = threading.Lock()

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.threads = worker.worker_threads

    def before_process_message(self, broker: Any, message: Any) -> None:
        with self._lock:
            self.busy += 1

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        with self._lock:
            self.busy -= 1
            self.processed += 1

    after_skip_message = after_process_message
