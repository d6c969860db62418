"""several provider endpoints: where each request went, the ledger group a charge is
pinned to, and the endpoint that charged it

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: PostgreSQL adds them without rewriting a row.
    op.add_column("charges", sa.Column("ledger_group", sa.String(32)))
    op.add_column("charges", sa.Column("charged_endpoint", sa.String(32)))
    op.add_column("charge_attempts", sa.Column("endpoint", sa.String(32)))
    op.add_column("charge_attempts", sa.Column("ledger_group", sa.String(32)))


def downgrade() -> None:
    op.drop_column("charge_attempts", "ledger_group")
    op.drop_column("charge_attempts", "endpoint")
    op.drop_column("charges", "charged_endpoint")
    op.drop_column("charges", "ledger_group")
