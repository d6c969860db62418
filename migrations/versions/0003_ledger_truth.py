"""ledger truth: one row per provider call, dead charges say what the provider did

Every provider call has its own attempt row, keyed by a call id the claim draws (the
attempt number alone repeats when a claim is lost in a crash), written before the call
and completed after it; lookups by key are rows too. A dead charge records whether the
provider is known not to have charged it, and when the sweep looks it up next.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DEAD_OUTCOMES = "'not_charged', 'verified_not_charged', 'unknown'"


def upgrade() -> None:
    op.add_column("charges", sa.Column("call_id", postgresql.UUID(as_uuid=True)))
    op.add_column("charges", sa.Column("dead_outcome", sa.String(24)))
    op.add_column("charges", sa.Column("next_lookup_at", sa.DateTime(timezone=True)))
    op.create_check_constraint(
        op.f("ck_charges_dead_outcome_known"),
        "charges",
        f"dead_outcome IS NULL OR dead_outcome IN ({DEAD_OUTCOMES})",
    )
    op.create_index(
        "ix_charges_unknown_outcome",
        "charges",
        ["next_lookup_at"],
        postgresql_where=sa.text("status = 'dead' AND dead_outcome = 'unknown'"),
    )

    op.add_column(
        "charge_attempts",
        sa.Column(
            "call_id",
            postgresql.UUID(as_uuid=True),
            nullable=False,
            server_default=sa.text("gen_random_uuid()"),
        ),
    )
    op.add_column(
        "charge_attempts",
        sa.Column("kind", sa.String(8), nullable=False, server_default="charge"),
    )
    op.add_column("charge_attempts", sa.Column("answer", sa.Text()))
    op.alter_column("charge_attempts", "finished_at", nullable=True)
    op.alter_column("charge_attempts", "latency_ms", nullable=True)
    op.drop_constraint("uq_charge_attempts_charge_id_number", "charge_attempts", type_="unique")
    op.create_unique_constraint("uq_charge_attempts_call_id", "charge_attempts", ["call_id"])
    op.create_index("ix_charge_attempts_charge_id", "charge_attempts", ["charge_id", "number"])
    # A call's row is written before the call and completed after it: indexed only on
    # columns the completion leaves alone, with room on each page, that is a HOT update.
    op.drop_index("ix_charge_attempts_finished_at", table_name="charge_attempts")
    op.create_index("ix_charge_attempts_started_at", "charge_attempts", ["started_at"])
    op.execute("ALTER TABLE charge_attempts SET (fillfactor = 80)")
    # 5xx, 409 in use and odd answers were "no_charge": they do not say whether it was.
    op.execute(
        "UPDATE charge_attempts SET outcome = 'unclear' "
        "WHERE outcome = 'no_charge' AND error_class IS DISTINCT FROM 'rate_limited'"
    )
    op.execute(
        """
        UPDATE charges c SET dead_outcome = CASE
            WHEN c.reconciled_at IS NOT NULL THEN 'verified_not_charged'
            WHEN EXISTS (
                SELECT 1 FROM charge_attempts a
                WHERE a.charge_id = c.id AND a.outcome IN ('no_answer', 'unclear')
            ) THEN 'unknown'
            ELSE 'not_charged' END
        WHERE c.status = 'dead'
        """
    )
    # Those of unknown outcome are the sweep's to look up, from now.
    op.execute("UPDATE charges SET next_lookup_at = now() WHERE dead_outcome = 'unknown'")


def downgrade() -> None:
    op.execute("ALTER TABLE charge_attempts RESET (fillfactor)")
    op.drop_index("ix_charge_attempts_started_at", table_name="charge_attempts")
    op.create_index("ix_charge_attempts_finished_at", "charge_attempts", ["finished_at"])
    op.execute("UPDATE charge_attempts SET outcome = 'no_charge' WHERE outcome = 'unclear'")
    op.execute("DELETE FROM charge_attempts WHERE kind = 'lookup'")
    op.drop_index("ix_charge_attempts_charge_id", table_name="charge_attempts")
    op.drop_constraint("uq_charge_attempts_call_id", "charge_attempts", type_="unique")
    # Fails if a lost claim left two calls under one number: they were both real calls.
    op.create_unique_constraint(
        "uq_charge_attempts_charge_id_number", "charge_attempts", ["charge_id", "number"]
    )
    op.execute("UPDATE charge_attempts SET finished_at = started_at WHERE finished_at IS NULL")
    op.execute("UPDATE charge_attempts SET latency_ms = 0 WHERE latency_ms IS NULL")
    op.alter_column("charge_attempts", "latency_ms", nullable=False)
    op.alter_column("charge_attempts", "finished_at", nullable=False)
    for column in ("answer", "kind", "call_id"):
        op.drop_column("charge_attempts", column)
    op.drop_index("ix_charges_unknown_outcome", table_name="charges")
    op.drop_constraint("ck_charges_dead_outcome_known", "charges", type_="check")
    for column in ("next_lookup_at", "dead_outcome", "call_id"):
        op.drop_column("charges", column)
