"""How the chaos run takes its figures (the package docstring says why each is fair).

A thread samples ``pg_stat_activity``; the rest reads what the run left behind: the
simulator's log of every charge request, the database's attempts, the relay's log.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from payq.constants import FINAL_STATUSES, AttemptKind, AttemptOutcome, ChargeStatus, DeadOutcome
from payq.models import charge_attempts, charges
from payq.settings import Settings

__all__ = [
    "RATE_WINDOW_S",
    "RETRY_AFTER_TOLERANCE_S",
    "ConnectionSampler",
    "Kill",
    "Recovery",
    "across_groups",
    "claimed_before",
    "cross_group_charges",
    "killed_in_flight",
    "ledger",
    "outage_calls",
    "relay_republished",
    "retry_after",
]

#: The window before the outage whose call rate says what the outage would have seen.
RATE_WINDOW_S = 5.0
#: How early a request after a 429 may arrive and still count as honouring Retry-After.
RETRY_AFTER_TOLERANCE_S = 0.0
SAMPLE_INTERVAL_S = 0.1
APP_CONNECTIONS = (
    "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
    "AND (application_name LIKE 'payq-worker-%' OR application_name LIKE 'payq-relay-%')"
)
#: What `producers.relay` logs after a pass that published charges again.
_RELAY_LINE = re.compile(r"\((\d+) lost messages, (\d+) expired leases\)")


class ConnectionSampler(threading.Thread):
    """Counts the app's connections in ``pg_stat_activity`` every 100 ms, keeping the max.

    It goes on through the PostgreSQL restart (the engine reconnects); samples that
    could not be taken meanwhile are counted in ``missed``.
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="payq-chaos-sampler", daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.samples = 0
        self.missed = 0
        self.latest = 0
        self.max_total = 0
        self.max_per_process = 0  # pooled connections of one worker process

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + SAMPLE_INTERVAL_S, time.monotonic())
            try:
                with self.engine.connect() as conn:
                    names = list(conn.execute(text(APP_CONNECTIONS)).scalars())
            except SQLAlchemyError:
                self.missed += 1
                continue
            pooled = Counter(n for n in names if n.removeprefix("payq-worker-").isdigit())
            self.samples += 1
            self.latest = len(names)
            self.max_total = max(self.max_total, len(names))
            self.max_per_process = max(self.max_per_process, *pooled.values(), 0)


@dataclass(frozen=True)
class Kill:
    """One SIGKILL, and the (charge, attempt) pairs claimed just before it (None: unknown)."""

    at: float  # time.time()
    group: str
    pid: int
    claimed: list[tuple[uuid.UUID, int]] | None


def claimed_before(engine: Engine, settings: Settings, at: float) -> list[tuple[uuid.UUID, int]]:
    """Charges in ``processing`` claimed within one provider deadline (+1 s) before ``at``.

    A claim sets ``lease_expires_at`` to the claim's time plus ``CHARGE_LEASE_S``.
    Raises ``SQLAlchemyError`` when PostgreSQL does not answer.
    """
    lease = dt.timedelta(seconds=settings.charge_lease_s)
    window = dt.timedelta(seconds=settings.payment_timeout_s + 1)
    killed = dt.datetime.fromtimestamp(at, dt.UTC)
    with engine.connect() as conn:
        rows = conn.execute(
            select(charges.c.id, charges.c.attempts).where(
                charges.c.status == ChargeStatus.PROCESSING,
                charges.c.lease_expires_at <= killed + lease,
                charges.c.lease_expires_at > killed + lease - window,
            )
        ).all()
    return [(row.id, row.attempts) for row in rows]


@dataclass(frozen=True)
class Recovery:
    """A charge whose attempt died with a killed process, and how long it took to recover."""

    charge_id: uuid.UUID
    takeover_s: float | None  # kill -> its next attempt started (None: none yet)
    final_s: float | None  # kill -> it reached its final state (None: not final)


def killed_in_flight(engine: Engine, kills: list[Kill]) -> list[Recovery]:
    """The charges claimed before a kill whose attempt was never recorded.

    Attempts of other processes, and those of the killed group's other process (which
    drains when its master stops it), are recorded; the killed process's never are.
    """
    claimed: dict[tuple[uuid.UUID, int], float] = {}
    for kill in kills:
        for pair in kill.claimed or []:
            claimed.setdefault(pair, kill.at)
    if not claimed:
        return []
    ids = list({cid for cid, _ in claimed})
    with engine.connect() as conn:
        # Calls whose worker recorded an answer (a killed one's row stays in flight until
        # the next claim marks it abandoned).
        tried = conn.execute(
            select(
                charge_attempts.c.charge_id, charge_attempts.c.number, charge_attempts.c.started_at
            ).where(
                charge_attempts.c.charge_id.in_(ids),
                charge_attempts.c.kind == AttemptKind.CHARGE,
                charge_attempts.c.outcome.not_in(
                    [AttemptOutcome.IN_FLIGHT, AttemptOutcome.ABANDONED]
                ),
            )
        ).all()
        ended = {
            row.id: row.updated_at.timestamp()
            for row in conn.execute(
                select(charges.c.id, charges.c.updated_at).where(
                    charges.c.id.in_(ids), charges.c.status.in_(list(FINAL_STATUSES))
                )
            )
        }
    recorded = {(row.charge_id, row.number) for row in tried}
    lost = []
    for (cid, number), killed_at in claimed.items():
        if (cid, number) in recorded:
            continue
        later = [
            r.started_at.timestamp() for r in tried if r.charge_id == cid and r.number > number
        ]
        end = ended.get(cid)
        lost.append(
            Recovery(
                cid,
                min(later) - killed_at if later else None,
                end - killed_at if end is not None else None,
            )
        )
    return lost


