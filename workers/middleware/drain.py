"""A second SIGTERM right after the first is the same request to stop, not "kill now"."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

from dramatiq.middleware import Middleware

__all__ = ["DrainOnce"]

log = logging.getLogger("payq.worker")


class DrainOnce(Middleware):
    """A second SIGTERM right after the first is the same request to stop, not "kill now".

    Dramatiq's worker process drains on its first SIGTERM and exits at once, cutting its
    calls, on the next. A signal to the whole process group (systemd's default
    ``KillMode=control-group``, ``kill -TERM -PGID``, a terminal's Ctrl-\\) reaches each
    worker twice: straight, and again from the ``dramatiq`` master passing it on. So a
    repeat within ``REPEAT_WINDOW_S`` is ignored; a later one still stops the process hard.
    """

    REPEAT_WINDOW_S = 2.0

    def __init__(self) -> None:
        self._first: float | None = None

    def after_process_boot(self, broker: Any) -> None:
        dramatiq_handler = signal.getsignal(signal.SIGTERM)
        if not callable(dramatiq_handler):
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            now = time.monotonic()
            if self._first is not None and now - self._first < self.REPEAT_WINDOW_S:
                log.info("repeated SIGTERM ignored: this worker is already draining")
                return
            self._first = self._first or now
            dramatiq_handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
