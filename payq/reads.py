"""Reads from a streaming replica: where what only reads goes (``DATABASE_READ_URL``).

Status, the dashboard's pages, ``dlq list``/``show``/``export``, the database figures and
reconcile's search read through ``read_engine()``; everything that writes, or must see
its own write, stays on the primary (``payq.db``). With no replica configured,
``read_engine()`` is the primary's engine and nothing else changes.

The replica is read only while it answers, is a standby that streams from the primary,
and is at most ``DATABASE_READ_MAX_LAG_S`` behind; else reads go to the primary and a
warning says why (logged once per change, and carried by ``read_source()`` for status
and the dashboard to show). A decision holds for ``RECHECK_S`` (a replica that did not
answer: ``DOWN_RECHECK_S``), so a page does not measure the lag for every query; a
read that finds its connection to the replica cut ends the decision at once (that read
fails, as any database error; the next one asks again).

The lag is measured on the replica. A replica that has replayed everything it received
is not behind, however long ago the primary's last commit was (an idle primary makes
``now() - pg_last_xact_replay_timestamp()`` grow without any staleness). A replica with
WAL received but not yet replayed is behind by the age of the last commit it replayed:
an overestimate right after a long idle spell, which sends reads to the primary for a
moment, never to stale data. Unless it finishes replaying what it had received within
``REPLAY_PAUSE_S``: an idle primary still writes WAL of its own (checkpoints, snapshots
of running transactions), and a look that falls while it replays is no lag. What it
has not received it cannot know: so a replica whose WAL receiver is not running (its
primary unreachable, or another one) is not read; one that has just reconnected counts
as caught up with what it has received so far, until the backlog arrives (milliseconds
on a local network).
The primary's ``pg_stat_replication`` would tell its own view of the lag, but needs a
round trip to the primary and a way to tell which standby is ours.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from payq.db import database_problem, get_engine, make_engine
from payq.runtime import Part, runtime
from payq.settings import Settings

__all__ = [
    "DOWN_RECHECK_S",
    "READER",
    "RECHECK_S",
    "ReadSource",
    "Reader",
    "last_read_source",
    "read_engine",
    "read_source",
]

log = logging.getLogger("payq.reads")

#: How long a decision (replica or primary) holds before the replica is asked again.
RECHECK_S = 1.0
#: The same after the replica did not answer: a connect timeout is not paid every second.
DOWN_RECHECK_S = 10.0
#: The replica's pool: a few connections (status, a dashboard's page threads).
READ_POOL_MAX = 4

#: One round trip: is it a standby, does it stream, has it replayed what it received, and
#: how old is the last commit it replayed.
_PROBE = text(
    "SELECT pg_is_in_recovery(), "
    "EXISTS (SELECT 1 FROM pg_stat_wal_receiver), "
    "pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), "
    "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, "
    "pg_last_wal_receive_lsn()::text"
)
#: Has it since replayed up to what it had received at the first look?
_REPLAYED = text("SELECT pg_last_wal_replay_lsn() >= CAST(:received AS pg_lsn)")
#: How long a replica that was replaying a moment ago gets to finish it (``_measure``).
REPLAY_PAUSE_S = 0.05


@dataclass(frozen=True)
class ReadSource:
    """Where reads go now, and why."""

    engine: Engine = field(repr=False, compare=False)
    #: A replica is configured (``DATABASE_READ_URL``).
    configured: bool
    #: Reads go to the replica.
    replica: bool
    #: The replica's lag when measured (``None``: not measured, or not known).
    lag_s: float | None = None
    max_lag_s: float | None = None
    #: Why reads go to the primary although a replica is configured: one line, naming
    #: DATABASE_READ_URL or DATABASE_READ_MAX_LAG_S and what to do.
    warning: str | None = None
    #: ``time.monotonic()`` when decided.
    at: float = 0.0
    #: What kind of reason ``warning`` gives (down, not_standby, not_streaming, behind).
    kind: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """For ``status --json`` and the dashboard."""
        return {
            "from": "replica" if self.replica else "primary",
            "replica_configured": self.configured,
            "lag_s": None if self.lag_s is None else round(self.lag_s, 3),
            "max_lag_s": self.max_lag_s,
            "warning": self.warning,
        }

    def describe(self) -> str:
        """One line for people: where reads came from, the lag, and any warning."""
        if not self.configured:
            return "from the primary (no replica configured: DATABASE_READ_URL)"
        if self.replica:
            lag = "-" if self.lag_s is None else f"{self.lag_s:.1f} s"
            return f"from the replica, {lag} behind (at most {self.max_lag_s:g} s)"
        return f"from the PRIMARY: {self.warning}"


class Reader:
    """The replica's engine and the last decision about it (one per process)."""

    def __init__(self, settings: Settings, role: str) -> None:
        url = settings.read_url
        assert url is not None
        own = settings.model_copy(
            update={
                "database_url": url,
                "database_pool_max_connections": min(
                    READ_POOL_MAX, settings.database_pool_max_connections
                ),
            }
        )
        self.engine = make_engine(own, f"{role}-read")
        self.max_lag_s = settings.database_read_max_lag_s
        self._lock = threading.Lock()
        self._last: ReadSource | None = None
        self._warned: str | None = None  # the kind of the warning last logged

        @event.listens_for(self.engine, "handle_error")
        def _cut_off(context: ExceptionContext) -> None:
            # The replica went away (or cancelled a query for its replay): ask again.
            if context.is_disconnect or isinstance(context.sqlalchemy_exception, OperationalError):
                self._last = None

    def source(self, primary: Engine) -> ReadSource:
        """The decision, measured again once ``RECHECK_S`` has passed."""
        with self._lock:
            last = self._last
            if last is None or time.monotonic() - last.at > _hold_s(last):
                last = self._last = self._measure()
                self._log_change(last)
        if last.replica:
            return last
        return ReadSource(
            primary, True, False, last.lag_s, self.max_lag_s, last.warning, last.at, last.kind
        )

    @property
    def last(self) -> ReadSource | None:
        return self._last

    def _measure(self) -> ReadSource:
        now = time.monotonic()
        try:
            with self.engine.connect() as conn:
                standby, streaming, caught_up, age_s, received = conn.execute(_PROBE).one()
                if not caught_up and received is not None and (age_s or 0) > self.max_lag_s:
                    # An idle primary's own WAL (a checkpoint, a snapshot of running
                    # transactions) may be mid-replay: that is no lag behind any commit.
                    time.sleep(REPLAY_PAUSE_S)
                    replayed = conn.execute(_REPLAYED, {"received": received}).scalar()
                    caught_up = bool(replayed)
        except (DBAPIError, PoolTimeout) as exc:
            return self._primary("down", _unanswered(exc), now)
        if not standby:
            why = (
                "DATABASE_READ_URL names a server that is not a standby (promoted, or not a "
                "replica at all): point it at a streaming replica"
            )
            return self._primary("not_standby", why, now)
        if not streaming:
            why = (
                "the replica at DATABASE_READ_URL is not streaming from its primary (cut "
                "off, or reconnecting): it may be behind by any amount"
            )
            return self._primary("not_streaming", why, now)
        lag_s = 0.0 if caught_up else age_s
        if lag_s is None or lag_s > self.max_lag_s:
            behind = "an unknown time" if lag_s is None else f"{lag_s:.1f} s"
            why = (
                f"the replica at DATABASE_READ_URL is {behind} behind, more than "
                f"DATABASE_READ_MAX_LAG_S ({self.max_lag_s:g} s)"
            )
            return self._primary("behind", why, now, lag_s)
        return ReadSource(self.engine, True, True, lag_s, self.max_lag_s, None, now)

    def _primary(self, kind: str, why: str, now: float, lag_s: float | None = None) -> ReadSource:
        # The engine is the caller's primary (``source``); this one is never used to read.
        return ReadSource(self.engine, True, False, lag_s, self.max_lag_s, why, now, kind)

    def _log_change(self, source: ReadSource) -> None:
        kind = source.kind
        if kind == self._warned:
            return
        if source.warning is not None:
            log.warning("reads go to the primary: %s", source.warning)
        elif self._warned is not None:
            log.info("reads go to the replica again (%.1f s behind)", source.lag_s or 0.0)
        self._warned = kind


