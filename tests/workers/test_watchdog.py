"""The watchdog: a wedged thread ends its process; a frozen process is not judged wedged.

Pure tests of the middleware with its own thread; the end of the process is replaced by
a record of the call.
"""

from __future__ import annotations

import itertools
import threading

from tests.helpers import wait_until
from workers.watchdog import Watchdog


def _message_in(watchdog: Watchdog, done: threading.Event) -> threading.Thread:
    """A worker thread that takes a message and holds it until ``done``."""

    def work() -> None:
        watchdog.before_process_message(None, None)
        done.wait(10)
        watchdog.after_process_message(None, None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_a_thread_stuck_on_one_message_ends_the_process_after_telling() -> None:
    calls: list[str] = []
    watchdog = Watchdog(
        0.3,
        tick_s=0.05,
        tell=lambda wedged: calls.append(f"tell {len(wedged)}"),
        on_wedged=lambda wedged: calls.append(f"end {len(wedged)}"),
    )
    done = threading.Event()
    stuck = _message_in(watchdog, done)
    quick = threading.Event()
    _message_in(watchdog, quick)
    quick.set()  # this one finishes at once: not wedged
    watchdog.start()
    try:
        wait_until(lambda: calls, 5, "the watchdog to find the stuck thread")
        assert calls == ["tell 1", "end 1"]
        assert list(watchdog.wedged) == [stuck.ident]
    finally:
        done.set()
        watchdog.before_worker_shutdown(None, None)


def test_messages_that_finish_in_time_never_trip_it() -> None:
    ended: list[dict[int, float]] = []
    watchdog = Watchdog(0.5, tick_s=0.05, on_wedged=ended.append)
    watchdog.start()
    try:
        for _ in range(10):
            done = threading.Event()
            thread = _message_in(watchdog, done)
            threading.Timer(0.1, done.set).start()
            thread.join()
        assert ended == []
    finally:
        watchdog.before_worker_shutdown(None, None)


def test_time_the_whole_process_was_frozen_does_not_count() -> None:
    """A VM pause: the watchdog's own clock jumps by 600 s in one tick. The message in
    progress then has the watchdog's limit again to finish, from the thaw."""
    jumps = itertools.chain([0.0, 0.05, 600.05], itertools.count(600.1, 0.05))
    ended: list[dict[int, float]] = []
    watchdog = Watchdog(5.0, tick_s=0.01, on_wedged=ended.append, monotonic=lambda: next(jumps))
    done = threading.Event()
    _message_in(watchdog, done)
    watchdog.start()
    try:
        wait_until(lambda: watchdog._clock > 0.5, 5, "the watchdog to tick past the freeze")
        assert ended == []  # 600 s frozen, yet well within its 5 s
        wait_until(lambda: ended, 10, "the limit to pass in running time")
    finally:
        done.set()
        watchdog.before_worker_shutdown(None, None)
