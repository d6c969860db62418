"""What a pooler in transaction mode (PgBouncer) in front of PostgreSQL allows.

Behind such a pooler (``DATABASE_POOLER=transaction``) a worker group's pools are the
pooler's clients, not PostgreSQL's: however many there are, the pooler opens at most
its server pool for payq's database (``pool_size`` + ``reserve_pool``, capped by
``max_db_connections``). That pool is what must fit in PostgreSQL's
``max_connections``, and the group's connections must fit in the pooler's
``max_client_conn``. ``payq worker`` checks both at start (``payq.capacity``). The pool
is PgBouncer's per database and user: other users of the same database have pools of
their own, which only ``max_db_connections`` caps together.

The numbers come from PgBouncer's admin console (the ``pgbouncer`` database at the
pooler's address, as DATABASE_URL's user, which must be in PgBouncer's ``stats_users``
or ``admin_users``), or, where that is closed, from
``DATABASE_POOLER_SERVER_CONNECTIONS`` (the client limit is then not checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from payq.errors import ConfigError

__all__ = ["PoolerBudget", "read_pooler_budget"]

# The states of a server connection in SHOW POOLS: all of them are open on the server.
_SERVER_STATES = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
_CLIENT_STATES = ("cl_active", "cl_waiting")


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolerBudget:
    """The pooler's server pool for payq's database, and its clients, at one moment."""

    server_connections: int  # the most server connections it opens for the database
    server_open: int  # of those, open now (PostgreSQL counts them as already open)
    source: str  # where server_connections was read: shown to the operator
    max_client_conn: int | None = None  # None: unknown (given by setting)
    clients_open: int | None = None  # client connections it has now, the console's excluded

    @property
    def server_more(self) -> int:
        """Server connections the pooler may still open."""
        return max(0, self.server_connections - self.server_open)

    @property
    def clients_available(self) -> int | None:
        if self.max_client_conn is None or self.clients_open is None:
            return None
        return self.max_client_conn - self.clients_open


def read_pooler_budget(
    database_url: str, *, server_connections: int, connect_timeout_s: int
) -> PoolerBudget:
    """``server_connections`` if given (DATABASE_POOLER_SERVER_CONNECTIONS), else the
    pooler's own numbers from its admin console; ``ConfigError`` if neither."""
    if server_connections:
        return PoolerBudget(
            server_connections=server_connections,
            server_open=0,
            source="DATABASE_POOLER_SERVER_CONNECTIONS",
        )
    import psycopg2

    from payq.migrate import conn_params, connect

    params = conn_params(database_url)
    database = params.get("dbname", "")
    try:
        console = connect(params, connect_timeout_s, dbname="pgbouncer")
    except psycopg2.Error as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"DATABASE_POOLER_SERVER_CONNECTIONS: is 0, so payq asks the pooler's admin "
            f"console for its server pool, which refused ({reason}): add DATABASE_URL's user "
            "to PgBouncer's stats_users, or set DATABASE_POOLER_SERVER_CONNECTIONS to the "
            "server connections the pooler may open for payq's database"
        ) from None
    try:
        console.autocommit = True  # the console knows no transactions
        return _from_console(console, database)
    finally:
        console.close()


def _show(console: Any, what: str) -> list[dict[str, Any]]:
    with console.cursor() as cur:
        cur.execute(f"SHOW {what}")
        names = [col.name for col in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _from_console(console: Any, database: str) -> PoolerBudget:
    entry = next((row for row in _show(console, "DATABASES") if row["name"] == database), None)
    if entry is None:
        raise ConfigError(
            f"the pooler at DATABASE_URL lists no database {database!r} (SHOW DATABASES): "
            "add it to PgBouncer's [databases], or fix DATABASE_URL"
        )
    pool = int(entry["pool_size"]) + int(entry["reserve_pool"] or 0)
    if int(entry["max_connections"] or 0) > 0:  # max_db_connections
        pool = min(pool, int(entry["max_connections"]))
    pools = _show(console, "POOLS")
    config = {row["key"]: row["value"] for row in _show(console, "CONFIG")}
    return PoolerBudget(
        server_connections=pool,
        server_open=sum(
            int(row[state])
            for row in pools
            if row["database"] == database
            for state in _SERVER_STATES
        ),
        source="the pooler's SHOW DATABASES",
        max_client_conn=int(config["max_client_conn"]),
        clients_open=sum(
            int(row[state])
            for row in pools
            if row["database"] != "pgbouncer"
            for state in _CLIENT_STATES
        ),
    )