def _hold_s(source: ReadSource) -> float:
    return DOWN_RECHECK_S if source.kind == "down" else RECHECK_S


def _unanswered(exc: BaseException) -> str:
    """Why the replica could not be asked, as one line naming DATABASE_READ_URL (never
    the URL itself)."""
    problem = database_problem(exc)
    detail = problem[1] if problem else type(exc).__name__
    said = "the replica at DATABASE_READ_URL did not answer or refused: "
    if "the database DATABASE_URL names does not exist" in detail:
        # Not "run payq migrate": a replica is read-only, and has its primary's databases.
        return said + (
            "PostgreSQL answered, but the database DATABASE_READ_URL names does not exist "
            "there: name DATABASE_URL's database (a replica has its primary's), and check "
            "that DATABASE_READ_URL is a replica of DATABASE_URL's server"
        )
    return said + detail.replace("DATABASE_URL", "DATABASE_READ_URL")


#: This process's replica (``None``: no ``DATABASE_READ_URL``), its engine renewed after a
#: fork as the primary's is.
READER: Part[Reader | None] = Part(
    "reader",
    build=lambda rt: Reader(rt.settings, rt.role) if rt.settings.read_url else None,
    after_fork=lambda reader: reader.engine.dispose(close=False) if reader else None,
    close=lambda reader: reader.engine.dispose() if reader else None,
)


def read_source(primary: Engine | None = None) -> ReadSource:
    """Where reads go now: the replica, or ``primary`` (this process's engine if not
    given) with the reason."""
    reader = runtime().get(READER)
    fallback = primary or get_engine()
    if reader is None:
        return ReadSource(fallback, configured=False, replica=False)
    return reader.source(fallback)


def read_engine(primary: Engine | None = None) -> Engine:
    """The engine to read from: the replica's when it may be read, else ``primary``."""
    return read_source(primary).engine


def last_read_source() -> ReadSource | None:
    """The decision the last read followed, without measuring (a page's banner, from
    the event loop); ``None`` if no replica is configured or none was decided yet."""
    reader = runtime().built(READER)
    return reader.last if reader is not None else None
