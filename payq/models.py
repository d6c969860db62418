"""The schema: ``charges`` (one row per charge, the source of truth) and
``charge_attempts`` (one row per provider call). Alembic migrations create it."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.engine import RowMapping

from payq.constants import ChargeStatus, DeadOutcome

__all__ = [
    "Charge",
    "charge_attempts",
    "charges",
    "dashboard_actions",
    "metadata",
    "operator_actions",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_STATUSES = ", ".join(f"'{s.value}'" for s in ChargeStatus)
_DEAD_OUTCOMES = ", ".join(f"'{o.value}'" for o in DeadOutcome)
_NOT_FINAL = "status IN ('pending', 'processing', 'retrying')"

charges = Table(
    "charges",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("source", String(255), nullable=False),
    Column("description", Text),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("provider_charge_id", String(255)),
    Column("decline_code", String(64)),
    Column("last_error", Text),
    Column("last_error_class", String(64)),
    Column("dead_reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The Redis id of the last message published for this charge, chosen before the
    # publish so that the relay can tell a queued message from a lost one.
    Column("message_id", String(64)),
    Column("published_at", DateTime(timezone=True)),
    # Attempts made before the last operator replay: each replay gets a fresh budget.
    Column("retry_base", Integer, nullable=False, server_default=text("0")),
    # Out of the dead-letter view (never deleted): who and when.
    Column("purged_at", DateTime(timezone=True)),
    Column("purged_by", String(255)),
    # A dead charge whose outcome was unknown, looked up at the provider.
    Column("reconciled_at", DateTime(timezone=True)),
    # The call that holds the claim: a record from any other call is fenced from moving
    # the charge (its answer still settles it: ``payq.ledger``).
    Column("call_id", UUID(as_uuid=True)),
    # For a dead charge: what the provider is known to have done (``DeadOutcome``).
    Column("dead_outcome", String(24)),
    # For a dead charge of unknown outcome: when the sweep looks it up next.
    Column("next_lookup_at", DateTime(timezone=True)),
    # The web app whose intake token made it (None: enqueued from Python).
    Column("app", String(32)),
    # The ledger group the charge is pinned to: the one its last request went to, until
    # that group is proven not to have charged it (None: sent nowhere, or proven).
    Column("ledger_group", String(32)),
    # The endpoint whose answer (or lookup) said charged or declined.
    Column("charged_endpoint", String(32)),
    # The worker process that made the last claim (``payq.liveness``: host, pid and a
    # start nonce), if it was beating then: known dead, its claim ends at once.
    Column("holder", String(128)),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint(f"status IN ({_STATUSES})", name="status_known"),
    CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    CheckConstraint(
        f"dead_outcome IS NULL OR dead_outcome IN ({_DEAD_OUTCOMES})", name="dead_outcome_known"
    ),
    # The relay scans only charges that are not final.
    Index("ix_charges_unfinished", "status", "updated_at", postgresql_where=text(_NOT_FINAL)),
    Index(
        "ix_charges_dead",
        "updated_at",
        postgresql_where=text("status = 'dead' AND purged_at IS NULL"),
    ),
    # The sweep's work: dead charges whose outcome is unknown.
    Index(
        "ix_charges_unknown_outcome",
        "next_lookup_at",
        postgresql_where=text("status = 'dead' AND dead_outcome = 'unknown'"),
    ),
)

charge_attempts = Table(
    "charge_attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "charge_id",
        UUID(as_uuid=True),
        ForeignKey("charges.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    # The charge's attempt count when this call was made. Not unique: a claim lost in a
    # database crash is made again under the same number, and both calls are recorded.
    Column("number", Integer, nullable=False),
    # One provider request, drawn by the claim (a lookup draws its own).
    Column("call_id", UUID(as_uuid=True), nullable=False, server_default=func.gen_random_uuid()),
    Column("kind", String(8), nullable=False, server_default=text("'charge'")),  # AttemptKind
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),  # None while in flight
    Column("outcome", String(32), nullable=False),  # AttemptOutcome
    Column("http_status", Integer),
    Column("error_class", String(64)),
    Column("error_message", Text),
    # The provider's answer as it came, cut to ``ANSWER_LIMIT``, when it was not a plain
    # charge object: what an operator needs to read an odd answer.
    Column("answer", Text),
    Column("latency_ms", Integer),
    # Where the request went (None: before there were several endpoints).
    Column("endpoint", String(32)),
    Column("ledger_group", String(32)),
    UniqueConstraint("call_id", name="uq_charge_attempts_call_id"),
    Index("ix_charge_attempts_charge_id", "charge_id", "number"),
    # Status and health read the last 5 and 60 minutes by when calls started: a column the
    # record does not change, so completing a call's row is a HOT update (no index write;
    # the table leaves room on its pages for it).
    Index("ix_charge_attempts_started_at", "started_at"),
    postgresql_with={"fillfactor": 80},
)


operator_actions = Table(
    "operator_actions",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", String(255), nullable=False),
    Column("action", String(32), nullable=False),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("charge_ids", ARRAY(UUID(as_uuid=True)), nullable=False),
    Column("count", Integer, nullable=False),
)


#: The dashboard's confirmation tokens (``payq.ops.dashboard.actions``), by digest: each for one
#: action on one filter in one session, used once, so that no reload or resubmission, nor
#: a token from elsewhere, can replay or purge twice.
dashboard_actions = Table(
    "dashboard_actions",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("action", String(32), nullable=False),
    Column("filter_digest", String(64), nullable=False),
    Column("session_digest", String(64), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", String(255)),
    Column("started_at", DateTime(timezone=True)),  # None until used
    Column("finished_at", DateTime(timezone=True)),
    Column("result", JSONB),
)


@dataclass(frozen=True, slots=True)
class Charge:
    """A read-only view of one charge row, as producers and operators see it."""

    id: uuid.UUID
    idempotency_key: str
    amount: int
    currency: str
    source: str
    description: str | None
    metadata: dict[str, Any]
    status: ChargeStatus
    attempts: int
    next_attempt_at: dt.datetime | None
    lease_expires_at: dt.datetime | None
    provider_charge_id: str | None
    decline_code: str | None
    last_error: str | None
    last_error_class: str | None
    dead_reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    message_id: str | None
    published_at: dt.datetime | None
    retry_base: int
    purged_at: dt.datetime | None
    purged_by: str | None
    reconciled_at: dt.datetime | None
    call_id: uuid.UUID | None
    dead_outcome: DeadOutcome | None
    next_lookup_at: dt.datetime | None
    app: str | None
    ledger_group: str | None
    charged_endpoint: str | None
    holder: str | None

    def __repr__(self) -> str:
        """The payment token is masked: a repr ends up in logs and tracebacks."""
        fields = ", ".join(
            f"{name}={'***' if name == 'source' else repr(getattr(self, name))}"
            for name in ("id", "status", "amount", "currency", "source", "attempts")
        )
        return f"Charge({fields})"

    @classmethod
    def from_row(cls, row: RowMapping) -> Charge:
        values = {name: row[name] for name in cls.__slots__}
        values["status"] = ChargeStatus(values["status"])
        if values["dead_outcome"] is not None:
            values["dead_outcome"] = DeadOutcome(values["dead_outcome"])
        return cls(**values)
