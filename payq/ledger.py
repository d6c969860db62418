"""The provider's books decide: what an answer says about a charge, and settling it.

payq's row is its belief; the provider's answer is the truth. An answer settles the
charge it belongs to, whoever asked and however late it came:

* a worker whose lease was taken over is fenced from *moving* the charge through its
  claim, not from telling what the provider did: its 200 or 402 settles the charge
  from ``pending``, ``processing``, ``retrying`` or ``dead`` alike;
* a charge about to go dead after an attempt with no clear answer is looked up by key
  first (``look_up``), as is every dead charge of unknown outcome (the relay's sweep,
  ``payq reconcile``).

Every such change is written to ``operator_actions`` under the actor ``payq``, with the
charge's former state and why. A settled charge (``succeeded``, ``failed``) never moves
again; an answer that disagrees with it is logged as an error for a person, never applied.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from payq.constants import (
    MAY_STILL_ARRIVE,
    SETTLED_STATUSES,
    SYSTEM_ACTOR,
    AttemptKind,
    AttemptOutcome,
    ChargeStatus,
)
from payq.errors import CardDeclined, IdempotencyKeyInUse, ProviderError
from payq.models import charge_attempts, charges, operator_actions
from payq.provider import ProviderCharge, ProviderClient
from payq.settings import Settings

__all__ = [
    "NOT_DEAD",
    "Charged",
    "Declined",
    "Lookup",
    "NotCharged",
    "Unknown",
    "Verdict",
    "audit",
    "definite",
    "key_forgotten",
    "look_up",
    "pending_calls_s",
    "record_lookup",
    "retention",
    "settle",
]

log = logging.getLogger("payq.ledger")

#: What a charge that leaves ``dead`` no longer has: its reason, outcome, next lookup.
NOT_DEAD: dict[str, Any] = {"dead_reason": None, "dead_outcome": None, "next_lookup_at": None}


@dataclass(frozen=True, slots=True)
class Charged:
    provider_charge_id: str


@dataclass(frozen=True, slots=True)
class Declined:
    provider_charge_id: str | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class NotCharged:
    """A lookup by key found no charge: the provider never charged this key."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """Nobody could tell yet (the key in use, the provider unreachable); ask again later."""

    reason: str


Verdict = Charged | Declined | NotCharged | Unknown


def retention(settings: Settings) -> dt.timedelta:
    """How long the provider keeps idempotency keys (``PROVIDER_IDEMPOTENCY_TTL_S``)."""
    return dt.timedelta(seconds=settings.provider_idempotency_ttl_s)


def key_forgotten(after: Any) -> ColumnElement[bool]:
    """The one rule of key retention: the charge was created longer ago than ``after`` (the
    retention, or the send window short of it: an interval or a bind parameter), so the
    provider may have forgotten its idempotency key. A request then could charge twice,
    and a lookup that finds nothing proves nothing."""
    forgotten: ColumnElement[bool] = charges.c.created_at < func.now() - after
    return forgotten


def definite(outcome: ProviderCharge | ProviderError | None) -> Charged | Declined | None:
    """What a charge request's answer proves the provider did, if it proves anything.

    Only a charge object (200) and a decline (402) are the provider's stored outcome.
    """
    if isinstance(outcome, ProviderCharge):
        return Charged(outcome.id)
    if isinstance(outcome, CardDeclined):
        return Declined(outcome.provider_charge_id, outcome.code or "card_declined", str(outcome))
    return None


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup by key: its verdict and what to record of the request."""

    verdict: Verdict
    outcome: AttemptOutcome
    http_status: int | None
    error_class: str | None
    started_at: dt.datetime
    latency_ms: int
    # The provider error, if the lookup itself failed (the breaker is told of it).
    error: ProviderError | None = None


def look_up(provider: ProviderClient, key: str) -> Lookup:
    """``GET /v1/charges?idempotency_key=``: what the provider did with this key.

    Never raises for a provider error: an unanswered lookup is ``Unknown``.
    """
    started_at = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    try:
        found = provider.find_charge(key)
    except IdempotencyKeyInUse as exc:
        return Lookup(
            Unknown("the key is still in use at the provider (a request with it is in flight)"),
            AttemptOutcome.UNCLEAR,
            exc.status,
            exc.error_class,
            started_at,
            _ms_since(t0),
            exc,
        )
    except ProviderError as exc:
        return Lookup(
            Unknown(f"the lookup failed ({exc.error_class})"),
            AttemptOutcome.NO_ANSWER if exc.status is None else AttemptOutcome.UNCLEAR,
            exc.status,
            exc.error_class,
            started_at,
            _ms_since(t0),
            exc,
        )
    latency_ms = _ms_since(t0)
    if found is None:
        return Lookup(NotCharged(), AttemptOutcome.NOT_FOUND, 404, None, started_at, latency_ms)
    verdict = definite(found)
    assert verdict is not None
    outcome = AttemptOutcome.SUCCEEDED if isinstance(verdict, Charged) else AttemptOutcome.DECLINED
    return Lookup(verdict, outcome, 200, None, started_at, latency_ms)


