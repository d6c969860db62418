"""``payq reconcile``: settle dead charges whose outcome is unknown, by asking the provider.

A charge whose attempt ended without an answer (timeout, reset) and that then went
dead may in fact have been charged. Each one is looked up by its idempotency key
(``GET /v1/charges?idempotency_key=``), never charged again: found and succeeded →
``succeeded`` with the provider's id; found and declined → ``failed``; not found →
it stays dead, marked "not charged at provider".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update

from payq.constants import ChargeStatus
from payq.db import transaction
from payq.errors import IdempotencyKeyInUse, ProviderError
from payq.models import charges
from payq.ops.dlq import DeadFilter, _outcome_unknown, audit, key_may_be_forgotten
from payq.provider import ProviderClient, get_provider
from payq.settings import Settings, get_settings

__all__ = ["ReconcileReport", "reconcile"]

NOT_CHARGED = "not charged at provider (reconciled)"


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
    settings = settings or get_settings()
    report = ReconcileReport()
    with transaction() as conn:
        candidates = conn.execute(
            select(
                charges.c.id,
                charges.c.idempotency_key,
                charges.c.attempts,
                key_may_be_forgotten(settings).label("too_old"),
            )
            .where(flt.where(), _outcome_unknown())
            .order_by(charges.c.updated_at)
        ).all()
    if dry_run:
        report.planned = [c.id for c in candidates]
        return report
    provider = provider or get_provider()
    for cid, key, attempts, too_old in candidates:
        if too_old:
            # A "not found" could mean the provider forgot the key, not that it never
            # charged: only a person with the provider's records can settle it.
            report.pending[cid] = (
                f"older than the provider's key retention ({settings.provider_idempotency_ttl_s}"
                " s): a lookup by key cannot prove it was not charged; check by hand"
            )
            continue
        try:
            found = provider.find_charge(key)
        except IdempotencyKeyInUse:
            report.pending[cid] = "still being processed at the provider: reconcile again later"
            continue
        except ProviderError as exc:
            report.pending[cid] = f"lookup failed ({exc.error_class}): {exc}"
            continue
        values: dict[str, Any]
        if found is not None and found.status == "succeeded":
            result, bucket = "succeeded", report.succeeded
            values = {
                "status": ChargeStatus.SUCCEEDED,
                "provider_charge_id": found.id,
                "dead_reason": None,
            }
        elif found is not None:
            result, bucket = "failed", report.failed
            values = {"status": ChargeStatus.FAILED, "provider_charge_id": found.id}
        else:
            result, bucket = "not_charged", report.not_charged
            # Still dead: its dead time (updated_at) stays what it was.
            values = {"dead_reason": func.concat(charges.c.dead_reason, f"; {NOT_CHARGED}")}
        if "status" in values:
            values["updated_at"] = func.now()
        with transaction() as conn:
            done = conn.execute(
                update(charges)
                .where(
                    charges.c.id == cid,
                    charges.c.status == ChargeStatus.DEAD,
                    charges.c.attempts == attempts,  # not replayed meanwhile
                )
                .values(reconciled_at=func.now(), **values)
            ).rowcount
            if done:
                params = {**flt.describe(), "result": result}
                audit(conn, actor=actor, action="reconcile", params=params, ids=[cid])
                bucket.append(cid)
            else:
                report.pending[cid] = "changed while it was looked up (replayed?): try again"
    return report
