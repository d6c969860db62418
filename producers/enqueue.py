"""Enqueueing charges: validate, insert (idempotently), commit, then publish."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, event, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, SessionTransaction

from payq.broker import new_message_id, publish_or_leave_to_relay
from payq.constants import ChargeStatus
from payq.db import autocommit, database_problem, transaction
from payq.errors import ChargeInputError, ChargeNotFound, IdempotencyConflict, ServiceUnavailable
from payq.models import Charge, charges
from payq.settings import get_settings
from payq.validation import ChargeRequest, validate_charge

#: The provider's limit on an idempotency key (and the column's).
KEY_MAX_CHARS = 255

__all__ = [
    "EnqueueResult",
    "app_key",
    "enqueue_charge",
    "enqueue_charge_result",
    "enqueue_charges",
    "get_charge",
]

log = logging.getLogger("payq.producer")

_COMPARED = ("amount", "currency", "source", "description", "metadata")
_SESSION_KEY = "payq_unpublished"

# The columns an enqueue writes (the keys of ``_row``); the database fills those with a
# server default (attempts, created_at, ...), and every other column starts NULL.
_WRITTEN = (
    "id",
    "idempotency_key",
    "amount",
    "currency",
    "source",
    "description",
    "metadata",
    "status",
    "message_id",
)
_FILLED = tuple(c for c in charges.c if c.name not in _WRITTEN and c.server_default is not None)
_LEFT_NULL: dict[str, None] = {
    c.name: None for c in charges.c if c.name not in _WRITTEN and c.server_default is None
}

# Built once and executed with bound values (one dict, or a list for a batch), so that
# SQLAlchemy compiles each only once per process: building ``insert().values(rows)``
# anew on every call cost more than the insert itself. RETURNING only what the database
# filled in; a key already taken returns no row, and is then read with ``_SELECT_BY_KEYS``.
_INSERT = (
    insert(charges)
    .on_conflict_do_nothing(index_elements=[charges.c.idempotency_key])
    .returning(charges.c.idempotency_key, *_FILLED)
)
_SELECT_BY_KEYS = select(charges).where(
    charges.c.idempotency_key.in_(bindparam("keys", expanding=True))
)


def enqueue_charge(
    amount: int,
    currency: str,
    source: str,
    idempotency_key: str,
    description: str | None = None,
    metadata: Mapping[str, str] | None = None,
    session: Session | None = None,
) -> Charge:
    """Create a charge (or return the one this key already made) and queue it.

    Raises ``ChargeInputError`` (nothing written) for bad input,
    ``IdempotencyConflict`` when the key belongs to a charge with other parameters,
    ``ServiceUnavailable`` when PostgreSQL does not answer (nothing written).
    If Redis does not answer after the commit, the charge is kept and the relay
    publishes it.
    """
    request = _one(amount, currency, source, idempotency_key, description, metadata)
    return enqueue_charges([request], session=session)[0]


def _one(
    amount: int,
    currency: str,
    source: str,
    idempotency_key: str,
    description: str | None,
    metadata: Mapping[str, str] | None,
) -> ChargeRequest:
    """One charge's parameters, validated, as ``enqueue_charges`` takes them."""
    return _validate(
        {
            "amount": amount,
            "currency": currency,
            "source": source,
            "idempotency_key": idempotency_key,
            "description": description,
            "metadata": dict(metadata) if isinstance(metadata, Mapping) else metadata,
        }
    )


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """A charge, and whether this call created it (False: an earlier call with the
    same key and the same parameters did)."""

    charge: Charge
    created: bool


def enqueue_charge_result(
    amount: int,
    currency: str,
    source: str,
    idempotency_key: str,
    description: str | None = None,
    metadata: Mapping[str, str] | None = None,
    app: str | None = None,
) -> EnqueueResult:
    """``enqueue_charge``, also saying whether this call created the charge.

    For callers that must tell a new charge from a repeat of the same request (the
    HTTP intake answers 201 or 200); same validation, same errors. ``app``: the web app
    that sends it; a key another app used is a conflict that names no charge.
    """
    request = _one(amount, currency, source, idempotency_key, description, metadata)
    if app is not None:
        request = dataclasses.replace(request, app=app, idempotency_key=_scoped(app, request))
    result, fresh = _enqueue([request], session=None)
    return EnqueueResult(charge=result[0], created=bool(fresh))


