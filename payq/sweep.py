"""The sweep: look up, by key, every dead charge whose outcome is unknown, until it settles.

A charge goes dead of unknown outcome when one of its calls got no clear answer and the
lookup before it went dead could not tell either (the key still in use, the provider
unreachable). The relay runs ``sweep_once`` on every pass: at most
``SWEEP_LOOKUPS_PER_S`` lookups a second, each one through the gate like any provider
call (a breaker that is open or a fleet that is full ends the pass), each charge again
every ``SWEEP_EVERY_S``, until the provider answers or the key's retention ends (then a
lookup proves nothing, and the charge is left to a person: ``unknown_past_retention``).

``resolve`` is the one way a dead charge is looked up and settled; ``payq reconcile``
uses it too.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Select,
    bindparam,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from payq import ledger, metrics
from payq.constants import AttemptKind, ChargeStatus, DeadOutcome
from payq.db import transaction
from payq.gate import ProviderGate, Wait
from payq.models import charge_attempts, charges
from payq.provider import ProviderClient
from payq.routing import Route, Routes, routes_for
from payq.settings import Settings, get_settings

__all__ = ["Resolution", "SweepPass", "backlog", "resolve", "sweep_once", "unknown_outcomes"]

log = logging.getLogger("payq.sweep")

#: A lookup due this long past two sweep periods means no sweep runs.
OVERDUE_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class Resolution:
    """What one lookup of a dead charge did: ``settled`` (succeeded or failed),
    ``verified`` (not charged), ``unknown`` (ask again later) or ``changed`` (the charge
    moved meanwhile: replayed, or settled by another answer)."""

    result: str
    detail: str
    settled_as: ChargeStatus | None = None


@dataclass(frozen=True, slots=True)
class SweepPass:
    looked_up: int = 0
    settled: int = 0
    verified: int = 0
    unknown: int = 0
    waited: str | None = None  # why the pass stopped early (the gate said wait)
    results: dict[uuid.UUID, Resolution] = field(default_factory=dict)


def unknown_outcomes(settings: Settings, *, within_retention: bool = True) -> Select[Any]:
    """How many dead charges are of unknown outcome, within the key's retention or past it."""
    forgotten = ledger.key_forgotten(ledger.retention(settings))
    age = ~forgotten if within_retention else forgotten
    return select(func.count()).where(
        charges.c.status == ChargeStatus.DEAD,
        charges.c.dead_outcome == DeadOutcome.UNKNOWN,
        age,
    )


def _next_lookup() -> ColumnElement[dt.datetime]:
    """When a charge is due for a lookup; at once if no time was ever set."""
    return func.coalesce(charges.c.next_lookup_at, literal("-infinity", DateTime(timezone=True)))


def backlog(settings: Settings | None = None, engine: Engine | None = None) -> dict[str, int]:
    """The sweep's work: ``unknown`` (it will look them up), ``overdue`` (of those, due
    for a lookup long ago: no sweep is running) and ``unknown_past_retention`` (a lookup
    proves nothing any more: for a person with the provider's records)."""
    settings = settings or get_settings()
    late = dt.timedelta(seconds=2 * settings.sweep_every_s + OVERDUE_AFTER_S)
    with transaction(engine) as conn:
        return {
            "unknown": int(conn.execute(unknown_outcomes(settings)).scalar_one()),
            "overdue": int(
                conn.execute(
                    unknown_outcomes(settings).where(_next_lookup() < func.now() - late)
                ).scalar_one()
            ),
            "unknown_past_retention": int(
                conn.execute(unknown_outcomes(settings, within_retention=False)).scalar_one()
            ),
        }


