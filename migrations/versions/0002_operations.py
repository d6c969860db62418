"""dead-letter operations: purge marks, reconciliation, replay budget, audit table

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "charges", sa.Column("retry_base", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("charges", sa.Column("purged_at", sa.DateTime(timezone=True)))
    op.add_column("charges", sa.Column("purged_by", sa.String(255)))
    op.add_column("charges", sa.Column("reconciled_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_charges_dead",
        "charges",
        ["updated_at"],
        postgresql_where=sa.text("status = 'dead' AND purged_at IS NULL"),
    )
    # status and health read the last 5 and 60 minutes of attempts.
    op.create_index("ix_charge_attempts_finished_at", "charge_attempts", ["finished_at"])
    op.create_table(
        "operator_actions",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column(
            "params", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("charge_ids", postgresql.ARRAY(postgresql.UUID(as_uuid=True)), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("operator_actions")
    op.drop_index("ix_charge_attempts_finished_at", table_name="charge_attempts")
    op.drop_index("ix_charges_dead", table_name="charges")
    for column in ("reconciled_at", "purged_by", "purged_at", "retry_base"):
        op.drop_column("charges", column)