def _scoped(app: str, request: ChargeRequest) -> str:
    """An app's key as payq keeps it and sends it to the provider: ``<app>:<key>``. Each
    app has keys of its own: no app can see, block or take another's."""
    scoped = f"{app}:{request.idempotency_key}"
    if len(scoped) > KEY_MAX_CHARS:
        raise ChargeInputError(
            "idempotency_key",
            f"must be at most {KEY_MAX_CHARS - len(app) - 1} characters for the app {app!r} "
            f"(its keys are kept as '{app}:<key>', {KEY_MAX_CHARS} at most)",
        )
    return scoped


def app_key(charge: Charge) -> str:
    """A charge's idempotency key as its app sent it (without the app's prefix)."""
    prefix = f"{charge.app}:"
    key = charge.idempotency_key
    return key.removeprefix(prefix) if charge.app is not None else key


def enqueue_charges(
    requests: Iterable[Mapping[str, Any] | ChargeRequest],
    session: Session | None = None,
) -> list[Charge]:
    """Enqueue many charges in one transaction and one Redis round trip.

    Each request is a mapping with ``enqueue_charge``'s arguments. All are
    validated before anything is written: one bad request refuses the batch.
    Returns the charges in the order given.
    """
    validated = [r if isinstance(r, ChargeRequest) else _validate(r) for r in requests]
    return _enqueue(validated, session)[0]


def _enqueue(
    validated: Sequence[ChargeRequest], session: Session | None
) -> tuple[list[Charge], list[tuple[uuid.UUID, str]]]:
    """Write and publish validated requests; the charges, and (id, message id) of the new ones."""
    _refuse_duplicate_keys(validated)
    if not validated:
        return [], []
    if session is not None:
        # In a savepoint, so that a refused batch leaves the caller's transaction as it was.
        with session.begin_nested():
            result, fresh = _insert(session.connection(), validated)
        _publish_after_commit(session, fresh)
        return result, fresh
    try:
        with _writing(validated) as conn:
            result, fresh = _insert(conn, validated)
    except (OperationalError, PoolTimeout) as exc:
        problem = database_problem(exc)
        if problem is not None and problem[0] == 2:  # it answered: what to fix, not to wait
            raise ServiceUnavailable(f"{problem[1]}; nothing was written") from exc
        raise ServiceUnavailable(
            f"PostgreSQL did not answer ({type(exc).__name__}); nothing was written. Check "
            "DATABASE_URL and that PostgreSQL is running, then enqueue again with the same key."
        ) from exc
    publish_or_leave_to_relay(fresh)
    return result, fresh


@contextmanager
def _writing(requests: Sequence[ChargeRequest]) -> Iterator[Connection]:
    """A connection to write these requests on, in one transaction either way.

    One request is one ``INSERT``, atomic on its own: it runs in autocommit, so that
    PostgreSQL commits it as it answers, without the BEGIN and COMMIT round trips of an
    explicit transaction. The row is committed before anything is published.
    A batch may take several statements (``insertmanyvalues`` pages), so it keeps its
    transaction.
    """
    with transaction() if len(requests) > 1 else autocommit() as conn:
        yield conn


def get_charge(
    charge_id: uuid.UUID | str, session: Session | None = None, *, app: str | None = None
) -> Charge:
    """The charge with this id; raises ``ChargeNotFound``. With ``app``, only a charge that
    app sent: another app's is not found, as if it did not exist."""
    try:
        wanted = uuid.UUID(str(charge_id))
    except ValueError:
        raise ChargeNotFound(str(charge_id)) from None
    query = select(charges).where(charges.c.id == wanted)
    if session is not None:
        row = session.execute(query).mappings().first()
    else:
        with transaction() as conn:
            row = conn.execute(query).mappings().first()
    if row is None or (app is not None and row["app"] != app):
        raise ChargeNotFound(str(charge_id))
    return Charge.from_row(row)


def _validate(fields: Mapping[str, Any]) -> ChargeRequest:
    allowed = {"amount", "currency", "source", "idempotency_key", "description", "metadata"}
    unknown = set(fields) - allowed
    if unknown:
        raise TypeError(f"unknown charge fields: {', '.join(sorted(unknown))}")
    return validate_charge(**fields, max_amount=get_settings().charge_max_amount)


def _refuse_duplicate_keys(requests: Sequence[ChargeRequest]) -> None:
    seen: dict[str, ChargeRequest] = {}
    for request in requests:
        other = seen.setdefault(request.idempotency_key, request)
        if other is not request and other != request:
            raise IdempotencyConflict(
                _hint(request.idempotency_key), "(same batch)", _differing(other, request)
            )


