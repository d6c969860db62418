"""The database engine: one bounded pool per process, and short transactions.

The pool never grows past ``DATABASE_POOL_MAX_CONNECTIONS`` (no overflow); a
checkout waits at most ``DB_TIMEOUT_MS``; every connection carries a statement
timeout and an ``application_name`` so ``pg_stat_activity`` shows who holds it.

A connection that sat in the pool for more than ``PING_AFTER_IDLE_S`` is pinged at
checkout, and replaced if PostgreSQL does not answer (restarted, or the connection was
cut while idle). SQLAlchemy's own ``pool_pre_ping`` pings at every checkout: on a busy
worker that is a round trip per statement for connections used a few milliseconds
earlier. A connection in steady use that breaks fails its statement instead, which the
callers handle (the claim defers the charge, the record retries), and SQLAlchemy then
replaces every connection of the pool that predates the failure.

Behind a pooler in transaction mode (``DATABASE_POOLER=transaction``, e.g. PgBouncer)
consecutive transactions of one client connection may run on different server
connections, and the pooler refuses or drops startup parameters. So payq then keeps
nothing on a server connection between transactions: no ``PREPARE`` (``Prepared`` runs
its plain SQL), and the statement timeout is not a startup parameter but a
``SET LOCAL statement_timeout`` sent in the same query string as each statement
(``_timeout_per_statement``), which holds for that statement's transaction and ends
with it. ``application_name`` is a parameter PgBouncer passes on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, create_engine, event
from sqlalchemy.dialects.postgresql import psycopg2 as pg_psycopg2
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from payq.runtime import Part, runtime
from payq.settings import Settings

__all__ = [
    "PING_AFTER_IDLE_S",
    "Prepared",
    "application_name",
    "autocommit",
    "database_problem",
    "get_engine",
    "make_engine",
    "reset_engine",
    "set_role",
    "startup_options",
    "transaction",
]

log = logging.getLogger("payq.db")

#: A pooled connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE_S = 1.0


def application_name(role: str) -> str:
    return f"payq-{role}-{os.getpid()}"[:63]


def make_engine(settings: Settings, role: str = "payq", *, url: str | None = None) -> Engine:
    """This process's kind of engine for DATABASE_URL (``url``: another server's, reached
    directly, e.g. ``settings.migration_url``: never through the pooler)."""
    connect_args: dict[str, object] = {
        "connect_timeout": max(1, math.ceil(settings.db_timeout_ms / 1000)),
        "application_name": application_name(role),
    }
    pooled = settings.database_pooler == "transaction" and url is None
    options = startup_options(settings, direct=url is not None)
    if options is not None:
        connect_args["options"] = options
    engine = create_engine(
        make_url(url or settings.database_url).set(drivername="postgresql+psycopg2"),
        pool_size=settings.database_pool_max_connections,
        max_overflow=0,
        pool_timeout=settings.db_timeout_ms / 1000,
        connect_args=connect_args,
        # An error's text never carries the statement's values (payment tokens, keys):
        # not in a traceback, a log line or a Sentry event.
        hide_parameters=True,
    )
    _ping_after_idle(engine)
    if pooled:
        _timeout_per_statement(engine, settings.db_statement_timeout_ms)
    return engine


def _timeout_per_statement(engine: Engine, timeout_ms: int) -> None:
    """Behind a transaction pooler: each statement carries its own statement timeout, and
    no connection prepares statements (module docstring)."""
    prefix = f"SET LOCAL statement_timeout = {int(timeout_ms)}; "

    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["payq_unprepared"] = True  # read by Prepared.execute

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _with_timeout(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        # Several statements in one query run as one transaction (an implicit one in
        # autocommit): SET LOCAL holds for the statement after it and ends with it.
        return prefix + statement, parameters


def startup_options(settings: Settings, *, direct: bool = False) -> str | None:
    """The ``options`` startup parameter payq's connections send: the statement timeout,
    except through a transaction pooler (``direct``: a URL past the pooler)."""
    if settings.database_pooler == "transaction" and not direct:
        return None
    return f"-c statement_timeout={settings.db_statement_timeout_ms}"


def _ping_after_idle(engine: Engine) -> None:
    """Ping a connection at checkout if it sat idle in the pool (module docstring)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(
        dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= PING_AFTER_IDLE_S:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (up to 3 times).
            raise DisconnectionError(f"idle connection did not answer a ping: {exc}") from exc


#: This process's engine (``payq.runtime``): anew after a fork, dropping the parent's
#: connections without closing its sockets.
ENGINE: Part[Engine] = Part(
    "engine",
    build=lambda rt: make_engine(rt.settings, rt.role),
    after_fork=lambda engine: engine.dispose(close=False),
    close=lambda engine: engine.dispose(),
)


def set_role(role: str) -> None:
    """Name this process's connections (``payq-worker-123``) before the first use."""
    runtime().role = role


def get_engine() -> Engine:
    """This process's engine, created on first use (and anew after a fork)."""
    return runtime().get(ENGINE)


def reset_engine() -> None:
    """Close this process's pool (tests; shutdown)."""
    runtime().discard(ENGINE)


@contextmanager
def transaction(engine: Engine | None = None) -> Iterator[Connection]:
    """One short transaction: commits on success, rolls back on any error."""
    with (engine or get_engine()).begin() as conn:
        yield conn


@contextmanager
def autocommit(engine: Engine | None = None) -> Iterator[Connection]:
    """A connection whose every statement commits on its own, as PostgreSQL answers.

    For work that is one statement, atomic by itself (an INSERT, a guarded UPDATE, a
    CTE): no BEGIN and COMMIT round trips. Autocommit is set on the driver's connection,
    as SQLAlchemy's own ping does. SQLAlchemy's ``isolation_level="AUTOCOMMIT"`` would
    leave psycopg2 an explicit isolation level on the way back to the pool, which costs
    every later transaction on that connection a round trip.
    """
    with (engine or get_engine()).connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None  # checked out by connect()
        driver.autocommit = True
        try:
            yield conn
        finally:
            if not driver.closed:  # psycopg2 closes a connection it found broken
                driver.autocommit = False


class Prepared:
    """A Core statement that PostgreSQL parses and plans once per connection.

    The worker's two statements per charge (the claim, the record) are long, and
    psycopg2 has no server-side prepared statements of its own: each call was parsed
    and planned again by PostgreSQL, and compiled into a cursor call by SQLAlchemy. Here
    the statement is compiled once, ``PREPARE``d on a connection the first time that
    connection runs it, and then run as ``EXECUTE name(...)`` with only the values.

    The name carries a hash of the SQL, so two versions of payq side by side (a rolling
    deploy) never run each other's statement. A connection that lost its prepared
    statements (``DISCARD ALL``, a pooler in transaction mode handing each statement
    to another server connection) prepares again; if the statement is missing once
    more right after, that connection runs the plain SQL from then on, and a warning
    says why. Runs only in autocommit (``autocommit()``): a failed EXECUTE must not
    abort a transaction around it.

    ``durable=False``: the statement's commit does not wait for its WAL flush
    (``synchronous_commit = off`` for that statement alone, sent in the same round trip).
    Only for a write whose loss in a PostgreSQL crash is recovered anyway: the claim
    (``processing``). A later durable commit on the server flushes it too.
    """

    def __init__(self, name: str, statement: ClauseElement, *, durable: bool = True) -> None:
        dialect = pg_psycopg2.dialect()  # type: ignore[no-untyped-call]
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        assert isinstance(compiled, SQLCompiler)
        if compiled._bind_processors:  # EXECUTE sends the values as they are
            raise ValueError(f"{name}: a bind parameter's type converts values; not supported")
        sql = str(compiled)
        if "%" in re.sub(r"%\(\w+\)s", "", sql):
            raise ValueError(f"{name}: a literal % in the SQL cannot be prepared")
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))
        position = {n: k + 1 for k, n in enumerate(names)}
        types = [compiled.binds[n].type.compile(dialect=dialect) for n in names]
        self.name = f"payq_{name}_{hashlib.blake2s(sql.encode(), digest_size=5).hexdigest()}"
        self._compiled = compiled
        self._names = names
        self._sql = sql
        self._prepare = f"PREPARE {self.name}({', '.join(types)}) AS " + re.sub(
            r"%\((\w+)\)s", lambda m: f"${position[m.group(1)]}", sql
        )
        self._execute = f"EXECUTE {self.name}({', '.join(['%s'] * len(names))})"
        if not durable:
            # Several statements in one query run as one implicit transaction: SET LOCAL
            # holds for the statement after it, and no more.
            self._sql = _NOT_DURABLE + self._sql
            self._execute = _NOT_DURABLE + self._execute

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> CursorResult[Any]:
        info = conn.connection.info  # cleared by SQLAlchemy when it reconnects
        values = self._compiled.construct_params(dict(params))
        assert values is not None
        if not info.get("payq_unprepared"):
            prepared: set[str] = info.setdefault("payq_prepared", set())
            args = tuple(values[n] for n in self._names)
            for _ in range(2):  # the second time after preparing again
                try:
                    return self._run(conn, prepared, args)
                except DBAPIError as exc:
                    if _sqlstate(exc) != "26000":  # invalid_sql_statement_name
                        raise
                prepared.clear()
            info["payq_unprepared"] = True
            log.warning(
                "prepared statements vanish between statements on this database connection "
                "(a pooler in transaction mode?): it runs plain SQL from now on"
            )
        return conn.exec_driver_sql(self._sql, values)

    def _run(
        self, conn: Connection, prepared: set[str], args: tuple[Any, ...]
    ) -> CursorResult[Any]:
        if self.name not in prepared:
            self._prepare_on(conn)
            prepared.add(self.name)
        return conn.exec_driver_sql(self._execute, args)

    def _prepare_on(self, conn: Connection) -> None:
        try:
            conn.exec_driver_sql(self._prepare)
        except DBAPIError as exc:
            if _sqlstate(exc) != "42P05":  # duplicate_prepared_statement: same SQL, same name
                raise


