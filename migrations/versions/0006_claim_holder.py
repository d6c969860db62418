"""the worker process that holds a charge's claim, so that a dead one's charges are
taken over at once (payq.liveness)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: PostgreSQL adds it without rewriting a row.
    op.add_column("charges", sa.Column("holder", sa.String(128)))


def downgrade() -> None:
    op.drop_column("charges", "holder")
