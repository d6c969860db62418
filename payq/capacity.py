"""Start-time guard: a worker group must fit in what PostgreSQL has left.

Each worker process may open up to ``DATABASE_POOL_MAX_CONNECTIONS`` pooled connections
plus one for its health checks (``workers/middleware/health.py``), so a group of N
processes may need ``N x (pool + 1)``. PostgreSQL refuses a connection past
``max_connections`` minus its reserved slots (``superuser_reserved_connections``, and
``reserved_connections`` on 16+); a fleet over that fails under load, mid-charge, with
"too many clients". ``payq worker`` refuses to start such a group, with the arithmetic.

It is a check, not a reservation. Pools open lazily, so "already open" is what others
hold now, not what they may open later: size the fleet so ``sum(processes x (pool + 1))``
plus everyone else fits. A restarted group is not refused for the group that died: its
connections close with its sockets (a vanished host's when TCP keepalive notices).
Behind a pooler in transaction mode (``DATABASE_POOLER=transaction``) the group's pools
are the pooler's clients: what must fit in PostgreSQL is the pooler's server pool, and
the group must fit in the pooler's client limit (``check_pooled_fleet_fits``,
``payq.pooler``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from payq.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from payq.pooler import PoolerBudget

__all__ = [
    "HEALTH_CONNECTIONS_PER_PROCESS",
    "ConnectionBudget",
    "check_fleet_fits",
    "check_pooled_fleet_fits",
    "read_connection_budget",
]

log = logging.getLogger("payq.capacity")

#: The health checks' own engine in each worker process (one connection, kept open).
HEALTH_CONNECTIONS_PER_PROCESS = 1

# One round trip. ``reserved_connections`` exists from PostgreSQL 16 on: missing_ok.
# Only client backends take a max_connections slot (autovacuum, WAL senders and
# background workers have slots of their own); this check's own connection is left out.
_BUDGET_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int
"""

# How PostgreSQL says it has no slot left ("sorry, too many clients already", or only
# reserved ones left): waiting a few seconds will not make room for a worker group.
_FULL_SIGNS = ("too many clients", "remaining connection slots are reserved")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionBudget:
    """What one PostgreSQL server allows, and how much of it is taken, at one moment."""

    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections
    already_open: int  # client connections open now, this check's own excluded

    @property
    def available(self) -> int:
        """Slots left for ordinary roles (below zero when superusers use reserved ones)."""
        return self.max_connections - self.reserved - self.already_open


def check_fleet_fits(processes: int, pool_max_connections: int, budget: ConnectionBudget) -> str:
    """The budget line to log if ``processes`` fit; raise ``ConfigError`` if they do not.

    Pure arithmetic, so the message (what an operator reads) is unit-tested as is.
    """
    per_process = pool_max_connections + HEALTH_CONNECTIONS_PER_PROCESS
    needed = processes * per_process
    need = (
        f"{processes} process{'es' if processes != 1 else ''} x (DATABASE_POOL_MAX_CONNECTIONS "
        f"{pool_max_connections} + {HEALTH_CONNECTIONS_PER_PROCESS} for health checks) = "
        f"{needed} connections"
    )
    allows = (
        f"PostgreSQL allows {budget.max_connections} (max_connections) - {budget.reserved} "
        f"(reserved) - {budget.already_open} (already open) = {budget.available} more"
    )
    if needed > budget.available:
        raise ConfigError(
            f"{need}, but {allows}; lower --processes/WORKER_PROCESSES or "
            "DATABASE_POOL_MAX_CONNECTIONS, or raise max_connections"
        )
    return f"database connections: {need}; {allows}"


def check_pooled_fleet_fits(
    processes: int, pool_max_connections: int, budget: ConnectionBudget, pooler: PoolerBudget
) -> str:
    """``check_fleet_fits`` behind a pooler in transaction mode: the pooler's server pool
    must fit in what PostgreSQL has left, and the group in the pooler's client limit."""
    per_process = pool_max_connections + HEALTH_CONNECTIONS_PER_PROCESS
    clients = processes * per_process
    server = (
        f"the pooler's server pool of {pooler.server_connections} ({pooler.source}) may open "
        f"{pooler.server_more} more; PostgreSQL allows {budget.max_connections} "
        f"(max_connections) - {budget.reserved} (reserved) - {budget.already_open} (already "
        f"open) = {budget.available} more"
    )
    if pooler.server_more > budget.available:
        raise ConfigError(
            f"behind a pooler, {server}; lower the pooler's pool_size/max_db_connections or "
            "DATABASE_POOLER_SERVER_CONNECTIONS, or raise max_connections"
        )
    group = (
        f"{processes} process{'es' if processes != 1 else ''} x (DATABASE_POOL_MAX_CONNECTIONS "
        f"{pool_max_connections} + {HEALTH_CONNECTIONS_PER_PROCESS} for health checks) = "
        f"{clients} pooler clients"
    )
    available = pooler.clients_available
    if available is None:
        return f"database connections: {group} (the pooler's client limit unknown); {server}"
    limit = (
        f"the pooler allows {pooler.max_client_conn} (max_client_conn) - "
        f"{pooler.clients_open} (already open) = {available} more"
    )
    if clients > available:
        raise ConfigError(
            f"{group}, but {limit}; lower --processes/WORKER_PROCESSES or "
            "DATABASE_POOL_MAX_CONNECTIONS, or raise the pooler's max_client_conn"
        )
    return f"database connections: {group}, {limit}; {server}"


