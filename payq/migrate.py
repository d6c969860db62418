"""``payq migrate``: bring the schema to the newest Alembic revision.

Several processes may run it at once (compose starts one per deploy): a
PostgreSQL advisory lock makes them take turns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg2
import tenacity
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

import migrations

__all__ = ["ensure_database_when_up", "migrate"]

log = logging.getLogger("payq.migrate")

_LOCK_ID = 0x70617971  # "payq"


def ensure_database_when_up(dsn: str, wait_s: float = 30.0) -> bool:
    """Create the database if needed, waiting up to ``wait_s`` for PostgreSQL to answer.

    A deploy often starts ``payq migrate`` beside a PostgreSQL that is still starting;
    short retries (tenacity) ride that out. Returns True if the database was created.
    """
    from payq.devservices import ensure_database
    from payq.errors import ServiceUnavailable

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2),
        retry=tenacity.retry_if_exception_type(psycopg2.OperationalError),
        before_sleep=lambda state: log.warning(
            "PostgreSQL does not answer yet (attempt %d); retrying", state.attempt_number
        ),
        reraise=True,
    )
    try:
        return bool(retrying(ensure_database, dsn))
    except psycopg2.OperationalError as exc:
        raise ServiceUnavailable(
            f"PostgreSQL did not answer at DATABASE_URL within {wait_s:g} s "
            f"({str(exc).strip().splitlines()[0][:200]}): start it or fix DATABASE_URL"
        ) from None


def migrate(engine: Engine, revision: str = "head") -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
