"""``payq migrate``: bring the schema to the newest Alembic revision.

Several processes may run it at once (compose starts one per deploy): a
PostgreSQL advisory lock makes them take turns.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

import migrations

__all__ = ["migrate"]

_LOCK_ID = 0x70617971  # "payq"


def migrate(engine: Engine, revision: str = "head") -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
