"""``payq reconcile``: settle dead charges whose outcome is unknown, by asking the provider now.

The relay's sweep does the same on its own, at a bounded pace (``payq.sweep``); an
operator runs this to ask at once, for the charges a filter names. Each one is looked up
by its idempotency key (``GET /v1/charges?idempotency_key=``), never charged again:
found and succeeded → ``succeeded`` with the provider's id; found and declined →
``failed``; not found → it stays dead, marked verified not charged. Every lookup is
recorded with the charge, every change audited. The search for candidates reads where
``payq.reads`` says (a replica may be a moment behind: each settlement reads the charge
again on the primary, locked, and leaves one settled meanwhile as it is).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import select

from payq.constants import ChargeStatus, DeadOutcome
from payq.db import transaction
from payq.ledger import audit
from payq.models import charges
from payq.ops.dlq import DeadFilter, key_may_be_forgotten
from payq.provider import ProviderClient
from payq.reads import read_engine
from payq.settings import Settings, get_settings
from payq.sweep import resolve

__all__ = ["ReconcileReport", "reconcile"]


@dataclass
class ReconcileReport:
    succeeded: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    not_charged: list[uuid.UUID] = field(default_factory=list)
    pending: dict[uuid.UUID, str] = field(default_factory=dict)  # ask again later
    planned: list[uuid.UUID] = field(default_factory=list)  # --dry-run

    @property
    def settled(self) -> list[uuid.UUID]:
        return [*self.succeeded, *self.failed, *self.not_charged]


def reconcile(
    flt: DeadFilter,
    *,
    actor: str,
    dry_run: bool = False,
    provider: ProviderClient | None = None,
    settings: Settings | None = None,
) -> ReconcileReport:
    """Look up every dead charge of unknown outcome that ``flt`` names.

    ``actor`` is the operator: the run is audited under their name, each change the
    answer makes under payq's own (``payq.ledger``), with the lookup as its reason.
    """
    settings = settings or get_settings()
    report = ReconcileReport()
    with transaction(read_engine()) as conn:
        candidates = conn.execute(
            select(
                charges.c.id,
                charges.c.idempotency_key,
                charges.c.attempts,
                key_may_be_forgotten(settings).label("too_old"),
            )
            .where(flt.where(), charges.c.dead_outcome == DeadOutcome.UNKNOWN)
            .order_by(charges.c.updated_at)
        ).all()
    if dry_run:
        report.planned = [c.id for c in candidates]
        return report
    for cid, key, attempts, too_old in candidates:
        if too_old:
            # A "not found" could mean the provider forgot the key, not that it never
            # charged: only a person with the provider's records can settle it.
            report.pending[cid] = (
                f"older than the provider's key retention ({settings.provider_idempotency_ttl_s}"
                " s): a lookup by key cannot prove it was not charged; check by hand"
            )
            continue
        resolution = resolve(cid, key, attempts, provider)
        if resolution is None:
            report.pending[cid] = (
                "not looked up: the circuit breaker is open or every fleet slot is in use; "
                "reconcile again later"
            )
        elif resolution.result == "settled":
            succeeded = resolution.settled_as is ChargeStatus.SUCCEEDED
            (report.succeeded if succeeded else report.failed).append(cid)
        elif resolution.result == "verified":
            report.not_charged.append(cid)
        elif resolution.result == "unknown":
            report.pending[cid] = f"{resolution.detail}: reconcile again later"
        else:
            report.pending[cid] = f"{resolution.detail}: try again"
    if report.settled:
        with transaction() as conn:
            params = {
                **flt.describe(),
                "succeeded": len(report.succeeded),
                "failed": len(report.failed),
                "not_charged": len(report.not_charged),
            }
            audit(conn, actor=actor, action="reconcile", params=params, ids=report.settled)
    return report
