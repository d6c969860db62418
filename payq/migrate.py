"""``payq migrate``: bring the schema to the newest Alembic revision.

Several processes may run it at once (compose starts one per deploy): a
PostgreSQL advisory lock makes them take turns. The lock is transaction-scoped
(``pg_advisory_xact_lock``) and the whole upgrade is one transaction, so it holds
through a pooler in transaction mode too; ``DATABASE_DIRECT_URL`` points it at
PostgreSQL itself all the same, where a pooler does not route the ``postgres``
maintenance database that ``ensure_database`` creates the database from.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.sql
import tenacity
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

import migrations
from payq.errors import ConfigError

__all__ = ["conn_params", "connect", "ensure_database", "ensure_database_when_up", "migrate"]

log = logging.getLogger("payq.migrate")

_LOCK_ID = 0x70617971  # "payq"


def ensure_database_when_up(
    dsn: str, wait_s: float = 30.0, *, setting: str = "DATABASE_URL"
) -> bool:
    """Create the database if needed, waiting up to ``wait_s`` for PostgreSQL to answer.

    A deploy often starts ``payq migrate`` beside a PostgreSQL that is still starting;
    short retries (tenacity) ride that out. A server that answers and refuses (an
    unknown user, a wrong password, pg_hba.conf) is no wait: it is said at once, naming
    ``setting`` (the variable ``dsn`` came from). Returns True if the database was created.
    """
    from payq.errors import ServiceUnavailable

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2),
        retry=tenacity.retry_if_exception(_not_answering),
        before_sleep=lambda state: log.warning(
            "PostgreSQL does not answer yet (attempt %d); retrying", state.attempt_number
        ),
        reraise=True,
    )
    try:
        return bool(retrying(ensure_database, dsn))
    except psycopg2.OperationalError as exc:
        said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not _not_answering(exc):
            raise ConfigError(
                f"PostgreSQL at {setting} answered and refused the connection ({said}): fix "
                f"{setting} (its user, password or host), or the server's roles or pg_hba.conf"
            ) from None
        raise ServiceUnavailable(
            f"PostgreSQL did not answer at {setting} within {wait_s:g} s "
            f"({said}): start it or fix {setting}"
        ) from None


# What a server says when it answered and refused (libpq's and PostgreSQL's own words).
_REFUSALS = ("does not exist", "password authentication failed", "pg_hba.conf", "no password")


def _not_answering(exc: BaseException) -> bool:
    """A connection error worth waiting out: PostgreSQL down or starting, not refusing."""
    if not isinstance(exc, psycopg2.OperationalError):
        return False
    lowered = str(exc).lower()
    return not any(refusal in lowered for refusal in _REFUSALS)


def conn_params(dsn: str) -> dict[str, str]:
    """libpq keyword parameters for a SQLAlchemy (``postgresql+psycopg2://``) or libpq URL."""
    libpq = re.sub(r"^postgres(?:ql)?(?:\+[\w-]+)?://", "postgresql://", dsn)
    try:
        params: dict[str, str] = dict(psycopg2.extensions.parse_dsn(libpq))
    except psycopg2.ProgrammingError:
        raise ConfigError(
            "DATABASE_URL: is not a PostgreSQL URL (postgresql://user@host:port/database)"
        ) from None
    return params


def connect(params: dict[str, str], timeout_s: float, **overrides: str) -> Any:
    """A plain psycopg2 connection (``overrides``: other libpq parameters, e.g. dbname)."""
    # libpq's connect_timeout is whole seconds and anything below 2 is raised to 2.
    kwargs: dict[str, Any] = {
        **params,
        **overrides,
        "connect_timeout": max(2, math.ceil(timeout_s)),
    }
    return psycopg2.connect(**kwargs)


def ensure_database(dsn: str) -> bool:
    """Create the database named in ``dsn`` if it is missing; True if this call created it.

    Connects to the ``postgres`` maintenance database of the same server in AUTOCOMMIT
    (CREATE DATABASE cannot run in a transaction); the name is quoted with
    ``psycopg2.sql.Identifier``. Safe against a concurrent creator.
    """
    params = conn_params(dsn)
    name = params.get("dbname")
    if not name:
        raise ConfigError("DATABASE_URL: names no database (…/database at its end)")
    conn = connect(params, 10.0, dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is not None:
                return False
            try:
                cur.execute(
                    psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(name))
                )
            except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                return False  # somebody else created it between our check and CREATE
            return True
    finally:
        conn.close()


def migrate(engine: Engine, revision: str = "head") -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