def _insert(
    conn: Connection, requests: Sequence[ChargeRequest]
) -> tuple[list[Charge], list[tuple[uuid.UUID, str]]]:
    """Insert what is new; return every charge, and (id, message id) of the new ones.

    A new charge is built from the values written plus the few the database fills in,
    so the happy path is one statement; only keys that were already taken are read back
    (and compared: same parameters return that charge, others are a conflict).
    """
    rows = list({r.idempotency_key: _row(r) for r in requests}.values())
    by_key: dict[str, Charge] = {}
    fresh: list[tuple[uuid.UUID, str]] = []
    if len(rows) == 1:  # one dict: a plain execute; a list would go through executemany
        filled = conn.execute(_INSERT, rows[0]).mappings().all()
    else:
        filled = conn.execute(_INSERT, rows).mappings().all()
    filled_by_key = {f["idempotency_key"]: f for f in filled}
    for row in rows:
        if (got := filled_by_key.get(row["idempotency_key"])) is not None:
            by_key[row["idempotency_key"]] = _new_charge(row, got)
            fresh.append((row["id"], row["message_id"]))
    if len(by_key) < len(rows):
        taken = [row["idempotency_key"] for row in rows if row["idempotency_key"] not in by_key]
        for existing in conn.execute(_SELECT_BY_KEYS, {"keys": taken}).mappings():
            charge = Charge.from_row(existing)
            by_key[charge.idempotency_key] = charge
        for request in requests:
            charge = by_key[request.idempotency_key]
            if charge.app != request.app:  # another app's: not this caller's to see
                raise IdempotencyConflict(_hint(request.idempotency_key), None, ["app"])
            differing = _differing(charge, request)
            if differing:
                raise IdempotencyConflict(_hint(request.idempotency_key), str(charge.id), differing)
    return [by_key[r.idempotency_key] for r in requests], fresh


def _row(request: ChargeRequest) -> dict[str, Any]:
    """The values ``_INSERT`` writes for one request (a new id and message id)."""
    return {
        "id": uuid.uuid4(),
        "idempotency_key": request.idempotency_key,
        "amount": request.amount,
        "currency": request.currency,
        "source": request.source,
        "description": request.description,
        "metadata": dict(request.metadata),
        "status": ChargeStatus.PENDING.value,
        "message_id": new_message_id(),
        "app": request.app,
    }


def _new_charge(row: Mapping[str, Any], filled: RowMapping) -> Charge:
    """The charge just inserted: what was written, what the database filled in, and
    NULL for every other column (none of them has a default)."""
    values: dict[str, Any] = {**_LEFT_NULL, **row, "status": ChargeStatus.PENDING}
    for column in _FILLED:
        values[column.name] = filled[column.name]
    return Charge(**values)


def _differing(a: Charge | ChargeRequest, b: ChargeRequest) -> list[str]:
    return [name for name in _COMPARED if getattr(a, name) != getattr(b, name)]


def _hint(key: str) -> str:
    """Name a key in an error without echoing all of it (keys can be sensitive)."""
    return repr(key if len(key) <= 12 else key[:8] + "…")


def _publish_after_commit(session: Session, fresh: list[tuple[uuid.UUID, str]]) -> None:
    """Publish when the caller's transaction commits; forget what a rollback undid.

    Each charge is remembered with the (sub)transaction it was written in, so rolling
    back a savepoint forgets only the charges written inside it.
    """
    if not fresh:
        return
    if not session.info.get("payq_listening"):
        session.info["payq_listening"] = True
        event.listen(session, "after_commit", _on_commit)
        event.listen(session, "after_soft_rollback", _on_rollback)
    written_in = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_SESSION_KEY, []).extend((written_in, *pair) for pair in fresh)


def _on_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint was released: not yet committed
        return
    pending = session.info.pop(_SESSION_KEY, [])
    publish_or_leave_to_relay([(cid, mid) for _, cid, mid in pending])


def _on_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    def undone(txn: SessionTransaction | None) -> bool:
        while txn is not None:
            if txn is previous_transaction:
                return True
            txn = txn.parent
        return False

    pending = session.info.get(_SESSION_KEY, [])
    session.info[_SESSION_KEY] = [entry for entry in pending if not undone(entry[0])]