def retry_after(log: list[dict[str, Any]]) -> tuple[int, int, float | None]:
    """(429s answered with Retry-After, next requests that came too early, least slack ms).

    ``log`` is the simulator's ``/_requests/all``: arrival (``at``) and end of answer
    (``ended_at``) by the same clock.
    """
    by_key: dict[str, list[dict[str, Any]]] = {}
    for record in log:
        by_key.setdefault(record["idempotency_key"], []).append(record)
    limited = violations = 0
    slack_ms: float | None = None
    for records in by_key.values():
        for i, prev in enumerate(records):
            wait_s = prev.get("retry_after_s")
            if prev.get("status") != 429 or wait_s is None or prev.get("ended_at") is None:
                continue
            limited += 1
            if i + 1 == len(records):
                continue  # nothing came after it
            early_s = prev["ended_at"] + wait_s - records[i + 1]["at"]
            slack_ms = min(-early_s * 1000, slack_ms if slack_ms is not None else float("inf"))
            if early_s > RETRY_AFTER_TOLERANCE_S:
                violations += 1
    return limited, violations, slack_ms


def outage_calls(
    log: list[dict[str, Any]], started: float | None, outage_s: float
) -> tuple[int, float]:
    """(calls the simulator answered as the outage, calls the pre-outage rate predicts)."""
    if started is None:
        return 0, 0.0
    during = sum(1 for record in log if record.get("fault") == "outage")
    before = sum(1 for record in log if started - RATE_WINDOW_S <= record["at"] < started)
    return during, before / RATE_WINDOW_S * outage_s


def relay_republished(log: Path) -> tuple[int, int]:
    """(lost messages, expired leases) the relay published again, from its log lines."""
    found = _RELAY_LINE.findall(log.read_text(errors="replace"))
    return sum(int(lost) for lost, _ in found), sum(int(leases) for _, leases in found)


def across_groups(
    books: list[list[dict[str, Any]]], logs: list[list[dict[str, Any]]]
) -> dict[str, int]:
    """From the providers' side: ``cross_group_charges``, keys charged by more than one
    provider (must be 0); ``moved``, keys whose charge requests reached more than one."""
    asked = Counter(key for log in logs for key in {r["idempotency_key"] for r in log})
    return {
        "cross_group_charges": cross_group_charges(books),
        "moved": sum(1 for n in asked.values() if n > 1),
    }


def cross_group_charges(books: list[list[dict[str, Any]]]) -> int:
    """Keys that more than one provider's books hold as charged (must be 0)."""
    charged = Counter(
        b["idempotency_key"] for book in books for b in book if b["status"] == "succeeded"
    )
    return sum(1 for n in charged.values() if n > 1)


def ledger(
    engine: Engine, books: list[dict[str, Any]], log: list[dict[str, Any]]
) -> dict[str, int]:
    """payq's books against the provider's, every charge.

    ``phantom``: charged at the provider (``/_charges``) but not ``succeeded`` in payq
    with that charge's id. ``mismatch``: any other disagreement (declined there but not
    ``failed`` here; ``succeeded`` here with no charge there). ``unknown_dead``: dead of
    unknown outcome. ``unrecorded_calls``: charge requests the provider saw (its request
    log, by key) beyond the calls payq has a row for.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                charges.c.id,
                charges.c.idempotency_key,
                charges.c.status,
                charges.c.provider_charge_id,
                charges.c.dead_outcome,
            )
        ).all()
        calls: dict[uuid.UUID, int] = dict(
            conn.execute(
                select(charge_attempts.c.charge_id, func.count())
                .where(charge_attempts.c.kind == AttemptKind.CHARGE)
                .group_by(charge_attempts.c.charge_id)
            ).all()
        )
    booked = {b["idempotency_key"]: b for b in books}
    sent = Counter(record["idempotency_key"] for record in log)
    phantom = mismatch = unknown = unrecorded = 0
    for row in rows:
        book = booked.get(row.idempotency_key)
        if book is not None and book["status"] == "succeeded":
            if (row.status, row.provider_charge_id) != (ChargeStatus.SUCCEEDED, book["id"]):
                phantom += 1
        elif book is not None:
            mismatch += row.status != ChargeStatus.FAILED
        else:
            mismatch += row.status in (ChargeStatus.SUCCEEDED, ChargeStatus.FAILED)
        unknown += row.dead_outcome == DeadOutcome.UNKNOWN
        unrecorded += max(0, sent[row.idempotency_key] - calls.get(row.id, 0))
    return {
        "phantom": phantom,
        "ledger_mismatch": mismatch,
        "unknown_dead": unknown,
        "unrecorded_calls": unrecorded,
    }
