"""One place that wires a process together: its engine, broker and routes to the provider.

Each is a ``Part`` declared beside its maker (``payq.db.ENGINE``, ``payq.broker.BROKER``,
``payq.routing.ROUTES``: each endpoint's client and gate). The process's ``Runtime`` builds a part
from the settings on first use, once, for all its threads; in a forked child it hands
each part built in the parent to the part's ``after_fork`` and builds it anew; ``close``
closes them. Tests replace the whole runtime (``use``) or one part (``replaced``).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from payq.settings import Settings, get_settings

__all__ = ["Part", "Runtime", "runtime", "use"]

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Part(Generic[T]):
    """One shared object of a process, and how it is made, inherited and closed."""

    name: str
    build: Callable[[Runtime], T]
    #: In a forked child, given the parent's object before a new one is built (drop its
    #: connections without closing the parent's sockets). ``None``: the child keeps it.
    after_fork: Callable[[T], None] | None = None
    close: Callable[[T], None] | None = None


class Runtime:
    """The parts of one process, built on first use."""

    def __init__(self, settings: Settings | None = None, role: str = "payq") -> None:
        self._settings = settings
        #: Names this process's database connections (``payq-worker-123``).
        self.role = role
        self._built: dict[Part[Any], Any] = {}
        self._pid = os.getpid()
        self._lock = threading.RLock()  # a part's build may get another part
        _renew_lock_in_children(self)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    def get(self, part: Part[T]) -> T:
        self._forked()
        if part not in self._built:
            with self._lock:
                if part not in self._built:
                    self._built[part] = part.build(self)
        return self._built[part]  # type: ignore[no-any-return]

    def built(self, part: Part[T]) -> T | None:
        """The part if it was built, without building it."""
        self._forked()
        return self._built.get(part)

    def provide(self, part: Part[T], value: T) -> None:
        """Use this object as the part (tests)."""
        with self._lock:
            self._built[part] = value

    @contextmanager
    def replaced(self, part: Part[T], value: T) -> Iterator[T]:
        """Use this object as the part for a block, then what was there before (tests)."""
        with self._lock:
            had, before = part in self._built, self._built.get(part)
            self._built[part] = value
        try:
            yield value
        finally:
            with self._lock:
                if had:
                    self._built[part] = before
                else:
                    self._built.pop(part, None)

    def discard(self, part: Part[T]) -> None:
        """Close the part and forget it: the next ``get`` builds it again."""
        self._forked()
        with self._lock:
            value = self._built.pop(part, None)
        if value is not None and part.close is not None:
            part.close(value)

    def close(self) -> None:
        """Close every part, the last built first (shutdown; tests)."""
        for part in reversed(list(self._built)):
            self.discard(part)

    def _forked(self) -> None:
        """In a forked child, first: the parent's parts that must not be shared go."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            for part, value in list(self._built.items()):
                if part.after_fork is not None:
                    part.after_fork(value)
                    del self._built[part]
            self._pid = os.getpid()


def _renew_lock_in_children(rt: Runtime) -> None:
    """A child forked while a thread held the lock would wait for it for ever."""
    ref = weakref.ref(rt)

    def renew() -> None:
        live = ref()
        if live is not None:
            live._lock = threading.RLock()

    os.register_at_fork(after_in_child=renew)


_current = Runtime()


def runtime() -> Runtime:
    """This process's runtime."""
    return _current


def use(replacement: Runtime) -> Runtime:
    """Make ``replacement`` the process's runtime; returns the one it replaces (tests)."""
    global _current
    previous, _current = _current, replacement
    return previous
