"""One attempt at one charge: claim, call the provider, record, move on.

This is the business rule the worker's actor runs; it holds no database
connection during the provider call, and every state change is one guarded
``UPDATE`` statement, committed on its own (autocommit: no BEGIN or COMMIT round
trips), so duplicate deliveries and late workers cannot charge twice or overwrite
each other:

    claim     pending | retrying (due) | processing (lease ran out)  ->  processing
              (draws a call id and writes the call's attempt row before the call)
    record    processing (same call id)  ->  succeeded | failed | retrying | dead

The provider's answer is the truth (``payq.ledger``): a worker whose claim was taken
over still records its call, and a 200 or 402 it got settles the charge anyway. A
charge goes dead only after it was looked up by key, when any of its calls ended
without a clear answer; if nobody could tell, it is dead of unknown outcome and the
relay's sweep asks again.

A retry is a delayed message published after the commit; if that publish is
lost, the relay publishes the charge again once it is overdue.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    CTE,
    CompoundSelect,
    Connection,
    Integer,
    Interval,
    Select,
    String,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import array as pg_array
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from payq import failover, ledger, liveness, metrics
from payq.broker import new_message_id, publish_or_leave_to_relay, queued
from payq.constants import (
    CHARGED_NOTHING,
    FINAL_STATUSES,
    MAY_STILL_ARRIVE,
    SYSTEM_ACTOR,
    UNCERTAIN_OUTCOMES,
    AttemptKind,
    AttemptOutcome,
    ChargeStatus,
    DeadOutcome,
    DeferralCause,
)
from payq.db import Prepared, autocommit, get_engine
from payq.errors import (
    CardDeclined,
    FinalProviderError,
    PayqError,
    ProviderConnectionRefused,
    ProviderError,
    RequestNotSent,
    RetryableProviderError,
)
from payq.gate import ProviderGate, Wait, jitter_ms
from payq.models import charge_attempts, charges, operator_actions
from payq.provider import ProviderCharge, ProviderClient, charge_body, clean_text
from payq.retry_policy import RetryPolicy
from payq.routing import Route, Routed, Routes, routes_for, unserved
from payq.sentry import tag_charge
from payq.settings import Settings, get_settings

__all__ = ["Result", "UnknownCharge", "process_charge"]

log = logging.getLogger("payq.charge")

#: The database went away or the connection broke (a restart, a failover, a network blink).
DB_UNAVAILABLE = (OperationalError, InterfaceError)
#: How long the worker keeps trying to record an attempt's outcome before leaving the
#: charge to its lease: a PostgreSQL restart, not an outage.
RECORD_RETRY_S = 3.0

S = ChargeStatus
A = AttemptOutcome
Cause = DeferralCause
Outcome = ProviderCharge | ProviderError


class UnknownCharge(PayqError):
    """A message named a charge that does not exist: it cannot be processed at all."""


class Result(StrEnum):
    """What one message did: the status it moved the charge to, or why it moved none."""

    SUCCEEDED = ChargeStatus.SUCCEEDED.value
    FAILED = ChargeStatus.FAILED.value
    RETRYING = ChargeStatus.RETRYING.value
    DEAD = ChargeStatus.DEAD.value
    SKIPPED = "skipped"  # already claimed, final, or not yet due
    DEFERRED = "deferred"  # must wait (early, breaker, fleet, database): sent again for later
    LEASE_LOST = "lease_lost"  # another worker took over while we called (answer still kept)
    NOT_SENT = "not_sent"  # stalled past the lease between the claim and the call: not sent
    UNRECORDED = "unrecorded"  # the database did not answer; the lease brings it back


# The statements of the hot path are built once, here, with a bind parameter for every
# per-call value. Building a Core construct on every call (coercing each argument, then
# computing its cache key) was most of the worker CPU that claiming and recording took.
# The claim and the record are also prepared on each connection (``db.Prepared``):
# PostgreSQL parses and plans them once, and a call sends only the values. Times are
# PostgreSQL's ``now()``, intervals are bound as ``datetime.timedelta``.

#: Take a charge for one attempt, if it is free: pending, a retry that is due, or
#: processing under a lease that ran out. ``past_window``: created longer ago than the
#: key's send window (``Settings.key_send_window_s``); ``past_retention``: than the
#: provider keeps keys, so that a lookup by key proves nothing any more.
_CLAIMED = (
    update(charges)
    .where(
        charges.c.id == bindparam("charge_id"),
        or_(
            charges.c.status == S.PENDING,
            and_(charges.c.status == S.RETRYING, charges.c.next_attempt_at <= func.now()),
            and_(charges.c.status == S.PROCESSING, charges.c.lease_expires_at < func.now()),
        ),
        # Pinned to another ledger group: not this call's to make (``payq.routing``).
        or_(
            charges.c.ledger_group.is_(None),
            charges.c.ledger_group == bindparam("group"),
            charges.c.ledger_group == bindparam("default_as"),  # ``Routes.served``
        ),
    )
    .values(
        status=S.PROCESSING,
        attempts=charges.c.attempts + 1,
        ledger_group=bindparam("group"),  # pinned before the request can leave
        lease_expires_at=func.now() + bindparam("lease", type_=Interval),
        # The claiming process, if it beats: dead, its lease ends early (payq.liveness).
        holder=bindparam("holder", type_=String(128)),
        call_id=func.gen_random_uuid(),
        updated_at=func.now(),
    )
    .returning(
        charges.c.id,
        charges.c.attempts,
        charges.c.call_id,
        charges.c.retry_base,
        charges.c.idempotency_key,
        charges.c.amount,
        charges.c.currency,
        charges.c.source,
        charges.c.description,
        charges.c.metadata,
        ledger.key_forgotten(bindparam("send_window", type_=Interval)).label("past_window"),
        ledger.key_forgotten(bindparam("retention", type_=Interval)).label("past_retention"),
        func.extract(
            "epoch", charges.c.created_at + bindparam("send_window", type_=Interval) - func.now()
        ).label("window_left_s"),
    )
    .cte("claimed")
)
#: Whether the claimed charge is sent: not when the provider may already have seen it and
#: its send window passed, nor when its attempts ran out while unrecorded (a record that
#: kept failing, workers that kept dying): then it goes dead without a call.
_SENDABLE = and_(
    ~and_(_CLAIMED.c.past_window, _CLAIMED.c.attempts > 1),
    _CLAIMED.c.attempts - _CLAIMED.c.retry_base <= bindparam("max_attempts"),
)
#: The call's row, written before the call: every request sent leaves a record, even if
#: its worker dies before it hears the answer.
_WRITE_AHEAD = (
    pg_insert(charge_attempts)
    .from_select(
        [
            "charge_id",
            "number",
            "call_id",
            "kind",
            "started_at",
            "outcome",
            "endpoint",
            "ledger_group",
        ],
        select(
            _CLAIMED.c.id,
            _CLAIMED.c.attempts,
            _CLAIMED.c.call_id,
            literal_column(f"'{AttemptKind.CHARGE}'"),
            func.now(),
            literal_column(f"'{A.IN_FLIGHT}'"),
            bindparam("endpoint", type_=String(32)),
            bindparam("group", type_=String(32)),
        ).where(_SENDABLE),
    )
    .cte("written")
)
#: A call still in flight when its charge is claimed again was cut off (its worker died or
#: stalled past the lease): unknown. Its own record, if it ever comes, writes what happened.
_ABANDON = (
    update(charge_attempts)
    .where(
        charge_attempts.c.charge_id == bindparam("charge_id"),
        charge_attempts.c.outcome == A.IN_FLIGHT,
        exists(select(_CLAIMED.c.id).where(_CLAIMED.c.attempts > 1)),  # a first claim: none
    )
    .values(outcome=A.ABANDONED)
    .cte("abandoned")
)
#: Not durable: its commit does not wait for the WAL flush. A claim lost in a PostgreSQL
#: crash leaves the charge as it was; its record then finds no claim (lease lost) but
#: still writes the call's row, the relay sends the charge again, and the next attempt's
#: call carries the same key, so the provider replays its answer. The record is
#: durable, and flushes the claim with it.
_CLAIM = Prepared(
    "claim",
    select(_CLAIMED, _SENDABLE.label("sendable")).add_cte(_WRITE_AHEAD).add_cte(_ABANDON),
    durable=False,
)

#: What a charge that could not be claimed is doing, and in how long a retry is due.
_NOT_CLAIMED = select(
    charges.c.status,
    charges.c.message_id,
    charges.c.ledger_group,
    (charges.c.lease_expires_at < func.now()).label("lease_over"),
    (func.extract("epoch", charges.c.next_attempt_at - func.now()) * 1000).label("due_in_ms"),
).where(charges.c.id == bindparam("charge_id"))

#: A deferred charge's next message: the row names it, if the row named the one deferred.
_HAND_OVER = (
    update(charges)
    .where(
        charges.c.id == bindparam("charge_id"),
        charges.c.message_id.is_not_distinct_from(bindparam("old_id")),
        charges.c.status.in_([S.PENDING, S.RETRYING, S.PROCESSING]),
    )
    .values(message_id=bindparam("new_id"), published_at=func.now())
)

#: The message a charge's row names, and its status.
_ROW_MESSAGE = select(charges.c.message_id, charges.c.status).where(
    charges.c.id == bindparam("charge_id")
)

#: Whether an earlier call of this charge ended without a clear answer.
_EARLIER_UNCERTAIN = select(
    exists().where(
        charge_attempts.c.charge_id == bindparam("charge_id"),
        charge_attempts.c.kind == AttemptKind.CHARGE,
        charge_attempts.c.outcome.in_(sorted(UNCERTAIN_OUTCOMES)),
        charge_attempts.c.call_id != bindparam("call_id"),
    )
)

_ATTEMPT_FIELDS = ("outcome", "http_status", "error_class", "error_message", "answer", "latency_ms")
_ATTEMPT_INSERT = pg_insert(charge_attempts).values(
    charge_id=bindparam("charge_id"),
    number=bindparam("attempt"),
    call_id=bindparam("call_id"),
    kind=AttemptKind.CHARGE,
    started_at=bindparam("started_at"),
    finished_at=func.now(),
    endpoint=bindparam("endpoint", type_=String(32)),
    ledger_group=bindparam("group", type_=String(32)),
    **{name: bindparam(name) for name in _ATTEMPT_FIELDS},
)
#: One provider call's row, completed (or written, if its claim was lost in a crash): by
#: the call's own id, so a retry after a commit whose answer was lost finds it there.
_ATTEMPT = _ATTEMPT_INSERT.on_conflict_do_update(
    constraint="uq_charge_attempts_call_id",
    set_={
        "finished_at": _ATTEMPT_INSERT.excluded.finished_at,
        **{name: getattr(_ATTEMPT_INSERT.excluded, name) for name in _ATTEMPT_FIELDS},
    },
)


#: The recording call still holds the claim (judged on the row being moved, so a claim
#: taken meanwhile is seen: PostgreSQL re-checks it on the newest row version).
_HELD = and_(charges.c.status == S.PROCESSING, charges.c.call_id == bindparam("call_id"))
_SETTLED = [S.SUCCEEDED, S.FAILED]


def _move_statement(
    status: ChargeStatus,
    columns: tuple[str, ...],
    expressions: dict[str, Any],
    *,
    attempt: bool,
) -> CompoundSelect[Any]:
    """Record a call (``attempt``) and move its charge to ``status``, in one statement.

    The move happens while this call still holds the claim (``ours``). A move to
    ``succeeded`` or ``failed`` is the provider's own answer: when the call no longer
    holds the claim, it settles the charge all the same, from any status but those two,
    and the change is audited in ``operator_actions`` under ``payq``, in the same
    statement. It returns ``(ours, was)`` when the charge moved (``was``: the status it
    came from, when not ours), nothing when it did not. ``columns`` are set from bind
    parameters of the same name, ``expressions`` as given; a move without a call undoes
    the claim's count (``attempts``).
    """
    values: dict[str, Any] = {
        "status": status,
        "lease_expires_at": None,
        "updated_at": func.now(),
        **{column: bindparam(column) for column in columns},
        **expressions,
    }
    if status in _SETTLED:
        values.update(ledger.NOT_DEAD)
    held = values if attempt else {**values, "attempts": bindparam("attempts", type_=Integer)}
    ours = (
        update(charges)
        .where(charges.c.id == bindparam("charge_id"), _HELD)
        .values(**held)
        .returning(charges.c.id)
        .cte("ours")
    )
    moves: list[Select[Any, Any]] = [
        select(literal_column("true").label("ours"), null().label("was")).select_from(ours)
    ]
    ctes = [ours]
    if status in _SETTLED:
        settled, audit = _settle_anyway(status, values, ours)
        moves.append(select(literal_column("false"), settled.c.was))
        ctes += [settled, audit]
    if attempt:
        ctes.append(_ATTEMPT.cte("attempt"))
    statement = union_all(*moves)
    for cte in ctes:
        statement = statement.add_cte(cte)
    return statement


def _moved_on_after_decline(status: ChargeStatus) -> list[Any]:
    """A late decline settles the charge only where it is still pinned to the decline's
    group (or nowhere): one that moved on after a soft decline may be charged elsewhere."""
    if status is not S.FAILED:
        return []
    return [or_(charges.c.ledger_group.is_(None), charges.c.ledger_group == bindparam("group"))]


def _settle_anyway(status: ChargeStatus, values: dict[str, Any], ours: CTE) -> tuple[CTE, CTE]:
    """The provider's answer settles the charge even when the call lost its claim (from
    any status but settled), and the change is audited under ``payq``: two CTEs."""
    old = charges.alias("old")  # the row as it was: what the audit says it came from
    settled = (
        update(charges)
        .where(
            charges.c.id == bindparam("charge_id"),
            charges.c.id == old.c.id,
            # (No IN list: an expanding parameter cannot be prepared.)
            *(charges.c.status != s for s in _SETTLED),
            ~exists(select(ours.c.id)),
            *_moved_on_after_decline(status),
        )
        .values(**values)
        .returning(charges.c.id, old.c.status.label("was"))
        .cte("settled")
    )
    why = "the provider's answer to a call that had lost its claim"
    audit = insert(operator_actions).from_select(
        ["actor", "action", "params", "charge_ids", "count"],
        select(
            literal(SYSTEM_ACTOR),
            literal("settle"),
            func.jsonb_build_object(
                *("from", settled.c.was, "to", status.value, "why", why),
                *("attempt", bindparam("attempt", type_=Integer)),
            ),
            pg_array([settled.c.id]),
            literal(1),
        ),
    )
    return settled, audit.cte("audit")


_ERRORS = ("last_error", "last_error_class")
#: Where each result takes the charge: the columns it sets.
_MOVES: dict[Result, tuple[ChargeStatus, tuple[str, ...], dict[str, Any]]] = {
    Result.SUCCEEDED: (S.SUCCEEDED, ("provider_charge_id", "charged_endpoint"), {}),
    Result.FAILED: (
        S.FAILED,
        ("provider_charge_id", "decline_code", "charged_endpoint", *_ERRORS),
        {},
    ),
    Result.DEAD: (
        S.DEAD,
        ("dead_reason", "dead_outcome", "ledger_group", *_ERRORS),
        {"next_lookup_at": func.now() + bindparam("lookup_in", type_=Interval)},
    ),
    Result.RETRYING: (
        S.RETRYING,
        ("message_id", "ledger_group", *_ERRORS),
        {
            "next_attempt_at": func.now() + bindparam("retry_in", type_=Interval),
            "published_at": func.now(),
        },
    ),
}
#: Record a call and move its charge on, in one statement. PostgreSQL runs the INSERT in
#: ``WITH`` to completion whether or not the guarded UPDATE matches: a call whose worker
#: lost its claim is still recorded, as it was made.
_RECORD: dict[Result, Prepared] = {
    result: Prepared(result.value, _move_statement(status, columns, expressions, attempt=True))
    for result, (status, columns, expressions) in _MOVES.items()
}
#: A charge that ends without a call (its send window passed, its attempts ran out while
#: unrecorded): the claim's count is undone, as no request was sent.
_NO_CALL: dict[Result, Prepared] = {
    result: Prepared(
        f"{result.value}_no_call", _move_statement(status, columns, expressions, attempt=False)
    )
    for result, (status, columns, expressions) in _MOVES.items()
    if result is not Result.RETRYING
}


@dataclass(frozen=True, slots=True)
class _Claim:
    id: uuid.UUID
    attempt: int  # the attempt's number, counted over the charge's whole life
    call_id: uuid.UUID  # this call's own id: the claim's fence, and its attempt row's key
    budget_used: int  # attempts since the last operator replay, this one included
    key: str
    source: str
    body: bytes
    endpoint: str  # where the call goes
    group: str  # its ledger group: the charge is pinned to it from the claim on
    sendable: bool  # False: no request may be sent (window passed, attempts ran out)
    past_window: bool
    past_retention: bool
    window_left_s: float  # until the key's send window closes

    def masked(self, text: str) -> str:
        """Provider messages may echo the payment token: it is not stored with them."""
        return text.replace(self.source, "[source]") if self.source else text


@dataclass(frozen=True, slots=True)
class _Decision:
    """Where the charge goes, and the columns the move sets (``_MOVES``)."""

    result: Result
    values: dict[str, Any]


def process_charge(
    charge_id: str,
    *,
    message_id: str | None = None,
    settings: Settings | None = None,
    provider: ProviderClient | None = None,
    gate: ProviderGate | None = None,
    routes: Routes | None = None,
) -> Result:
    """Make at most one provider attempt for this charge and record what happened.

    The endpoint is picked first (``payq.routing``: one whose breaker and fleet limit
    admit the call, within the charge's ledger group if it is pinned), the database
    second: a charge that must wait is deferred before it is claimed, so waiting never
    uses an attempt. A lookup by key before the charge goes dead uses the same slot.
    ``provider`` or ``gate``: one endpoint made of them (tests); else the process's.
    """
    settings = settings or get_settings()
    cid = _charge_id(charge_id)
    routes = routes or routes_for(settings, provider, gate)
    routed = _route(cid, routes, settings)
    if isinstance(routed, Result):
        return routed
    if isinstance(routed, Wait):
        return _defer(cid, message_id, routed.cause, routed.delay_ms, routed.detail)
    route, entry, attempt = routed.route, routed.entry, _Attempt()
    try:
        claimed_at = time.monotonic()  # before the claim: a freeze during it counts
        claim = _claim_or_result(cid, message_id, settings, route)
        if not isinstance(claim, _Claim):
            return claim
        tag_charge(str(claim.id), claim.attempt)
        attempt.started_at = dt.datetime.now(dt.UTC)
        slot_send_by = route.gate.confirm(entry) if claim.sendable else None
        if claim.sendable and slot_send_by is None:
            return _unclaim(claim)
        send_by = min(claimed_at + _send_window_s(settings), slot_send_by or math.inf)
        if claim.sendable and not _send(claim, route.provider, attempt, send_by):
            return _not_sent(claim, settings)
        decision = _decide(claim, attempt.outcome, RetryPolicy.from_settings(settings), settings)
        if decision.result is Result.DEAD and _uncertain(claim, attempt.outcome):
            stalled = _stalled(claimed_at, settings) or route.gate.confirm(entry) is None
            decision = _look_up_before_dead(decision, claim, attempt, route.provider, stalled)
        elif routes.several_groups:
            decision = _unpin_if_proven(decision, claim, attempt.outcome)
            decision = _soft_decline(decision, claim, attempt.outcome, routes, settings)
    finally:
        route.gate.leave(entry, attempt.outcome, attempt.latency_ms)
    attempt.count(route)
    return _record(claim, attempt, decision, settings, (route.provider, route.gate))


def _route(cid: uuid.UUID, routes: Routes, settings: Settings) -> Routed | Wait | Result:
    """The endpoint this call goes to, or why it waits. With several ledger groups the
    charge's pin is read first (the claim checks it again, so a pin that changes in
    between is never crossed); a pinned charge whose group takes no calls is asked for
    there by key, and moves only if that proves its group did not charge it
    (``payq.failover``), or is settled by the answer."""
    pin = failover.read_pin(cid) if routes.several_groups else None
    if pin is None or isinstance(pin, Wait):
        return pin or routes.enter()
    if pin.group is None:
        return routes.enter(avoid=pin.declined)
    group = routes.served(pin.group)
    if group is None:
        return unserved(pin.group)
    routed = routes.enter(group, avoid=pin.declined)
    if not isinstance(routed, Wait):
        return routed
    asked = failover.free_or_settle(cid, pin, routes.order(group), settings.charge_lease_s)
    if asked is True:
        return routes.enter(None, avoid=pin.declined)
    if isinstance(asked, ChargeStatus):
        return Result(asked.value)
    return routed


def _soft_decline(
    decision: _Decision,
    claim: _Claim,
    outcome: Outcome | None,
    routes: Routes,
    settings: Settings,
) -> _Decision:
    """A decline whose code is in ``PAYMENT_SOFT_DECLINES`` sends the charge on to a ledger
    group that has not declined it, if one is configured and an attempt is left (the
    decline is stored by its group: it charged nothing there, and a request there again
    would get the same decline)."""
    if decision.result is not Result.FAILED or not isinstance(outcome, CardDeclined):
        return decision
    policy = RetryPolicy.from_settings(settings)
    if outcome.code not in settings.soft_declines or policy.exhausted(claim.budget_used):
        return decision
    try:
        with autocommit() as conn:
            declined = conn.execute(select(failover.DECLINED_GROUPS), {"charge_id": claim.id})
            tried = {*(declined.scalar() or ()), claim.group}
    except (PoolTimeout, *DB_UNAVAILABLE):
        return decision  # cannot tell where it may go: the decline stands
    if all(group in tried for group in routes.groups):
        return decision
    delay_s = policy.delay_s(claim.budget_used, None)
    values = {
        "delay_ms": int(delay_s * 1000) + 1,
        "message_id": new_message_id(),
        "ledger_group": None,
        "last_error": str(outcome),
        "last_error_class": outcome.error_class,
    }
    return _Decision(Result.RETRYING, values)


def _unpin_if_proven(decision: _Decision, claim: _Claim, outcome: Outcome | None) -> _Decision:
    """A charge moving on unsettled stays pinned to this call's group unless this call
    charged nothing by the contract and no earlier call there may have (``CHARGED_NOTHING``)."""
    if decision.result not in (Result.RETRYING, Result.DEAD) or outcome is None:
        return decision
    if _attempt_outcome(outcome) not in CHARGED_NOTHING or _uncertain(claim, None):
        return decision
    return _Decision(decision.result, {**decision.values, "ledger_group": None})


@dataclass(slots=True)
class _Attempt:
    """One claimed charge's call: what came back, and the lookup made before dead."""

    outcome: Outcome | None = None
    lookup: ledger.Lookup | None = None
    elapsed_s: float = 0.0
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def latency_ms(self) -> int:
        return int(self.elapsed_s * 1000)

    def count(self, route: Route) -> None:
        if self.outcome is not None:
            metrics.PROVIDER_LATENCY.observe(self.elapsed_s)
            metrics.ATTEMPTS.labels(
                "none" if isinstance(self.outcome, ProviderCharge) else self.outcome.error_class
            ).inc()
            outcome = _attempt_outcome(self.outcome).value
            metrics.ENDPOINT_CALLS.labels(route.name, route.group, outcome).inc()
            metrics.ENDPOINT_LATENCY.labels(route.name).observe(self.elapsed_s)


