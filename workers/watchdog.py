"""The watchdog: a worker process whose threads stop making progress ends, to be restarted.

payq bounds every step of a charge (provider deadline, database and Redis timeouts), so
a message in progress longer than ``WORKER_WATCHDOG_S`` means a wedged thread (a lock
never released, a driver stuck in a read). Such a process would keep heartbeating, look
healthy and hold its prefetched messages while serving nothing. The watchdog logs where
each wedged thread hangs, marks the process's report ``wedged`` for ``payq health``,
raises an alert and ends the process. The ``dramatiq`` master then stops its group, the
supervisor (systemd, Kubernetes, compose's ``restart:``, ``payq demo``) starts it again,
and the relay puts its held messages back on the queue.

Time the whole process was frozen (VM pause, SIGSTOP) does not count: the watchdog's clock
moves only while it runs, so a thawed process is judged by what it does afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from dramatiq.middleware import Middleware

from payq.sentry import alert

__all__ = ["WEDGED_EXIT", "Watchdog"]

log = logging.getLogger("payq.worker")

#: The exit status of a worker process the watchdog ended (EX_SOFTWARE).
WEDGED_EXIT = 70
TICK_S = 1.0


class Watchdog(Middleware):
    """Ends the process when a message has been in progress longer than ``limit_s``."""

    def __init__(
        self,
        limit_s: float,
        *,
        on_wedged: Callable[[dict[int, float]], None] | None = None,
        tell: Callable[[dict[int, float]], object] | None = None,
        tick_s: float = TICK_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_wedged`` replaces ending the process (tests); ``tell`` is called first, to
        publish the state where ``payq health`` reads it."""
        self.limit_s = limit_s
        self.tell = tell
        self.monotonic = monotonic
        self.tick_s = tick_s
        self.on_wedged = on_wedged or self._end_process
        self.wedged: dict[int, float] = {}  # thread id -> seconds in progress, once found
        self._started: dict[int, float] = {}  # thread id -> the running clock at its start
        self._clock = 0.0  # seconds the process has been running (frozen time left out)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Dramatiq hooks -----------------------------------------------------------------
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()

    def before_process_message(self, broker: Any, message: Any) -> None:
        with self._lock:
            self._started[threading.get_ident()] = self._clock

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        with self._lock:
            self._started.pop(threading.get_ident(), None)

    after_skip_message = after_process_message

    # The watchdog thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="payq-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = self.monotonic()
        while not self._stop.wait(self.tick_s):
            now = self.monotonic()
            # A gap much longer than a tick is time the process was frozen: not counted.
            self._clock += min(now - last, 2 * self.tick_s)
            last = now
            if self.check():
                return

    def check(self) -> bool:
        """Whether a thread is wedged (then ``on_wedged`` was called)."""
        with self._lock:
            ages = {ident: self._clock - since for ident, since in self._started.items()}
        wedged = {ident: age for ident, age in ages.items() if age > self.limit_s}
        if not wedged:
            return False
        self.wedged = wedged
        if self.tell is not None:
            try:
                self.tell(wedged)
            except Exception:  # the process ends anyway: the report is a courtesy
                log.warning("the wedged state could not be reported", exc_info=True)
        self.on_wedged(wedged)
        return True

    def _end_process(self, wedged: dict[int, float]) -> None:
        frames = sys._current_frames()
        where = "\n".join(
            f"thread {ident}, {age:.0f} s on one message:\n"
            + "".join(traceback.format_stack(frames[ident]))
            for ident, age in wedged.items()
            if ident in frames
        )
        alert(
            log,
            f"worker process {os.getpid()} wedged: {len(wedged)} thread(s) on one message for "
            f"over {self.limit_s:g} s (WORKER_WATCHDOG_S), though every step has its own "
            "timeout; it exits to be restarted, and the relay puts its messages back",
            logging.CRITICAL,
            check="watchdog",
        )
        log.critical("where the wedged threads hang:\n%s", where)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(WEDGED_EXIT)
