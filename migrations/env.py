"""Alembic environment: runs on the connection ``payq migrate`` hands it."""

from alembic import context

from payq.models import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