def read_connection_budget(
    database_url: str, *, connect_timeout_s: int, wait_s: float, options: str | None = None
) -> ConnectionBudget:
    """Ask PostgreSQL for its connection budget over one short-lived connection.

    A worker is often started beside a PostgreSQL that is still starting (compose, a
    reboot): connection errors are retried with short waits (tenacity) for up to
    ``wait_s``, then ``ServiceUnavailable`` says what to start or check. The DSN is never
    part of a message. ``options``: the startup parameter the group's connections will
    send (``payq.db.startup_options``), so a pooler that refuses it refuses here, at once.
    """
    import tenacity
    from sqlalchemy.exc import OperationalError

    from payq.errors import ServiceUnavailable

    engine = _budget_engine(database_url, connect_timeout_s, options)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2),
        retry=tenacity.retry_if_exception(
            lambda exc: (
                isinstance(exc, OperationalError)
                and not _full(exc)
                and not _refused(exc)
                and _denial(exc) is None
            )
        ),
        before_sleep=lambda state: log.warning(
            "PostgreSQL does not answer yet (attempt %d); retrying", state.attempt_number
        ),
        reraise=True,
    )
    try:
        return retrying(_read_budget, engine)
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0][:200]
        if _refused(exc):
            raise ConfigError(
                f"the database at DATABASE_URL refused a connection parameter ({reason}): a "
                "pooler in transaction mode? set DATABASE_POOLER=transaction"
            ) from None
        if _full(exc):
            raise ConfigError(
                f"PostgreSQL refused even one more connection ({reason}): max_connections is "
                "used up; stop something or raise max_connections before adding workers"
            ) from None
        if (denial := _denial(exc)) is not None:  # it answered: a wait would not help
            raise ConfigError(f"{denial}; the worker was not started") from None
        raise ServiceUnavailable(
            f"PostgreSQL did not accept a connection at DATABASE_URL within {wait_s:g} s "
            f"({reason}): start it or check DATABASE_URL; the worker was not started"
        ) from None
    finally:
        engine.dispose()


def _denial(exc: BaseException) -> str | None:
    """What PostgreSQL said when it answered and turned the connection down (an unknown
    user or database, a wrong password), as ``payq.db`` says it; ``None`` otherwise."""
    from payq.db import database_problem

    problem = database_problem(exc)
    return problem[1] if problem is not None and problem[0] == 2 else None


def _budget_engine(database_url: str, connect_timeout_s: int, options: str | None) -> Engine:
    """An engine of one connection at a time, opened and closed per use."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from payq.db import application_name

    return create_engine(
        make_url(database_url).set(drivername="postgresql+psycopg2"),
        poolclass=NullPool,
        connect_args={
            "connect_timeout": connect_timeout_s,
            # Not payq-worker-*: samplers that count a group's connections by that name
            # (the chaos run, the pool drill) must not see this one.
            "application_name": application_name("capacity-check"),
            **({"options": options} if options is not None else {}),
        },
    )


def _read_budget(engine: Engine) -> ConnectionBudget:
    from sqlalchemy import text

    with engine.connect() as conn:
        max_connections, superuser_reserved, reserved, already_open = conn.execute(
            text(_BUDGET_SQL)
        ).one()
    return ConnectionBudget(
        max_connections=max_connections,
        reserved=superuser_reserved + reserved,
        already_open=already_open,
    )


def _full(exc: BaseException) -> bool:
    """PostgreSQL refused because every connection slot is taken."""
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, OperationalError) and any(sign in str(exc) for sign in _FULL_SIGNS)


def _refused(exc: BaseException) -> bool:
    """A pooler refused a startup parameter (PgBouncer: ``options``): no wait mends it."""
    return "unsupported startup parameter" in str(exc)