_NOT_DURABLE = "SET LOCAL synchronous_commit = off; "


def database_problem(exc: BaseException) -> tuple[int, str] | None:
    """What a database error means for whoever runs payq: an exit code (2: fix the
    setup, 3: PostgreSQL did not answer) and one line saying what to do; ``None`` if it
    is not about the database at all. Never the statement, its values or the URL."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, PoolTimeout):
        return 3, "no database connection within DB_TIMEOUT_MS: PostgreSQL is slow or full"
    if not isinstance(exc, DBAPIError):
        return None
    code = _sqlstate(exc)
    text = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
    if code in ("42P01", "42703"):  # undefined_table, undefined_column
        return 2, (f"the database has no payq schema, or an older one ({text}): run `payq migrate`")
    lowered = text.lower()
    if "database" in lowered and "does not exist" in lowered:
        return 2, (
            "PostgreSQL answered, but the database DATABASE_URL names does not exist: "
            "run `payq migrate` (it creates it) or fix DATABASE_URL"
        )
    if "role" in lowered and "does not exist" in lowered:
        return 2, (
            "PostgreSQL answered, but the user DATABASE_URL names does not exist: create "
            "the role or fix DATABASE_URL"
        )
    if "unsupported startup parameter" in lowered:
        return 2, (
            f"a pooler at DATABASE_URL refused a connection parameter ({text}): set "
            "DATABASE_POOLER=transaction for a pooler in transaction mode"
        )
    if "password authentication failed" in lowered or "pg_hba.conf" in lowered:
        return 2, "PostgreSQL refused the credentials in DATABASE_URL: fix them"
    if isinstance(exc, OperationalError | InterfaceError):
        return 3, (
            f"PostgreSQL did not answer ({type(exc.orig).__name__}); check that it runs "
            "and DATABASE_URL"
        )
    return 1, f"the database refused a statement ({type(exc.orig).__name__}, SQLSTATE {code})"


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "pgcode", None)
