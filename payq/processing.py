"""One attempt at one charge: claim, call the provider, record, move on.

This is the business rule the worker's actor runs; it holds no database
connection during the provider call, and every state change is one guarded
``UPDATE`` statement, committed on its own (autocommit: no BEGIN or COMMIT round
trips), so duplicate deliveries and late workers cannot charge twice or overwrite
each other:

    claim     pending | retrying (due) | processing (lease ran out)  ->  processing
    record    processing (same attempt number)  ->  succeeded | failed | retrying | dead

A retry is a delayed message published after the commit; if that publish is
lost, the relay publishes the charge again once it is overdue.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Interval, Update, and_, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from payq import metrics
from payq.broker import new_message_id, publish_or_leave_to_relay, queued
from payq.constants import FINAL_STATUSES, ChargeStatus
from payq.db import Prepared, autocommit, get_engine
from payq.errors import (
    CardDeclined,
    FinalProviderError,
    PayqError,
    ProviderError,
    RetryableProviderError,
)
from payq.gate import ProviderGate, Wait, get_gate, jitter_ms
from payq.models import charge_attempts, charges
from payq.provider import ProviderCharge, ProviderClient, charge_body, get_provider
from payq.retry_policy import RetryPolicy
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


class UnknownCharge(PayqError):
    """A message named a charge that does not exist: it cannot be processed at all."""


class Result(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    DEAD = "dead"
    SKIPPED = "skipped"  # already claimed, final, or not yet due
    DEFERRED = "deferred"  # must wait (early, breaker, fleet, database): sent again for later
    LEASE_LOST = "lease_lost"  # another worker took over while we called
    UNRECORDED = "unrecorded"  # the database did not answer; the lease brings it back


# The statements of the hot path are built once, here, with a bind parameter for every
# per-call value. Building a Core construct on every call (coercing each argument, then
# computing its cache key) was most of the worker CPU that claiming and recording took.
# The claim and the record are also prepared on each connection (``db.Prepared``):
# PostgreSQL parses and plans them once, and a call sends only the values. The SQL is
# what the inline constructs produced: times are PostgreSQL's ``now()``, intervals are
# bound as ``datetime.timedelta``.

#: Take a charge for one attempt, if it is free: pending, a retry that is due, or
#: processing under a lease that ran out. ``old``: created before the key retention.
#: Not durable: its commit does not wait for the WAL flush. A claim lost in a PostgreSQL
#: crash leaves the charge as it was; its record then finds no claim (lease lost), the
#: relay sends the charge again, and the next attempt's call carries the same key, so
#: the provider replays its answer. The record is durable, and flushes the claim with it.
_CLAIM = Prepared(
    "claim",
    update(charges)
    .where(
        charges.c.id == bindparam("charge_id"),
        or_(
            charges.c.status == S.PENDING,
            and_(charges.c.status == S.RETRYING, charges.c.next_attempt_at <= func.now()),
            and_(charges.c.status == S.PROCESSING, charges.c.lease_expires_at < func.now()),
        ),
    )
    .values(
        status=S.PROCESSING,
        attempts=charges.c.attempts + 1,
        lease_expires_at=func.now() + bindparam("lease", type_=Interval),
        updated_at=func.now(),
    )
    .returning(
        charges.c.id,
        charges.c.attempts,
        charges.c.retry_base,
        charges.c.idempotency_key,
        charges.c.amount,
        charges.c.currency,
        charges.c.source,
        charges.c.description,
        charges.c.metadata,
        (charges.c.created_at < func.now() - bindparam("key_retention", type_=Interval)).label(
            "old"
        ),
    ),
    durable=False,
)

#: What a charge that could not be claimed is doing, and in how long a retry is due.
_NOT_CLAIMED = select(
    charges.c.status,
    charges.c.message_id,
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

#: One provider call's row; a retry after a commit whose answer was lost finds it there.
_ATTEMPT = (
    pg_insert(charge_attempts)
    .values(
        charge_id=bindparam("charge_id"),
        number=bindparam("attempt"),
        started_at=bindparam("started_at"),
        finished_at=func.now(),
        outcome=bindparam("outcome"),
        http_status=bindparam("http_status"),
        error_class=bindparam("error_class"),
        error_message=bindparam("error_message"),
        latency_ms=bindparam("latency_ms"),
    )
    .on_conflict_do_nothing(constraint="uq_charge_attempts_charge_id_number")
    .cte("attempt")
)


def _finish_statement(status: ChargeStatus, *columns: str, **expressions: Any) -> Update:
    """Move a claimed charge to ``status``, only if this attempt still holds it.

    ``columns`` are set from bind parameters of the same name, ``expressions`` as given.
    """
    return (
        update(charges)
        .where(
            charges.c.id == bindparam("charge_id"),
            charges.c.status == S.PROCESSING,
            charges.c.attempts == bindparam("attempt"),
        )
        .values(
            status=status,
            lease_expires_at=None,
            updated_at=func.now(),
            **{column: bindparam(column) for column in columns},
            **expressions,
        )
    )


_ERRORS = ("last_error", "last_error_class")
#: Record an attempt and move its charge on, in one statement, by where the outcome took
#: it. PostgreSQL runs the INSERT in ``WITH`` to completion whether or not the guarded
#: UPDATE matches: an attempt whose worker lost its lease is still recorded, as it was made.
_RECORD: dict[Result, Prepared] = {
    Result.SUCCEEDED: Prepared(
        "succeeded", _finish_statement(S.SUCCEEDED, "provider_charge_id").add_cte(_ATTEMPT)
    ),
    Result.FAILED: Prepared(
        "failed",
        _finish_statement(S.FAILED, "provider_charge_id", "decline_code", *_ERRORS).add_cte(
            _ATTEMPT
        ),
    ),
    Result.DEAD: Prepared(
        "dead", _finish_statement(S.DEAD, "dead_reason", *_ERRORS).add_cte(_ATTEMPT)
    ),
    Result.RETRYING: Prepared(
        "retrying",
        _finish_statement(
            S.RETRYING,
            "message_id",
            *_ERRORS,
            next_attempt_at=func.now() + bindparam("retry_in", type_=Interval),
            published_at=func.now(),
        ).add_cte(_ATTEMPT),
    ),
}
#: A charge claimed past the key retention: dead without a call, the claim's count undone.
_EXPIRE = Prepared("expire", _finish_statement(S.DEAD, "dead_reason", "attempts"))


@dataclass(frozen=True, slots=True)
class _Claim:
    id: uuid.UUID
    attempt: int  # the attempt's number, counted over the charge's whole life
    budget_used: int  # attempts since the last operator replay, this one included
    key: str
    source: str
    body: bytes
    expired: bool

    def masked(self, text: str) -> str:
        """Provider messages may echo the payment token: it is not stored with them."""
        return text.replace(self.source, "[source]") if self.source else text


def process_charge(
    charge_id: str,
    *,
    message_id: str | None = None,
    settings: Settings | None = None,
    provider: ProviderClient | None = None,
    gate: ProviderGate | None = None,
) -> Result:
    """Make at most one provider attempt for this charge and record what happened.

    The breaker and the fleet limit are asked first, the database second: a charge
    that must wait is deferred before it is claimed, so waiting never uses an attempt.
    """
    settings = settings or get_settings()
    try:
        cid = uuid.UUID(charge_id)
    except (ValueError, TypeError, AttributeError):
        raise UnknownCharge(f"message names no charge: {charge_id!r} is not a charge id") from None

    gate = gate or get_gate()
    entry = gate.enter()
    if isinstance(entry, Wait):
        return _defer(cid, message_id, entry.cause, entry.delay_ms, entry.detail)
    outcome: ProviderCharge | ProviderError | None = None
    elapsed_s = 0.0
    try:
        try:
            with autocommit() as conn:  # each statement is atomic on its own
                claim = _claim(conn, cid, settings)
                if claim is None:
                    result, redo_in_ms = _not_claimed(conn, cid, message_id)
                elif claim.expired:
                    return _expire(conn, claim, settings)
        except PoolTimeout:
            _pool_exhausted(cid, settings)
            delay_ms = jitter_ms(500, 2000)
            return _defer(cid, message_id, "db_pool", delay_ms, "no database connection")
        except DB_UNAVAILABLE as exc:
            log.warning(
                "database unavailable at claim (%s); charge deferred",
                _first_line(exc),
                extra={"charge_id": str(cid), "cause": "database"},
            )
            delay_ms = jitter_ms(1000, 3000)
            return _defer(cid, message_id, "database", delay_ms, "database unavailable")
        if claim is None:
            if redo_in_ms is not None and message_id is not None:
                # The scheduled retry itself came early (clocks differ between hosts): send
                # it again for when it is due rather than call before Retry-After.
                return _defer(cid, message_id, "early_message", redo_in_ms, "retry came early")
            return result

        tag_charge(str(claim.id), claim.attempt)
        started_at = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        try:
            outcome = (provider or get_provider()).create_charge(claim.key, claim.body)
        except ProviderError as exc:
            outcome = exc
        elapsed_s = time.monotonic() - t0
    finally:
        gate.leave(entry, outcome, int(elapsed_s * 1000))
    assert outcome is not None
    metrics.PROVIDER_LATENCY.observe(elapsed_s)
    metrics.ATTEMPTS.labels(
        "none" if isinstance(outcome, ProviderCharge) else outcome.error_class
    ).inc()
    return _record(claim, outcome, started_at, int(elapsed_s * 1000), settings)


def _defer(
    cid: uuid.UUID, message_id: str | None, cause: str, delay_ms: int, detail: str
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
    if message_id is not None and cause not in ("db_pool", "database"):
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
    level = logging.DEBUG if cause == "fleet_full" else logging.INFO
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
        extra={"charge_id": str(cid), "cause": "db_pool", **figures},
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _expire(conn: Connection, claim: _Claim, settings: Settings) -> Result:
    _finish(
        conn,
        _EXPIRE,
        claim,
        dead_reason=(
            f"older than the provider's idempotency-key retention "
            f"({settings.provider_idempotency_ttl_s} s): not sent again, since the provider "
            "may have forgotten the key and charge twice; reconcile or decide by hand"
        ),
        attempts=claim.attempt - 1,
    )
    log.error("charge dead: key retention passed", extra=_extra(claim, "dead"))
    return Result.DEAD


def _claim(conn: Connection, cid: uuid.UUID, settings: Settings) -> _Claim | None:
    params = {
        "charge_id": cid,
        "lease": dt.timedelta(seconds=settings.charge_lease_s),
        "key_retention": dt.timedelta(seconds=settings.provider_idempotency_ttl_s),
    }
    row = _CLAIM.execute(conn, params).mappings().first()
    if row is None:
        return None
    return _Claim(
        id=row["id"],
        attempt=row["attempts"],
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
        # Only a charge the provider may already have seen is at risk of a second charge.
        expired=bool(row["old"]) and row["attempts"] > 1,
    )


def _not_claimed(
    conn: Connection, cid: uuid.UUID, message_id: str | None
) -> tuple[Result, int | None]:
    """Why a charge could not be claimed, and when to try again if this message is early."""
    row = conn.execute(_NOT_CLAIMED, {"charge_id": cid}).mappings().first()
    if row is None:
        raise UnknownCharge(f"no charge with id {cid}")
    early = row["status"] == S.RETRYING and (row["due_in_ms"] or 0) > 0
    if early and message_id is not None and message_id == row["message_id"]:
        return Result.DEFERRED, int(row["due_in_ms"]) + 1
    log.info(
        "message skipped: charge is %s",
        row["status"],
        extra={"charge_id": str(cid), "status": row["status"]},
    )
    return Result.SKIPPED, None


def _record(
    claim: _Claim,
    outcome: ProviderCharge | ProviderError,
    started_at: dt.datetime,
    latency_ms: int,
    settings: Settings,
) -> Result:
    error = outcome if isinstance(outcome, ProviderError) else None
    extra = _extra(claim, "recording", latency_ms=latency_ms, error=error)
    try:
        for attempt in Retrying(
            retry=retry_if_exception_type((PoolTimeout, *DB_UNAVAILABLE)),
            stop=stop_after_delay(RECORD_RETRY_S) | stop_after_attempt(5),
            wait=wait_exponential(multiplier=0.2, max=1.0),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.warning("database unavailable: recording the attempt again", extra=extra)
                saved = _save(claim, outcome, started_at, latency_ms, settings)
    except (PoolTimeout, *DB_UNAVAILABLE) as exc:
        # The provider has answered and the answer is lost with this attempt. The lease
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
    result, done, message_id, publish_delay_ms = saved
    extra = _extra(claim, result.value, latency_ms=latency_ms, error=error)
    if not done:
        log.warning(
            "lease lost: another worker took this charge over, or a database crash lost "
            "the claim; the attempt is recorded, the charge is left as the row has it",
            extra=extra,
        )
        return Result.LEASE_LOST
    metrics.CHARGES.labels(result.value).inc()
    # A dead charge needs a person: ERROR (which Sentry, when on, reports as an event).
    level = {Result.DEAD: logging.ERROR, Result.RETRYING: logging.WARNING}.get(result, logging.INFO)
    log.log(level, "charge %s", result.value, extra=extra)
    if publish_delay_ms is not None and message_id is not None:
        publish_or_leave_to_relay([(claim.id, message_id)], delay_ms=publish_delay_ms)
    return result


def _save(
    claim: _Claim,
    outcome: ProviderCharge | ProviderError,
    started_at: dt.datetime,
    latency_ms: int,
    settings: Settings,
) -> tuple[Result, bool, str | None, int | None]:
    """Record the attempt and move the charge on, in one statement (atomic on its own)."""
    error = outcome if isinstance(outcome, ProviderError) else None
    result, values = _next_state(outcome, claim.budget_used, RetryPolicy.from_settings(settings))
    for field in ("last_error", "dead_reason"):
        if isinstance(values.get(field), str):
            values[field] = claim.masked(values[field])
    publish_delay_ms: int | None = None
    message_id: str | None = None
    if result is Result.RETRYING:
        message_id = values["message_id"]
        publish_delay_ms = values.pop("delay_ms")
        values["retry_in"] = dt.timedelta(milliseconds=publish_delay_ms)
    with autocommit() as conn:
        done = _finish(
            conn,
            _RECORD[result],
            claim,
            started_at=started_at,
            outcome=_attempt_outcome(outcome),
            http_status=200 if error is None else error.status,
            error_class=None if error is None else error.error_class,
            error_message=None if error is None else claim.masked(str(error))[:2000],
            latency_ms=latency_ms,
            **values,
        )
    return result, done, message_id, publish_delay_ms


def _next_state(
    outcome: ProviderCharge | ProviderError, attempt: int, policy: RetryPolicy
) -> tuple[Result, dict[str, Any]]:
    """Where one attempt's outcome takes the charge, exactly as provider-api.md says."""
    if isinstance(outcome, ProviderCharge):
        return Result.SUCCEEDED, {"provider_charge_id": outcome.id}
    errors = {"last_error": str(outcome)[:2000], "last_error_class": outcome.error_class}
    if isinstance(outcome, CardDeclined):
        return Result.FAILED, {
            "provider_charge_id": outcome.provider_charge_id,
            "decline_code": outcome.code,
            **errors,
        }
    if isinstance(outcome, FinalProviderError):
        return Result.DEAD, {"dead_reason": f"{outcome.error_class}: {outcome}", **errors}
    assert isinstance(outcome, RetryableProviderError)
    if policy.exhausted(attempt):
        reason = (
            f"attempts exhausted ({attempt} of {policy.max_attempts}); last error "
            f"{outcome.error_class}: {outcome}"
        )
        return Result.DEAD, {"dead_reason": reason, **errors}
    delay_ms = int(policy.delay_s(attempt, outcome.retry_after_s) * 1000) + 1
    return Result.RETRYING, {"delay_ms": delay_ms, "message_id": new_message_id(), **errors}


def _finish(conn: Connection, statement: Prepared, claim: _Claim, **values: Any) -> bool:
    """Run one of the guarded finishing statements; whether this attempt still held the charge.

    ``values`` are the statement's own bind parameters; the columns it sets were fixed
    when it was built (``_finish_statement``).
    """
    done = statement.execute(conn, {"charge_id": claim.id, "attempt": claim.attempt, **values})
    return done.rowcount == 1


def _attempt_outcome(outcome: ProviderCharge | ProviderError) -> str:
    if isinstance(outcome, ProviderCharge):
        return "succeeded"
    if isinstance(outcome, CardDeclined):
        return "declined"
    if isinstance(outcome, FinalProviderError):
        return "rejected"
    return "no_charge" if outcome.status is not None else "no_answer"


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
