"""charges and charge_attempts

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = "'pending', 'processing', 'retrying', 'succeeded', 'failed', 'dead'"


def upgrade() -> None:
    op.create_table(
        "charges",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column(
            "metadata", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("provider_charge_id", sa.String(255)),
        sa.Column("decline_code", sa.String(64)),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_error_class", sa.String(64)),
        sa.Column("dead_reason", sa.Text()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("message_id", sa.String(64)),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint(f"status IN ({STATUSES})", name="status_known"),
        sa.CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        sa.UniqueConstraint("idempotency_key", name="uq_charges_idempotency_key"),
    )
    op.create_index(
        "ix_charges_unfinished",
        "charges",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('pending', 'processing', 'retrying')"),
    )
    op.create_table(
        "charge_attempts",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column(
            "charge_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("charges.id", ondelete="RESTRICT", name="fk_charge_attempts_charge_id"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("http_status", sa.Integer()),
        sa.Column("error_class", sa.String(64)),
        sa.Column("error_message", sa.Text()),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.UniqueConstraint("charge_id", "number", name="uq_charge_attempts_charge_id_number"),
    )


def downgrade() -> None:
    op.drop_table("charge_attempts")
    op.drop_index("ix_charges_unfinished", table_name="charges")
    op.drop_table("charges")
