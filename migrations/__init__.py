"""Alembic migrations for payq's schema. Run them with ``payq migrate``."""