def _ms_since(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


def pending_calls_s(
    conn: Connection, charge_id: uuid.UUID, lease_s: float, but: uuid.UUID | None = None
) -> float:
    """Seconds until no earlier call of this charge can still reach the provider (0: none).

    A call that got no answer may be on its way still (``MAY_STILL_ARRIVE``): one whose
    worker never recorded it (in flight, or abandoned when the charge was claimed again:
    a worker frozen between its claim and its request), and one that timed out or was
    reset (its request may sit in a queue on the way). A worker sends only
    within its lease less the call's timeout after the claim, so such a request arrives
    by its claim (the row's ``started_at``) plus the lease. Until then a lookup that
    finds no charge proves nothing.
    """
    query = select(
        func.extract(
            "epoch",
            func.max(charge_attempts.c.started_at) + dt.timedelta(seconds=lease_s) - func.now(),
        )
    ).where(
        charge_attempts.c.charge_id == charge_id,
        charge_attempts.c.kind == AttemptKind.CHARGE,
        charge_attempts.c.outcome.in_(sorted(MAY_STILL_ARRIVE)),
    )
    if but is not None:
        query = query.where(charge_attempts.c.call_id != but)
    left = conn.execute(query).scalar()
    return max(0.0, float(left)) if left is not None else 0.0


def record_lookup(
    conn: Connection,
    charge_id: uuid.UUID,
    number: int,
    lookup: Lookup,
    endpoint: str | None = None,
    group: str | None = None,
) -> None:
    """Every request sent leaves a row: a lookup is one, of kind ``lookup``, with the
    endpoint it went to."""
    conn.execute(
        insert(charge_attempts).values(
            charge_id=charge_id,
            number=number,
            kind=AttemptKind.LOOKUP,
            endpoint=endpoint,
            ledger_group=group,
            started_at=lookup.started_at,
            finished_at=dt.datetime.now(dt.UTC),
            outcome=lookup.outcome,
            http_status=lookup.http_status,
            error_class=lookup.error_class,
            error_message=lookup.verdict.reason if isinstance(lookup.verdict, Unknown) else None,
            latency_ms=lookup.latency_ms,
        )
    )


def settle(
    conn: Connection,
    charge_id: uuid.UUID,
    verdict: Charged | Declined,
    *,
    why: str,
    looked_up: bool = False,
    endpoint: str | None = None,
) -> ChargeStatus | None:
    """Make the charge what the provider says it is, unless it already is; audited.
    ``endpoint``: the one that answered (``charges.charged_endpoint``).

    Runs in the caller's transaction. Returns the status the charge came from, or
    ``None`` if it was already settled (then an answer that disagrees is logged).
    """
    row = conn.execute(
        select(charges.c.status, charges.c.provider_charge_id, charges.c.decline_code)
        .where(charges.c.id == charge_id)
        .with_for_update()
    ).first()
    if row is None:
        return None
    was = ChargeStatus(row.status)
    if was in SETTLED_STATUSES:
        _check_agrees(charge_id, was, row.provider_charge_id, verdict)
        return None
    to, values = _settled_values(verdict)
    now = dt.datetime.now(dt.UTC)
    conn.execute(
        update(charges)
        .where(charges.c.id == charge_id)
        .values(
            status=to,
            **NOT_DEAD,
            next_attempt_at=None,
            lease_expires_at=None,
            updated_at=now,
            **({"reconciled_at": now} if looked_up else {}),
            **({"charged_endpoint": endpoint} if endpoint else {}),
            **values,
        )
    )
    params = {"from": was.value, "to": to.value, "why": why}
    if values.get("provider_charge_id"):
        params["provider_charge_id"] = values["provider_charge_id"]
    audit(conn, actor=SYSTEM_ACTOR, action="settle", params=params, ids=[charge_id])
    log.warning(
        "charge settled by the provider's answer: %s -> %s (%s)",
        was.value,
        to.value,
        why,
        extra={"charge_id": str(charge_id), "from": was.value, "to": to.value},
    )
    return was


def _settled_values(verdict: Charged | Declined) -> tuple[ChargeStatus, dict[str, Any]]:
    """The status a verdict makes a charge, and what of the answer its row keeps."""
    if isinstance(verdict, Charged):
        return ChargeStatus.SUCCEEDED, {"provider_charge_id": verdict.provider_charge_id}
    return ChargeStatus.FAILED, {
        "provider_charge_id": verdict.provider_charge_id,
        "decline_code": verdict.code,
        "last_error": verdict.message,
        "last_error_class": CardDeclined.error_class,
    }


def _check_agrees(
    charge_id: uuid.UUID, status: ChargeStatus, provider_id: str | None, verdict: Verdict
) -> None:
    expected = ChargeStatus.SUCCEEDED if isinstance(verdict, Charged) else ChargeStatus.FAILED
    same_id = not isinstance(verdict, Charged) or provider_id == verdict.provider_charge_id
    if status is not expected or not same_id:
        log.error(
            "the provider's answer disagrees with a settled charge: payq has it %s (%s), the "
            "provider said %s; check it at the provider",
            status.value,
            provider_id,
            verdict,
            extra={"charge_id": str(charge_id), "status": status.value},
        )


def audit(
    conn: Connection, *, actor: str, action: str, params: dict[str, Any], ids: Sequence[uuid.UUID]
) -> None:
    """One row of ``operator_actions``: who did what to which charges."""
    conn.execute(
        insert(operator_actions).values(
            actor=actor, action=action, params=params, charge_ids=list(ids), count=len(ids)
        )
    )