def sweep_once(
    settings: Settings | None = None,
    *,
    budget: int,
    provider: ProviderClient | None = None,
    gate: ProviderGate | None = None,
    routes: Routes | None = None,
) -> SweepPass:
    """Look up at most ``budget`` due charges of unknown outcome, oldest due first."""
    settings = settings or get_settings()
    with transaction() as conn:
        # Taken for this pass by pushing their next lookup on: another relay skips them.
        due = (
            select(charges.c.id)
            .where(
                charges.c.status == ChargeStatus.DEAD,
                charges.c.dead_outcome == DeadOutcome.UNKNOWN,
                _next_lookup() <= func.now(),
                ~ledger.key_forgotten(ledger.retention(settings)),
            )
            .order_by(_next_lookup())
            .limit(budget)
            .with_for_update(skip_locked=True)
        )
        rows = conn.execute(
            update(charges)
            .where(charges.c.id.in_(due.scalar_subquery()))
            .values(next_lookup_at=func.now() + dt.timedelta(seconds=settings.sweep_every_s))
            .returning(charges.c.id, charges.c.idempotency_key, charges.c.attempts)
        ).all()
    counts = {"settled": 0, "verified": 0, "unknown": 0}
    results: dict[uuid.UUID, Resolution] = {}
    waited = None
    for row in rows:
        try:
            resolution = resolve(row.id, row.idempotency_key, row.attempts, provider, gate, routes)
        except Exception:  # one odd charge must not stop the sweep, nor the relay
            log.exception(
                "dead charge not looked up: the lookup failed unexpectedly; asked again "
                "in SWEEP_EVERY_S",
                extra={"charge_id": str(row.id)},
            )
            resolution = Resolution("unknown", "the lookup failed unexpectedly")
        if resolution is None:
            waited = "the gate said wait (breaker open or fleet full)"
            _due_now([r.id for r in rows if r.id not in results])
            break
        results[row.id] = resolution
        if resolution.result in counts:
            counts[resolution.result] += 1
    return SweepPass(looked_up=len(results), waited=waited, results=results, **counts)


def _due_now(ids: list[uuid.UUID]) -> None:
    """Charges this pass took but did not look up: due again at once."""
    with transaction() as conn:
        conn.execute(update(charges).where(charges.c.id.in_(ids)).values(next_lookup_at=func.now()))


def resolve(
    charge_id: uuid.UUID,
    key: str,
    attempts: int,
    provider: ProviderClient | None = None,
    gate: ProviderGate | None = None,
    routes: Routes | None = None,
) -> Resolution | None:
    """Look one dead charge up by key in every ledger group it was sent to, and settle it
    by the answers; ``None`` if the first gate said wait (nothing was sent). A charge in
    any group settles it; a decline, or "not charged", needs every group it was sent to
    to have answered (a group no endpoint serves now cannot: it stays unknown).
    ``attempts``: the count it had when it was picked (a replay meanwhile changes it, and
    the answer then settles nothing here)."""
    routes = routes or routes_for(get_settings(), provider, gate)
    sent = _groups_sent(charge_id, routes)
    lookups: list[tuple[Route, ledger.Lookup]] = []
    for group in (g for g in sent if g is not None):
        asked = _look_up_in(routes, group, key)
        if asked is None:
            if not lookups:
                return None
            break  # this group cannot be asked now: the verdict stays unknown
        lookups.append(asked)
        if isinstance(asked[1].verdict, ledger.Charged):
            break
    route, verdict = _verdict(lookups, complete=len(lookups) == len(sent), routes=routes)
    with transaction() as conn:
        for asked_at, lookup in lookups:
            ledger.record_lookup(conn, charge_id, attempts, lookup, asked_at.name, asked_at.group)
        several = len(lookups) > 1
        resolution = _settle_by(conn, charge_id, attempts, verdict, route.name, several)
    metrics.LOOKUPS.labels(resolution.result).inc()
    log.log(
        logging.INFO if resolution.result != "unknown" else logging.WARNING,
        "dead charge looked up by key: %s (%s)",
        resolution.result,
        resolution.detail,
        extra={"charge_id": str(charge_id), "lookup": resolution.result},
    )
    return resolution


#: The ledger groups a charge's requests went to (NULL: sent before there were several
#: endpoints, to the first endpoint's).
_GROUPS_SENT = (
    select(charge_attempts.c.ledger_group)
    .where(
        charge_attempts.c.charge_id == bindparam("charge_id"),
        charge_attempts.c.kind == AttemptKind.CHARGE,
    )
    .distinct()
)


def _groups_sent(charge_id: uuid.UUID, routes: Routes) -> list[str | None]:
    """The configured groups its requests went to (``Routes.served``), first group
    first; ``None`` for each one no endpoint serves now (it cannot be asked)."""
    with transaction() as conn:
        recorded = conn.execute(_GROUPS_SENT, {"charge_id": charge_id}).scalars().all()
    served = {g: routes.served(g) for g in recorded} or {None: routes.primary.group}
    unserved = {g for g, stands in served.items() if stands is None and g is not None}
    if unserved:
        log.error(
            "dead charge sent to ledger groups no endpoint serves now (%s): it stays of "
            "unknown outcome; configure one of their endpoints again, or check by hand",
            ", ".join(sorted(unserved)),
            extra={"charge_id": str(charge_id)},
        )
    known = {stands for stands in served.values() if stands is not None}
    return [*sorted(known, key=routes.groups.index), *([None] * len(unserved))]


def _look_up_in(routes: Routes, group: str, key: str) -> tuple[Route, ledger.Lookup] | None:
    """One lookup by key through the first of the group's gates that lets it through."""
    routed = routes.enter(group)
    if isinstance(routed, Wait):
        return None
    lookup: ledger.Lookup | None = None
    try:
        lookup = ledger.look_up(routed.route.provider, key)
    finally:
        routed.route.gate.leave(routed.entry, lookup.error if lookup is not None else None, 0)
    return routed.route, lookup


def _verdict(
    lookups: list[tuple[Route, ledger.Lookup]], *, complete: bool, routes: Routes
) -> tuple[Route, ledger.Verdict]:
    """What the groups' answers say together, and the route that said it: charged if any
    group charged it; unknown if any could not tell or was not asked; then declined if
    any declined (a soft decline moved it on: the others found nothing); else not
    charged."""
    for route, lookup in lookups:
        if isinstance(lookup.verdict, ledger.Charged):
            return route, lookup.verdict
    for route, lookup in lookups:
        if isinstance(lookup.verdict, ledger.Unknown):
            return route, lookup.verdict
    last = lookups[-1][0] if lookups else routes.primary
    if not complete:
        return last, ledger.Unknown("a group it was sent to cannot be asked now")
    for route, lookup in lookups:
        if isinstance(lookup.verdict, ledger.Declined):
            return route, lookup.verdict
    return last, ledger.NotCharged()


def _settle_by(
    conn: Connection,
    charge_id: uuid.UUID,
    attempts: int,
    verdict: ledger.Verdict,
    endpoint: str,
    several: bool = False,
) -> Resolution:
    """What a dead charge becomes by the lookups' verdict, in the caller's transaction.
    ``several``: more than one group was asked (a decline then also needs the others'
    "not found" to be final: no call of it still on its way)."""
    if isinstance(verdict, ledger.Declined) and several:
        pending_s = ledger.pending_calls_s(conn, charge_id, get_settings().charge_lease_s)
        if pending_s:
            return Resolution("unknown", f"a call may still reach a provider for {pending_s:.0f} s")
    if isinstance(verdict, ledger.Charged | ledger.Declined):
        was = ledger.settle(
            conn, charge_id, verdict, why="looked up by key", looked_up=True, endpoint=endpoint
        )
        if was is None:
            return Resolution("changed", "already settled")
        to = _settled_as(verdict)
        return Resolution("settled", f"{was.value} -> {to.value}", to)
    if not isinstance(verdict, ledger.NotCharged):
        return Resolution("unknown", verdict.reason)
    settings = get_settings()
    pending_s = ledger.pending_calls_s(conn, charge_id, settings.charge_lease_s)
    if pending_s:  # an earlier call can still reach the provider: ask again after it
        conn.execute(
            update(charges)
            .where(charges.c.id == charge_id)
            .values(next_lookup_at=func.now() + dt.timedelta(seconds=pending_s))
        )
        return Resolution(
            "unknown", f"an earlier call may still reach the provider for {pending_s:.0f} s"
        )
    done = conn.execute(
        update(charges)
        .where(
            charges.c.id == charge_id,
            charges.c.status == ChargeStatus.DEAD,
            charges.c.attempts == attempts,  # not replayed meanwhile
            # A "not found" proves something only while the key is kept.
            ~ledger.key_forgotten(ledger.retention(settings)),
        )
        .values(
            dead_outcome=DeadOutcome.VERIFIED_NOT_CHARGED,
            reconciled_at=func.now(),
            next_lookup_at=None,
            ledger_group=None,  # not charged in any group: a replay may go anywhere
            dead_reason=func.concat(
                charges.c.dead_reason, "; looked up by key: not charged at the provider"
            ),
        )
    ).rowcount
    if done:
        return Resolution("verified", "not charged at the provider")
    return Resolution("changed", "changed while it was looked up (replayed?)")


def _settled_as(verdict: ledger.Charged | ledger.Declined) -> ChargeStatus:
    return ChargeStatus.SUCCEEDED if isinstance(verdict, ledger.Charged) else ChargeStatus.FAILED
