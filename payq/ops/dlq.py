"""Dead-letter draining: the functions behind ``payq dlq`` (and, later, the dashboard).

Dead charges live in PostgreSQL and never expire. Operators list, inspect, replay
(same idempotency key, bounded rate), purge (out of the view, never deleted) and
export them; every replay, purge and reconciliation is written to
``operator_actions``. Listing, showing and exporting read where ``payq.reads`` says (a
replica when one is configured and close enough behind); replay and purge, which write
and must see what they change, read and write the primary.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Select, and_, func, select, update
from sqlalchemy.sql.elements import ColumnElement

from payq.broker import new_message_id, publish_or_leave_to_relay
from payq.constants import ChargeStatus, DeadOutcome
from payq.db import transaction
from payq.errors import ChargeNotFound
from payq.ledger import NOT_DEAD, audit, key_forgotten, retention
from payq.models import Charge, charge_attempts, charges
from payq.reads import read_engine
from payq.settings import Settings, get_settings

__all__ = [
    "DeadCharge",
    "DeadFilter",
    "ReplayReport",
    "dead_charges",
    "iter_dead_charges",
    "key_may_be_forgotten",
    "purge",
    "replay",
    "show",
    "totals",
]


@dataclass(frozen=True, kw_only=True)
class DeadFilter:
    """Which dead charges an operator means. Empty means every one in the view."""

    ids: Sequence[uuid.UUID] = ()
    reason: str | None = None  # a substring of the dead reason, any case
    error_class: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    min_amount: int | None = None
    max_amount: int | None = None
    currency: str | None = None
    include_purged: bool = False
    outcome: DeadOutcome | None = None  # what the provider is known to have done

    def is_empty(self) -> bool:
        return self == DeadFilter(include_purged=self.include_purged)

    def describe(self) -> dict[str, Any]:
        """The filter as plain JSON, for the audit table."""
        out: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if value in (None, (), [], False):
                continue
            if isinstance(value, dt.datetime):
                value = value.isoformat()
            elif name == "ids":
                value = [str(v) for v in value]
            out[name] = value
        return out

    def where(self) -> ColumnElement[bool]:
        c = charges.c
        clauses: list[ColumnElement[bool]] = [c.status == ChargeStatus.DEAD]
        if not self.include_purged:
            clauses.append(c.purged_at.is_(None))
        if self.ids:
            clauses.append(c.id.in_(list(self.ids)))
        if self.reason:
            clauses.append(c.dead_reason.ilike(f"%{_escape_like(self.reason)}%", escape="\\"))
        if self.error_class:
            clauses.append(c.last_error_class == self.error_class)
        if self.since:
            clauses.append(c.updated_at >= self.since)
        if self.until:
            clauses.append(c.updated_at < self.until)
        if self.min_amount is not None:
            clauses.append(c.amount >= self.min_amount)
        if self.max_amount is not None:
            clauses.append(c.amount <= self.max_amount)
        if self.currency:
            clauses.append(c.currency == self.currency.lower())
        if self.outcome:
            clauses.append(c.dead_outcome == self.outcome)
        return and_(*clauses)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class DeadCharge:
    charge: Charge

    @property
    def outcome_unknown(self) -> bool:
        """Nobody could tell yet whether the provider charged it: the sweep asks again."""
        return self.charge.dead_outcome is DeadOutcome.UNKNOWN

    @property
    def verified(self) -> bool:
        """A lookup by key proved the provider did not charge it."""
        return self.charge.dead_outcome is DeadOutcome.VERIFIED_NOT_CHARGED

    def as_dict(self) -> dict[str, Any]:
        c = self.charge
        return {
            "id": str(c.id),
            "idempotency_key": c.idempotency_key,
            "amount": c.amount,
            "currency": c.currency,
            "description": c.description,
            "metadata": c.metadata,
            "attempts": c.attempts,
            "dead_reason": c.dead_reason,
            "last_error_class": c.last_error_class,
            "last_error": c.last_error,
            "dead_outcome": c.dead_outcome.value if c.dead_outcome else None,
            "outcome_unknown": self.outcome_unknown,
            "created_at": c.created_at.isoformat(),
            "dead_at": c.updated_at.isoformat(),
            "purged_at": c.purged_at.isoformat() if c.purged_at else None,
            "purged_by": c.purged_by,
            "reconciled_at": c.reconciled_at.isoformat() if c.reconciled_at else None,
        }


def _dead_select(flt: DeadFilter) -> Select[Any]:
    return select(charges).where(flt.where()).order_by(charges.c.updated_at, charges.c.id)


def dead_charges(flt: DeadFilter, limit: int | None = None) -> list[DeadCharge]:
    return _fetch(_dead_select(flt).limit(limit))


def iter_dead_charges(flt: DeadFilter, batch: int = 1000) -> Iterator[DeadCharge]:
    """Every matching dead charge, a batch at a time (for exports of any size)."""
    after: tuple[dt.datetime, uuid.UUID] | None = None
    engine = read_engine()  # one source for the whole export, not one per batch
    while True:
        query = _dead_select(flt).limit(batch)
        if after is not None:
            query = query.where(
                (charges.c.updated_at > after[0])
                | and_(charges.c.updated_at == after[0], charges.c.id > after[1])
            )
        page = _fetch(query, engine)
        if not page:
            return
        yield from page
        last = page[-1].charge
        after = (last.updated_at, last.id)


def _fetch(query: Select[Any], engine: Engine | None = None) -> list[DeadCharge]:
    with transaction(engine or read_engine()) as conn:
        rows = conn.execute(query).mappings().all()
    return [DeadCharge(Charge.from_row(r)) for r in rows]


def totals(flt: DeadFilter, engine: Engine | None = None) -> dict[str, tuple[int, int]]:
    """Count and total amount (minor units) by currency (read where ``payq.reads`` says,
    unless ``engine`` is given)."""
    with transaction(engine or read_engine()) as conn:
        rows = conn.execute(
            select(charges.c.currency, func.count(), func.sum(charges.c.amount))
            .where(flt.where())
            .group_by(charges.c.currency)
            .order_by(charges.c.currency)
        ).all()
    return {currency: (int(n), int(total)) for currency, n, total in rows}


def show(charge_id: uuid.UUID) -> tuple[DeadCharge, list[dict[str, Any]]]:
    """One charge (dead or not) with every attempt, oldest first."""
    with transaction(read_engine()) as conn:
        row = conn.execute(select(charges).where(charges.c.id == charge_id)).mappings().first()
        if row is None:
            raise ChargeNotFound(str(charge_id))
        history = conn.execute(
            select(charge_attempts)
            .where(charge_attempts.c.charge_id == charge_id)
            .order_by(charge_attempts.c.started_at, charge_attempts.c.id)
        ).mappings()
        attempts = [dict(a) for a in history]
    return DeadCharge(Charge.from_row(row)), attempts


@dataclass
class ReplayReport:
    replayed: list[uuid.UUID] = field(default_factory=list)
    skipped: dict[uuid.UUID, str] = field(default_factory=dict)
    planned: list[uuid.UUID] = field(default_factory=list)  # --dry-run


def replay(
    flt: DeadFilter,
    *,
    actor: str,
    dry_run: bool = False,
    rate_per_s: float = 50.0,
    settings: Settings | None = None,
    progress: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Put dead charges back to ``pending`` with the same key, ``rate_per_s`` at most.

    A charge the provider may have seen more than ``PROVIDER_IDEMPOTENCY_TTL_S`` ago is
    not replayed (the provider may have forgotten its key): reconcile it instead.
    """
    settings = settings or get_settings()
    report = ReplayReport()
    too_old = key_may_be_forgotten(settings)
    batch = max(1, int(rate_per_s))
    period_s = batch / rate_per_s  # one batch per period: at most rate_per_s a second
    why_not = (
        "the provider may have forgotten its idempotency key (older than "
        f"{settings.provider_idempotency_ttl_s} s): sending it again could charge twice; "
        "check it at the provider by hand"
    )
    if dry_run:
        with transaction() as conn:
            for cid, old in conn.execute(
                select(charges.c.id, too_old).where(flt.where()).order_by(charges.c.updated_at)
            ):
                if old:
                    report.skipped[cid] = why_not
                else:
                    report.planned.append(cid)
        return report
    skipped: set[uuid.UUID] = set()
    while True:
        started = time.monotonic()
        with transaction() as conn:
            query = select(charges.c.id, too_old.label("too_old")).where(flt.where())
            if skipped:  # they stay dead: do not pick them again (replayed ones are not dead)
                query = query.where(charges.c.id.not_in(skipped))
            rows = conn.execute(
                query.order_by(charges.c.updated_at, charges.c.id)
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                break
            for r in rows:
                if r.too_old:
                    skipped.add(r.id)
                    report.skipped[r.id] = why_not
            fresh = {r.id: new_message_id() for r in rows if not r.too_old}
            for cid, message_id in fresh.items():
                conn.execute(
                    update(charges)
                    .where(charges.c.id == cid, charges.c.status == ChargeStatus.DEAD)
                    .values(
                        status=ChargeStatus.PENDING,
                        retry_base=charges.c.attempts,
                        **NOT_DEAD,
                        next_attempt_at=None,
                        lease_expires_at=None,
                        # A replayed charge starts afresh: back in view if it dies again.
                        reconciled_at=None,
                        purged_at=None,
                        purged_by=None,
                        message_id=message_id,
                        published_at=func.now(),
                        updated_at=func.now(),
                    )
                )
            if fresh:
                audit(conn, actor=actor, action="replay", params=flt.describe(), ids=list(fresh))
        publish_or_leave_to_relay(fresh.items())
        report.replayed.extend(fresh)
        if progress:
            progress(report)
        if len(rows) == batch:
            time.sleep(max(0.0, period_s - (time.monotonic() - started)))
    return report


def key_may_be_forgotten(settings: Settings) -> ColumnElement[bool]:
    """The provider may have seen this charge's key longer ago than it keeps keys."""
    return and_(charges.c.attempts > 0, key_forgotten(retention(settings)))


def purge(flt: DeadFilter, *, actor: str, dry_run: bool = False) -> list[uuid.UUID]:
    """Take dead charges out of the dead-letter view (never deleted); return their ids."""
    with transaction() as conn:
        if dry_run:
            return list(conn.execute(select(charges.c.id).where(flt.where())).scalars())
        ids = list(
            conn.execute(
                update(charges)
                .where(flt.where(), charges.c.purged_at.is_(None))
                .values(purged_at=func.now(), purged_by=actor)
                .returning(charges.c.id)
            ).scalars()
        )
        if ids:
            audit(conn, actor=actor, action="purge", params=flt.describe(), ids=ids)
    return ids