def _charge_id(charge_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(charge_id)
    except (ValueError, TypeError, AttributeError):
        raise UnknownCharge(f"message names no charge: {charge_id!r} is not a charge id") from None


def _claim_or_result(
    cid: uuid.UUID, message_id: str | None, settings: Settings, route: Route
) -> _Claim | Result:
    """The charge claimed for one attempt on ``route``, or what this message comes to
    without one: a deferral (no database connection, the retry came early, the charge
    is pinned to another ledger group) or nothing to do."""
    try:
        with autocommit() as conn:  # each statement is atomic on its own
            claim = _claim(conn, cid, settings, route)
            if claim is not None:
                return claim
            result, redo_in_ms, cause = _not_claimed(conn, cid, message_id, route.group)
    except PoolTimeout:
        _pool_exhausted(cid, settings)
        delay_ms = jitter_ms(500, 2000)
        return _defer(cid, message_id, Cause.DB_POOL, delay_ms, "no database connection")
    except DB_UNAVAILABLE as exc:
        log.warning(
            "database unavailable at claim (%s); charge deferred",
            _first_line(exc),
            extra={"charge_id": str(cid), "cause": Cause.DATABASE},
        )
        delay_ms = jitter_ms(1000, 3000)
        return _defer(cid, message_id, Cause.DATABASE, delay_ms, "database unavailable")
    if redo_in_ms is not None and message_id is not None:
        # The scheduled retry itself came early (clocks differ between hosts): send it
        # again for when it is due rather than call before Retry-After. Or the charge's
        # pin changed since it was read: its endpoint is picked again.
        return _defer(cid, message_id, cause, redo_in_ms, f"not claimed ({cause})")
    return result


def _send(claim: _Claim, provider: ProviderClient, attempt: _Attempt, send_by: float) -> bool:
    """Make the call; ``False`` if the request could not leave by ``send_by`` (within the
    claim's lease, and so that its fleet slot outlasts it: nothing went out)."""
    t0 = time.monotonic()
    try:
        attempt.outcome = provider.create_charge(claim.key, claim.body, send_by=send_by)
    except ProviderError as exc:
        attempt.outcome = exc
    except RequestNotSent:
        return False
    attempt.elapsed_s = time.monotonic() - t0
    return True


def _look_up_before_dead(
    decision: _Decision, claim: _Claim, attempt: _Attempt, provider: ProviderClient, stalled: bool
) -> _Decision:
    """A charge whose call may have charged is looked up by key (in the call's slot)
    before it is called dead, unless the key is past retention or the process stalled."""
    if claim.past_retention or stalled:
        return _after_lookup(decision, None)
    attempt.lookup = ledger.look_up(provider, claim.key)
    pending_s = _pending_calls_s(claim, own=_may_still_arrive(attempt.outcome))
    return _after_lookup(decision, attempt.lookup, pending_s)


def _defer(
    cid: uuid.UUID, message_id: str | None, cause: DeferralCause, delay_ms: int, detail: str
) -> Result:
    """Send this charge's message again for later; the charge itself is not claimed.

    The delayed message gets a fresh Redis id, handed over on the row in the same step
    (guarded by the old id), so the relay sees it as queued. The id cannot be reused:
    Dramatiq deletes a due message's delay-queue copy only after moving it to the
    queue, and that late delete would take a new delayed copy of the same id with it.
    A message the row does not name (a stale duplicate) is dropped instead of deferred.
    With the database unavailable the hand-over is skipped: the relay may then publish
    the charge once more, and the guarded claim makes that harmless.
    """
    new_id = new_message_id()
    if message_id is not None and cause not in (Cause.DB_POOL, Cause.DATABASE):
        try:
            with autocommit() as conn:  # guarded by the old id: no transaction needed
                handed = conn.execute(
                    _HAND_OVER, {"charge_id": cid, "old_id": message_id, "new_id": new_id}
                ).rowcount
                if not handed:
                    handed = _adopt(conn, cid, new_id)
        except (PoolTimeout, *DB_UNAVAILABLE):
            handed = 1  # cannot tell: defer it anyway, the relay sorts out any duplicate
        if not handed:
            log.info(
                "message dropped: the charge is final or has a newer message",
                extra={"charge_id": str(cid), "cause": cause},
            )
            return Result.SKIPPED
    publish_or_leave_to_relay([(cid, new_id)], delay_ms=delay_ms)
    metrics.DEFERRALS.labels(cause).inc()
    # A full fleet is routine under load; the rest say something about a dependency.
    level = logging.DEBUG if cause is Cause.FLEET_FULL else logging.INFO
    log.log(
        level,
        "charge deferred %.1f s: %s",
        delay_ms / 1000,
        detail,
        extra={"charge_id": str(cid), "cause": cause, "delay_ms": delay_ms},
    )
    return Result.DEFERRED


def _adopt(conn: Connection, cid: uuid.UUID, new_id: str) -> int:
    """Hand the charge over to this message although the row names another, if that
    other is gone from Redis (this one was sent while the database could not record
    it): the charge then keeps a message instead of waiting for the relay. 0 when the
    charge is final or its own message is still queued (this one is a duplicate)."""
    row = conn.execute(_ROW_MESSAGE, {"charge_id": cid}).first()
    if row is None or row.status in FINAL_STATUSES:
        return 0
    if queued([row.message_id], overdue_after_s=get_settings().relay_stale_after_s)[0]:
        return 0
    return int(
        conn.execute(
            _HAND_OVER, {"charge_id": cid, "old_id": row.message_id, "new_id": new_id}
        ).rowcount
    )


def _pool_exhausted(cid: uuid.UUID, settings: Settings) -> None:
    pool = get_engine().pool
    figures = {
        "pool_size": settings.database_pool_max_connections,
        "pool_checked_out": pool.checkedout() if isinstance(pool, QueuePool) else None,
        "db_timeout_ms": settings.db_timeout_ms,
    }
    metrics.POOL_EXHAUSTED.labels("database").inc()
    log.warning(
        "database connection pool exhausted: no connection within DB_TIMEOUT_MS (%d ms), "
        "%s of %d in use; charge deferred, no attempt used",
        settings.db_timeout_ms,
        figures["pool_checked_out"],
        settings.database_pool_max_connections,
        extra={"charge_id": str(cid), "cause": Cause.DB_POOL, **figures},
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _claim(conn: Connection, cid: uuid.UUID, settings: Settings, route: Route) -> _Claim | None:
    params = {
        "charge_id": cid,
        "group": route.group,
        "default_as": route.default_as,
        "endpoint": route.name,
        "lease": dt.timedelta(seconds=settings.charge_lease_s),
        "send_window": dt.timedelta(seconds=settings.key_send_window_s),
        "retention": ledger.retention(settings),
        "max_attempts": settings.retry_max_attempts,
        "holder": liveness.holder(),
    }
    row = _CLAIM.execute(conn, params).mappings().first()
    if row is None:
        return None
    return _Claim(
        id=row["id"],
        attempt=row["attempts"],
        call_id=row["call_id"],
        budget_used=row["attempts"] - row["retry_base"],
        key=row["idempotency_key"],
        source=row["source"],
        body=charge_body(
            charge_id=str(row["id"]),
            amount=row["amount"],
            currency=row["currency"],
            source=row["source"],
            description=row["description"],
            metadata=row["metadata"],
        ),
        endpoint=route.name,
        group=route.group,
        sendable=bool(row["sendable"]),
        past_window=bool(row["past_window"]),
        past_retention=bool(row["past_retention"]),
        window_left_s=float(row["window_left_s"]),
    )


def _not_claimed(
    conn: Connection, cid: uuid.UUID, message_id: str | None, group: str
) -> tuple[Result, int | None, DeferralCause]:
    """Why a charge could not be claimed, and when to try again if this message is the
    charge's own and came early, or picked an endpoint outside the charge's pin."""
    row = conn.execute(_NOT_CLAIMED, {"charge_id": cid}).mappings().first()
    if row is None:
        raise UnknownCharge(f"no charge with id {cid}")
    own = message_id is not None and message_id == row["message_id"]
    early = row["status"] == S.RETRYING and (row["due_in_ms"] or 0) > 0
    if early and own:
        return Result.DEFERRED, int(row["due_in_ms"]) + 1, Cause.EARLY_MESSAGE
    claimable = row["status"] in (S.PENDING, S.RETRYING) or (
        row["status"] == S.PROCESSING and row["lease_over"]
    )
    if own and claimable and row["ledger_group"] not in (None, group):
        return Result.DEFERRED, jitter_ms(50, 250), Cause.PINNED
    log.info(
        "message skipped: charge is %s",
        row["status"],
        extra={"charge_id": str(cid), "status": row["status"]},
    )
    return Result.SKIPPED, None, Cause.EARLY_MESSAGE


# --- where an outcome takes the charge ------------------------------------------------


def _decide(
    claim: _Claim, outcome: Outcome | None, policy: RetryPolicy, settings: Settings
) -> _Decision:
    """Where one call's outcome (``None``: no call was made) takes the charge, exactly as
    provider-api.md says. A dead decision is not yet final: ``_uncertain`` may ask for a
    lookup first."""
    if outcome is None:
        if claim.past_window:
            ttl_s = settings.provider_idempotency_ttl_s
            reason = (
                f"near the end of the provider's key retention ({ttl_s} s, less the lease and "
                "the call's timeout): not sent again, since a request reaching the provider "
                "after it forgot the key could charge twice"
            )
        else:
            reason = (
                f"attempts exhausted ({claim.budget_used - 1} of {policy.max_attempts}) "
                "without a recorded answer (a record that kept failing, or workers that "
                "stopped mid-call)"
            )
        return _dead(reason)
    if isinstance(outcome, ProviderCharge):
        return _Decision(Result.SUCCEEDED, {"provider_charge_id": outcome.id})
    errors = {"last_error": str(outcome), "last_error_class": outcome.error_class}
    if isinstance(outcome, CardDeclined):
        return _Decision(
            Result.FAILED,
            {
                "provider_charge_id": outcome.provider_charge_id,
                "decline_code": outcome.code,
                **errors,
            },
        )
    if isinstance(outcome, FinalProviderError):
        return _dead(f"{outcome.error_class}: {outcome}", errors)
    assert isinstance(outcome, RetryableProviderError)
    if policy.exhausted(claim.budget_used):
        reason = (
            f"attempts exhausted ({claim.budget_used} of {policy.max_attempts}); last error "
            f"{outcome.error_class}: {outcome}"
        )
        return _dead(reason, errors)
    delay_s = policy.delay_s(claim.budget_used, outcome.retry_after_s)
    if delay_s >= claim.window_left_s:
        reason = (
            f"the next attempt (in {delay_s:.0f} s) would come after the idempotency key's "
            f"send window closes (in {max(0.0, claim.window_left_s):.0f} s); last error "
            f"{outcome.error_class}: {outcome}"
        )
        return _dead(reason, errors)
    return _Decision(
        Result.RETRYING,
        {"delay_ms": int(delay_s * 1000) + 1, "message_id": new_message_id(), **errors},
    )


def _dead(reason: str, errors: dict[str, Any] | None = None) -> _Decision:
    """Dead, with nothing charged as far as the answers tell (``_after_lookup`` may differ)."""
    values = {
        "dead_reason": reason,
        "dead_outcome": DeadOutcome.NOT_CHARGED,
        "lookup_in": None,  # the sweep's next lookup: only for an unknown outcome
        **(errors or {"last_error": None, "last_error_class": None}),
    }
    return _Decision(Result.DEAD, values)


def _may_still_arrive(outcome: Outcome | None) -> bool:
    """Whether this call's request may still reach the provider (no answer came)."""
    return outcome is not None and _attempt_outcome(outcome) in MAY_STILL_ARRIVE


def _uncertain(claim: _Claim, outcome: Outcome | None) -> bool:
    """Whether this call, or an earlier one, ended without saying what the provider did."""
    if outcome is not None and _attempt_outcome(outcome) in UNCERTAIN_OUTCOMES:
        return True
    try:
        with autocommit() as conn:
            params = {"charge_id": claim.id, "call_id": claim.call_id}
            return bool(conn.execute(_EARLIER_UNCERTAIN, params).scalar())
    except (PoolTimeout, *DB_UNAVAILABLE):
        return True  # cannot tell: look it up


def _pending_calls_s(claim: _Claim, own: bool = False) -> float:
    """Seconds until no call of this charge can reach the provider any more: earlier
    ones, and this one too if ``own`` (it got no clear answer: its request may still be
    on its way, and may arrive up to its claim plus the lease)."""
    try:
        with autocommit() as conn:
            lease_s = get_settings().charge_lease_s
            but = None if own else claim.call_id
            return ledger.pending_calls_s(conn, claim.id, lease_s, but=but)
    except (PoolTimeout, *DB_UNAVAILABLE):
        return float(get_settings().charge_lease_s)  # cannot tell: a whole lease


def _send_window_s(settings: Settings) -> float:
    """How long after its claim a request may still leave: it must reach the provider
    within the claim's lease, and may take the call's whole timeout to get there."""
    return settings.charge_lease_s - settings.payment_timeout_s


def _stalled(claimed_at: float, settings: Settings) -> bool:
    """Whether this worker is past the point where it may still send (only a worker frozen
    since its claim, by a VM pause or SIGSTOP, gets there)."""
    return time.monotonic() - claimed_at >= _send_window_s(settings)


def _after_lookup(
    decision: _Decision, lookup: ledger.Lookup | None, pending_s: float = 0.0
) -> _Decision:
    """A dead decision, corrected by what the provider's books say. ``lookup``: ``None``
    when no lookup could prove anything (past the key's retention, or this worker stalled
    past its lease); ``pending_s``: how long an earlier call may still reach the provider,
    during which "no charge found" proves nothing yet."""
    verdict = (
        lookup.verdict
        if lookup is not None
        else ledger.Unknown("no lookup could prove it: the sweep looks it up")
    )
    if isinstance(verdict, ledger.Charged):
        return _Decision(Result.SUCCEEDED, {"provider_charge_id": verdict.provider_charge_id})
    if isinstance(verdict, ledger.Declined):
        return _Decision(
            Result.FAILED,
            {
                "provider_charge_id": verdict.provider_charge_id,
                "decline_code": verdict.code,
                "last_error": verdict.message,
                "last_error_class": CardDeclined.error_class,
            },
        )
    values = dict(decision.values)
    if isinstance(verdict, ledger.NotCharged) and pending_s > 0:
        verdict = ledger.Unknown(
            f"not charged so far, but an earlier call may still reach the provider for "
            f"{pending_s:.0f} s: looked up again then"
        )
    if isinstance(verdict, ledger.NotCharged):
        values["dead_outcome"] = DeadOutcome.VERIFIED_NOT_CHARGED
        values["ledger_group"] = None  # proven: a replay may go to any group
        values["dead_reason"] += "; looked up by key: not charged at the provider"
    else:
        values["dead_outcome"] = DeadOutcome.UNKNOWN
        values["lookup_in"] = dt.timedelta(seconds=pending_s)
        values["dead_reason"] += f"; outcome unknown: {verdict.reason}"
    return _Decision(Result.DEAD, values)


# --- recording -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Moved:
    """What a record did to the charge: nothing (``moved`` False), or a move from ``was``,
    made by the call that held the claim (``ours``) or by its answer alone."""

    moved: bool
    ours: bool = False
    was: str | None = None


def _record(
    claim: _Claim,
    attempt: _Attempt,
    decision: _Decision,
    settings: Settings,
    way: tuple[ProviderClient, ProviderGate],
) -> Result:
    """Record the call and move the charge on. ``way``: the client and gate to look the
    charge up with, should its answer prove impossible to store."""
    outcome, latency_ms, started_at = attempt.outcome, attempt.latency_ms, attempt.started_at
    error = outcome if isinstance(outcome, ProviderError) else None
    extra = _extra(claim, "recording", latency_ms=latency_ms, error=error)
    try:
        for trying in Retrying(
            retry=retry_if_exception_type((PoolTimeout, *DB_UNAVAILABLE)),
            stop=stop_after_delay(RECORD_RETRY_S) | stop_after_attempt(5),
            wait=wait_exponential(multiplier=0.2, max=1.0),
            reraise=True,
        ):
            with trying:
                if trying.retry_state.attempt_number > 1:
                    log.warning("database unavailable: recording the attempt again", extra=extra)
                try:
                    row = None if outcome is None else _attempt_row(claim, outcome, latency_ms)
                    moved = _save(claim, row, started_at, attempt.lookup, decision)
                except (PoolTimeout, *DB_UNAVAILABLE):
                    raise
                except Exception as exc:  # the database refused what it was given
                    return _unrecordable(claim, outcome, exc, started_at, latency_ms, way)
    except (PoolTimeout, *DB_UNAVAILABLE) as exc:
        # The provider has answered and the answer is lost with this attempt; its row,
        # written before the call, says so once the charge is claimed again. The lease
        # brings the charge back; the next attempt sends the same key and the provider
        # replays its answer: nothing is charged twice.
        log.error(
            "attempt not recorded, the database did not answer for %g s (%s); the charge "
            "is taken up again when its lease (%d s) runs out",
            RECORD_RETRY_S,
            _first_line(exc),
            settings.charge_lease_s,
            extra={**extra, "outcome": "unrecorded"},
        )
        return Result.UNRECORDED
    return _moved_on(
        claim,
        decision,
        moved,
        _extra(claim, decision.result.value, latency_ms=latency_ms, error=error),
    )


def _moved_on(claim: _Claim, decision: _Decision, moved: _Moved, extra: dict[str, Any]) -> Result:
    """What the recorded move comes to: counted, logged, a retry published."""
    result = decision.result
    if not moved.ours:
        _fenced(claim, decision, moved, extra)
        return Result.LEASE_LOST
    metrics.CHARGES.labels(result.value).inc()
    # A dead charge needs a person: ERROR (which Sentry, when on, reports as an event).
    level = {Result.DEAD: logging.ERROR, Result.RETRYING: logging.WARNING}.get(result, logging.INFO)
    if result is Result.DEAD:
        extra["dead_outcome"] = str(decision.values["dead_outcome"])
    log.log(level, "charge %s", result.value, extra=extra)
    if result is Result.RETRYING:
        publish_or_leave_to_relay(
            [(claim.id, decision.values["message_id"])], delay_ms=decision.values["delay_ms"]
        )
    return result


def _save(
    claim: _Claim,
    row: dict[str, Any] | None,
    started_at: dt.datetime,
    lookup: ledger.Lookup | None,
    decision: _Decision,
) -> _Moved:
    """Record the call's ``row`` (``None``: no call was made) and the lookup, and move the
    charge on, in one statement after the lookup's."""
    values = dict(decision.values)
    for name in ("last_error", "dead_reason"):
        if isinstance(values.get(name), str):
            values[name] = clean_text(claim.masked(values[name]), 2000)
    if decision.result is Result.RETRYING:
        values["retry_in"] = dt.timedelta(milliseconds=values.pop("delay_ms"))
    if decision.result is Result.DEAD:
        values["lookup_in"] = values.pop("lookup_in", None)
    values["attempt"] = claim.attempt
    # Where the call went; the pin stays its group unless a proof cleared it.
    values.update(endpoint=claim.endpoint, group=claim.group)
    values.setdefault("ledger_group", claim.group)
    values.setdefault("charged_endpoint", claim.endpoint)
    with autocommit() as conn:
        if lookup is not None:
            ledger.record_lookup(conn, claim.id, claim.attempt, lookup, claim.endpoint, claim.group)
        if row is None:
            statement = _NO_CALL[decision.result]
            values["attempts"] = claim.attempt - 1
        else:
            statement = _RECORD[decision.result]
            values.update(row, started_at=started_at)
        params = {"charge_id": claim.id, "call_id": claim.call_id, **values}
        found = statement.execute(conn, params).first()
    return _Moved(False) if found is None else _Moved(True, bool(found.ours), found.was)


def _attempt_row(claim: _Claim, outcome: Outcome, latency_ms: int) -> dict[str, Any]:
    """The values of a call's attempt row, normalized to what the columns take."""
    error = outcome if isinstance(outcome, ProviderError) else None
    return {
        "outcome": _attempt_outcome(outcome),
        "http_status": 200 if error is None else error.status,
        "error_class": None if error is None else error.error_class,
        "error_message": None if error is None else clean_text(claim.masked(str(error)), 2000),
        "answer": None
        if error is None or error.answer is None
        else clean_text(claim.masked(error.answer)),
        "latency_ms": latency_ms,
    }


def _unrecordable(
    claim: _Claim,
    outcome: Outcome | None,
    exc: Exception,
    started_at: dt.datetime,
    latency_ms: int,
    way: tuple[ProviderClient, ProviderGate],
) -> Result:
    """The database refused the record itself (not for being down): the call's row says
    so in words the columns always take, and the charge goes dead after a lookup, never
    round again on an answer it cannot store."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    problem = f"{type(cause).__name__} ({getattr(cause, 'pgcode', None)})"
    log.error(
        "the provider's answer could not be recorded: the database refused it with %s; the "
        "charge goes dead after a lookup by key",
        problem,
        extra=_extra(claim, "unrecorded", latency_ms=latency_ms),
    )
    decision = _dead(f"the provider's answer could not be recorded: {problem}")
    lookup = None if claim.past_retention else _look_up_again(claim, *way)
    decision = _after_lookup(decision, lookup, _pending_calls_s(claim))
    row = None
    if outcome is not None:  # what the columns always take
        row = {
            "outcome": A.UNRECORDED,
            "http_status": None,
            "error_class": "unrecordable_answer",
            "error_message": f"the answer could not be stored: {problem}",
            "answer": None,
            "latency_ms": latency_ms,
        }
    try:
        moved = _save(claim, row, started_at, lookup, decision)
    except Exception as again:
        log.error(
            "not even the plain record could be written (%s); the charge is taken up again "
            "when its lease runs out, and goes dead without a call once its attempts are used",
            _first_line(again),
            extra=_extra(claim, "unrecorded"),
        )
        return Result.UNRECORDED
    return decision.result if moved.ours else Result.LEASE_LOST


#: A claim given back before its call: no attempt used, the call's row gone (nothing was
#: sent), the charge due again under a fresh message.
# Not "call_id" (SET call_id takes it) nor "holder" (a column of charges since 0006).
_CALL = bindparam("own_call", type_=charges.c.call_id.type)
#: Another request of the charge went to the group it is pinned to.
_SENT_TO_PIN = exists().where(
    charge_attempts.c.charge_id == charges.c.id,
    charge_attempts.c.kind == AttemptKind.CHARGE,
    charge_attempts.c.ledger_group == charges.c.ledger_group,
    charge_attempts.c.call_id != _CALL,
)
_UNCLAIM = (
    update(charges)
    .where(
        charges.c.id == bindparam("charge_id"),
        charges.c.status == S.PROCESSING,
        charges.c.call_id == _CALL,
    )
    .values(
        status=S.RETRYING,
        attempts=charges.c.attempts - 1,
        lease_expires_at=None,
        call_id=None,
        # The claim's pin goes too, unless another request of it went to that group.
        ledger_group=case(
            (_SENT_TO_PIN, charges.c.ledger_group),
            else_=null(),
        ),
        next_attempt_at=func.now(),
        message_id=bindparam("message_id"),
        published_at=func.now(),
        updated_at=func.now(),
    )
    .add_cte(
        charge_attempts.delete()
        .where(
            charge_attempts.c.call_id == _CALL,
            charge_attempts.c.outcome == A.IN_FLIGHT,
        )
        .cte("unsent")
    )
)


def _unclaim(claim: _Claim) -> Result:
    """The fleet slot lapsed between the gate and the call (this process was frozen past
    its lease): no call without a slot. The claim is given back and the charge deferred."""
    new_id = new_message_id()
    try:
        with autocommit() as conn:
            given = conn.execute(
                _UNCLAIM, {"charge_id": claim.id, "own_call": claim.call_id, "message_id": new_id}
            ).rowcount
    except (PoolTimeout, *DB_UNAVAILABLE):
        given = 0  # the lease brings it back
    if given:
        delay_ms = jitter_ms(200, 1000)
        publish_or_leave_to_relay([(claim.id, new_id)], delay_ms=delay_ms)
        metrics.DEFERRALS.labels(Cause.FLEET_SLOT_LOST).inc()
    log.warning(
        "fleet slot lost before the call (this process stalled past FLEET_SLOT_LEASE_S): "
        "nothing sent, the charge deferred with no attempt used",
        extra=_extra(claim, "deferred"),
    )
    return Result.DEFERRED


def _not_sent(claim: _Claim, settings: Settings) -> Result:
    """Frozen between the claim and the call, past the point where a request could still
    reach the provider within the lease: nothing is sent. The call's row says so; the
    charge is left to whoever takes it over (the relay sends it again)."""
    log.warning(
        "claim too old to send (its worker stalled %g s or more since the claim): not "
        "sent; the charge is taken up again after its lease",
        settings.charge_lease_s - settings.payment_timeout_s,
        extra=_extra(claim, "not_sent"),
    )
    try:
        with autocommit() as conn:
            conn.execute(
                _ATTEMPT,
                {
                    "charge_id": claim.id,
                    "call_id": claim.call_id,
                    "attempt": claim.attempt,
                    "endpoint": claim.endpoint,
                    "group": claim.group,
                    "started_at": dt.datetime.now(dt.UTC),
                    "outcome": A.NOT_SENT,
                    "http_status": None,
                    "error_class": None,
                    "error_message": "not sent: the worker stalled past its lease after the claim",
                    "answer": None,
                    "latency_ms": 0,
                },
            )
    except (PoolTimeout, *DB_UNAVAILABLE):
        pass  # its row stays in flight, marked abandoned when the charge is claimed again
    return Result.NOT_SENT


def _look_up_again(
    claim: _Claim, provider: ProviderClient, gate: ProviderGate
) -> ledger.Lookup | None:
    """A lookup by key outside the call's slot: through the gate, ``None`` if it says wait."""
    entry = gate.enter()
    if isinstance(entry, Wait):
        return None
    lookup: ledger.Lookup | None = None
    try:
        lookup = ledger.look_up(provider, claim.key)
    finally:
        gate.leave(entry, lookup.error if lookup is not None else None)
    return lookup


def _fenced(claim: _Claim, decision: _Decision, moved: _Moved, extra: dict[str, Any]) -> None:
    """This call lost its claim (taken over, or the claim lost in a crash). Its row is
    written; a 200 or 402 it got (or its lookup found) settled the charge all the same,
    in the record's own statement."""
    if moved.moved:
        log.warning(
            "lease lost, but the provider's answer settled the charge: %s -> %s (audited)",
            moved.was,
            decision.result.value,
            extra=extra,
        )
    elif decision.result in (Result.SUCCEEDED, Result.FAILED):
        _check_agrees(claim, decision)
    else:
        log.warning(
            "lease lost: another worker took this charge over, or a database crash lost "
            "the claim; the attempt is recorded, the charge is left as the row has it",
            extra=extra,
        )


def _check_agrees(claim: _Claim, decision: _Decision) -> None:
    """The charge was settled already: say so if the provider's answer disagrees with it."""
    try:
        with autocommit() as conn:
            row = conn.execute(
                select(charges.c.status, charges.c.provider_charge_id).where(
                    charges.c.id == claim.id
                )
            ).first()
    except (PoolTimeout, *DB_UNAVAILABLE):
        return
    expected = S.SUCCEEDED if decision.result is Result.SUCCEEDED else S.FAILED
    provider_id = decision.values.get("provider_charge_id")
    if row is not None and (row.status != expected or row.provider_charge_id != provider_id):
        log.error(
            "the provider's answer disagrees with a settled charge: payq has it %s (%s), the "
            "provider answered %s (%s); check it at the provider",
            row.status,
            row.provider_charge_id,
            expected.value,
            provider_id,
            extra=_extra(claim, "disagrees"),
        )


def _attempt_outcome(outcome: Outcome) -> AttemptOutcome:
    if isinstance(outcome, ProviderCharge):
        return A.SUCCEEDED
    if isinstance(outcome, CardDeclined):
        return A.DECLINED
    if isinstance(outcome, FinalProviderError):
        return A.REJECTED
    if isinstance(outcome, ProviderConnectionRefused):
        return A.REFUSED
    if outcome.status is None:
        return A.NO_ANSWER
    # 429 charges nothing by the contract; a 5xx, a 409 "in use" or an odd answer does
    # not say (real providers sometimes charge, then fail).
    return A.NO_CHARGE if outcome.status == 429 else A.UNCLEAR


def _extra(
    claim: _Claim,
    outcome: str,
    *,
    latency_ms: int | None = None,
    error: ProviderError | None = None,
) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "charge_id": str(claim.id),
        "attempt": claim.attempt,
        "outcome": outcome,
    }
    if latency_ms is not None:
        extra["latency_ms"] = latency_ms
    if error is not None:
        extra["error_class"] = error.error_class
        extra["http_status"] = error.status
    return extra
