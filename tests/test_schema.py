"""The migrations build exactly the schema the code describes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from payq.db import get_engine
from payq.models import metadata


def test_models_and_migrations_agree(database: str) -> None:
    with get_engine().connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []
