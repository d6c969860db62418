"""The database engine: one bounded pool per process, and short transactions.

The pool never grows past ``DATABASE_POOL_MAX_CONNECTIONS`` (no overflow); a
checkout waits at most ``DB_TIMEOUT_MS``; every connection carries a statement
timeout and an ``application_name`` so ``pg_stat_activity`` shows who holds it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url

from payq.settings import Settings, get_settings

__all__ = [
    "application_name",
    "get_engine",
    "make_engine",
    "reset_engine",
    "set_role",
    "transaction",
]

_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_role = "payq"


def application_name(role: str) -> str:
    return f"payq-{role}-{os.getpid()}"[:63]


def make_engine(settings: Settings, role: str = "payq") -> Engine:
    connect_args: dict[str, object] = {
        "connect_timeout": max(1, math.ceil(settings.db_timeout_ms / 1000)),
        "application_name": application_name(role),
        "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
    }
    return create_engine(
        make_url(settings.database_url).set(drivername="postgresql+psycopg2"),
        pool_size=settings.database_pool_max_connections,
        max_overflow=0,
        pool_timeout=settings.db_timeout_ms / 1000,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def set_role(role: str) -> None:
    """Name this process's connections (``payq-worker-123``) before the first use."""
    global _role
    _role = role


def get_engine() -> Engine:
    """This process's engine, created on first use (and anew after a fork)."""
    global _engine, _engine_pid
    pid = os.getpid()
    if _engine is None or _engine_pid != pid:
        with _lock:
            if _engine is None or _engine_pid != pid:
                if _engine is not None:
                    # Inherited from the parent: drop its connections without closing
                    # the parent's sockets.
                    _engine.dispose(close=False)
                _engine = make_engine(get_settings(), _role)
                _engine_pid = pid
    return _engine


def reset_engine() -> None:
    """Close this process's pool (tests; shutdown)."""
    global _engine, _engine_pid
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine, _engine_pid = None, None


@contextmanager
def transaction(engine: Engine | None = None) -> Iterator[Connection]:
    """One short transaction: commits on success, rolls back on any error."""
    with (engine or get_engine()).begin() as conn:
        yield conn
