"""A charge pinned to a ledger group that cannot take calls now: asked there what it did.

A charge is pinned to the group its last request went to (``payq.routing``) until that
group is proven not to have charged it. When every endpoint of the group refuses calls
(their breakers open), the charge would wait for the group; first, one lookup by key
asks the group (a fleet slot, not the breaker: a lookup charges nothing):

* charged or declined: the answer settles the charge (``ledger.settle``, audited);
* no charge with that key, and no earlier call can still reach it: the pin is cleared,
  guarded by the charge's call id (no call was claimed since the pin was read), and
  audited; the charge may go to any group now;
* anything else (the group cannot answer, the key is in use): it waits for its group,
  no attempt used.

Every lookup leaves its row (``ledger.record_lookup``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, distinct, exists, func, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from payq import ledger, metrics
from payq.constants import (
    SYSTEM_ACTOR,
    AttemptKind,
    AttemptOutcome,
    ChargeStatus,
    DeferralCause,
)
from payq.db import autocommit, transaction
from payq.endpoints import DEFAULT_ENDPOINT
from payq.gate import Pass, Wait, jitter_ms
from payq.models import charge_attempts, charges
from payq.routing import Route

__all__ = ["DECLINED_GROUPS", "Pin", "free_or_settle", "read_pin"]

log = logging.getLogger("payq.failover")

_DB_TROUBLE = (PoolTimeout, OperationalError, InterfaceError)


@dataclass(frozen=True, slots=True)
class Pin:
    """A charge's pin as read before its endpoint is picked."""

    group: str | None  # as recorded (``Routes.served`` says which configured group it is)
    call_id: uuid.UUID | None  # the last claim's: the pin is cleared only if still this
    key: str
    attempts: int
    declined: frozenset[str]  # groups that declined it (soft declines move it elsewhere)
    recorded: str | None = None  # the row's own value (``group`` may stand in for none)


#: The groups whose calls of the charge were declined.
DECLINED_GROUPS = (
    select(func.array_agg(distinct(charge_attempts.c.ledger_group)))
    .where(
        charge_attempts.c.charge_id == bindparam("charge_id"),
        charge_attempts.c.kind == AttemptKind.CHARGE,
        charge_attempts.c.outcome == AttemptOutcome.DECLINED,
    )
    .scalar_subquery()
)

#: Requests recorded without a group: sent before there were several endpoints, to the
#: one that is now the first (README: list it first when you add others).
_SENT_BEFORE_GROUPS = exists().where(
    charge_attempts.c.charge_id == bindparam("charge_id"),
    charge_attempts.c.kind == AttemptKind.CHARGE,
    charge_attempts.c.ledger_group.is_(None),
)

_READ = select(
    charges.c.ledger_group,
    charges.c.call_id,
    charges.c.idempotency_key,
    charges.c.attempts,
    DECLINED_GROUPS,
    _SENT_BEFORE_GROUPS,
).where(charges.c.id == bindparam("charge_id"))

_UNPIN = (
    update(charges)
    .where(
        charges.c.id == bindparam("charge_id"),
        charges.c.ledger_group.is_not_distinct_from(bindparam("group")),
        charges.c.call_id.is_not_distinct_from(bindparam("last_call")),
        or_(
            charges.c.status.in_([ChargeStatus.PENDING, ChargeStatus.RETRYING]),
            # A claim whose worker died before sending: its lease ran out.
            and_(
                charges.c.status == ChargeStatus.PROCESSING,
                charges.c.lease_expires_at < func.now(),
            ),
        ),
    )
    .values(ledger_group=None)
)


def read_pin(cid: uuid.UUID) -> Pin | Wait | None:
    """The charge's pin (``None``: no such charge). A charge not pinned but with requests
    recorded without a group (from before there were several endpoints) is pinned to
    ``default``, the single endpoint's group (``Routes.served``). If the database cannot
    tell now, a wait: no endpoint is picked without the pin."""
    try:
        with autocommit() as conn:
            row = conn.execute(_READ, {"charge_id": cid}).first()
    except _DB_TROUBLE:
        detail = "the charge's ledger group could not be read (database unavailable)"
        return Wait(DeferralCause.DATABASE, jitter_ms(1000, 3000), detail)
    if row is None:
        return None
    group = row[0] if row[0] is not None or not row[5] else DEFAULT_ENDPOINT
    declined = frozenset(g for g in row[4] or () if g)
    return Pin(group, row[1], row[2], row[3], declined, recorded=row[0])


def free_or_settle(
    cid: uuid.UUID, pin: Pin, group: Sequence[Route], lease_s: float
) -> ChargeStatus | bool:
    """Ask the pinned group (its routes, in order) by key (module docstring): the status
    the answer settled the charge to, ``True`` if the pin was cleared, ``False`` if it
    stays."""
    for route in group:
        entry = route.gate.enter_lookup()
        if isinstance(entry, Pass):
            try:
                return _ask(cid, pin, route, lease_s)
            finally:
                route.gate.leave(entry, None, keep=False)
    return False  # no slot in the group now: it waits


def _ask(cid: uuid.UUID, pin: Pin, route: Route, lease_s: float) -> ChargeStatus | bool:
    lookup = ledger.look_up(route.provider, pin.key)
    verdict = lookup.verdict
    try:
        with autocommit() as conn:
            ledger.record_lookup(conn, cid, pin.attempts, lookup, route.name, route.group)
        if isinstance(verdict, ledger.Charged | ledger.Declined):
            return _settle(cid, verdict, route)
        if isinstance(verdict, ledger.NotCharged):
            return _unpin(cid, pin, route, lease_s)
    except _DB_TROUBLE:
        pass
    return False


def _settle(
    cid: uuid.UUID, verdict: ledger.Charged | ledger.Declined, route: Route
) -> ChargeStatus | bool:
    why = f"looked up at {route.name} while its ledger group took no calls"
    with transaction() as conn:
        was = ledger.settle(conn, cid, verdict, why=why, looked_up=True, endpoint=route.name)
    if was is None:
        return False  # settled already
    return ChargeStatus.SUCCEEDED if isinstance(verdict, ledger.Charged) else ChargeStatus.FAILED


def _unpin(cid: uuid.UUID, pin: Pin, route: Route, lease_s: float) -> bool:
    with transaction() as conn:
        if ledger.pending_calls_s(conn, cid, lease_s) > 0:
            return False  # an earlier call may still reach the group: 404 proves nothing yet
        params = {"charge_id": cid, "group": pin.recorded, "last_call": pin.call_id}
        if not conn.execute(_UNPIN, params).rowcount:
            return False  # claimed or moved since the pin was read
        ledger.audit(
            conn,
            actor=SYSTEM_ACTOR,
            action="unpin",
            params={"group": pin.group, "why": f"looked up at {route.name}: no charge"},
            ids=[cid],
        )
    metrics.MOVED.labels(pin.group).inc()
    log.warning(
        "charge freed from ledger group %s: looked up by key at %s, no charge there; it may "
        "go to another group",
        pin.group,
        route.name,
        extra={"charge_id": str(cid), "endpoint": route.name, "ledger_group": route.group},
    )
    return True
