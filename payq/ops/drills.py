"""Incident drills: ``payq simulate payment_timeout | database_pool_exhaustion | connection_error``.

payq exists because of one incident: the payment provider timed out after 5000 ms,
HTTPS connection pools timed out, and the database pool ran dry. Each drill here
reproduces one of those errors against the provider simulator and live payq
processes, then tells in numbered lines, with the figures it measured, what
happened and why nothing was lost:

- ``payment_timeout``: the provider charges, then holds its answer for 8 s; the
  client cuts the call at ``PAYMENT_TIMEOUT_MS``; the charge is retried with the
  same idempotency key and the provider replays the charge it already made.
- ``connection_error``: the provider resets every connection for a window, then
  recovers; the attempts end ``connection_error`` and are retried after backoff.
- ``database_pool_exhaustion``: first the incident's own error, reproduced in this
  process (a pool of 2 with both connections out: the third checkout times out);
  then a worker with as many threads as its pool, a slow provider, and samples of
  ``pg_stat_activity``: connections stay within the pool and are not held during
  provider calls; a worker with more threads than its pool is refused at start.

Every drill uses the configured settings (``DATABASE_URL``, ``REDIS_URL``,
``PAYQ_NAMESPACE``...), makes sure the database exists and is migrated, and starts
its own simulator (free port, fresh API key), one worker process group and the
relay as subprocesses (`Supervised`, as ``payq demo`` does), stopped at the end
whatever happens. Its charges carry ``metadata={"drill": <run id>}`` and only those
are counted. A drill is ok only if every charge ended final, the provider made one
charge per succeeded charge and none twice (``duplicate_charges`` 0), and the
error it is about really happened.

A drill points payq's workers at a simulator: never run one against a live
system. It refuses to start while the database holds unfinished charges that are
not a drill's, since its worker and relay would send those to the simulator.

``pg_stat_activity`` shows a connection's state (running a statement, inside a
transaction, idle), not whether the pool has lent it out; the pool drill reports
exactly what it sees.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, RowMapping, func, select, text
from sqlalchemy.exc import TimeoutError as PoolTimeout

from payq.db import make_engine
from payq.devservices import ensure_database, free_port, postgres_answers, redis_answers
from payq.errors import PayqError, ServiceUnavailable
from payq.migrate import migrate
from payq.models import charge_attempts, charges
from payq.ops.demo import _wait_for_http, _wait_for_log
from payq.ops.supervise import Supervised
from payq.settings import Settings, get_settings, load_settings

__all__ = [
    "DRILLS",
    "DrillRefused",
    "DrillResult",
    "Figure",
    "add_simulate_command",
    "run_drill",
]

DRILLS = ("payment_timeout", "database_pool_exhaustion", "connection_error")

Figure = int | float | str

#: The incident's slow provider answered after 8 s.
INCIDENT_PROVIDER_DELAY_S = 8.0
#: Provider latency in the pool drill: every call is slow, so calls overlap.
POOL_DRILL_LATENCY_MS = 1000
SAMPLE_INTERVAL_S = 0.1
#: Settings a drill must share with its children: it counts rows in the same place.
_SHARED = frozenset({"DATABASE_URL", "REDIS_URL", "PAYQ_NAMESPACE"})
_UNFINISHED = ("pending", "processing", "retrying")
_FINAL = ("succeeded", "failed", "dead")


class DrillRefused(PayqError):
    """A drill would be unsafe or meaningless here; nothing was started."""


@dataclass(frozen=True)
class DrillResult:
    """What a drill printed and measured.

    ``lines`` are the printed lines (a header, progress lines starting with ``·``,
    the numbered story, the closing line); ``figures`` the measured numbers by name;
    ``problems`` why it is not ok (empty when ok).
    """

    name: str
    run: str
    ok: bool
    lines: list[str]
    figures: dict[str, Figure]
    problems: list[str] = field(default_factory=list)


class _Story:
    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.lines: list[str] = []
        self.steps = 0

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.out(line)

    def progress(self, line: str) -> None:
        self.say(f"· {line}")

    def step(self, line: str) -> None:
        self.steps += 1
        self.say(f"{self.steps}. {line}")


@dataclass
class _Drill:
    """One run of one drill: who it is, where it writes, what it has measured so far."""

    name: str
    run: str
    total: int
    settings: Settings  # what the children run with (the configured ones plus overrides)
    overrides: dict[str, str]
    engine: Engine  # this process's own connections ("payq-drill-<pid>")
    workdir: Path
    story: _Story
    figures: dict[str, Figure] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def mine(self) -> Any:
        return charges.c.metadata["drill"].astext == self.run

    def require(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


@dataclass
class _Rig:
    """The drill's simulator, worker group and relay, and how to talk to them."""

    sim_url: str
    api_key: str
    env: dict[str, str]
    threads: int
    sim: Supervised
    worker: Supervised
    relay: Supervised
    worker_log: Path

    def faults(self, **knobs: Any) -> None:
        httpx.post(f"{self.sim_url}/_faults", json=knobs, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.sim_url}/_stats", timeout=5).json()
        return data

    def requests_for(self, key: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.sim_url}/_requests", params={"idempotency_key": key}, timeout=5
        )
        data: list[dict[str, Any]] = response.json()
        return data

    def provider_charge_id(self, key: str) -> str | None:
        """The provider's charge for ``key``, looked up as payq's reconciliation does."""
        response = httpx.get(
            f"{self.sim_url}/v1/charges",
            params={"idempotency_key": key},
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=5,
        )
        if response.status_code != 200:
            return None
        return str(response.json().get("id"))

    def check(self) -> None:
        for child in (self.sim, self.worker, self.relay):
            child.check()

    def stop_workers(self) -> None:
        self.relay.stop()
        self.worker.stop()


# --- the entry point ------------------------------------------------------------


def run_drill(
    name: str,
    *,
    charges: int = 20,
    out: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> DrillResult:
    """Run one incident drill and return what it printed and measured.

    ``charges`` is how many charges the drill enqueues; ``out`` receives each line
    as it is printed; ``env`` adds environment variables for the drill's child
    processes (e.g. ``PAYMENT_TIMEOUT_MS=1500`` for a short run), which the figures
    then follow. ``env`` may not move the database, Redis or the namespace.

    Raises ``ValueError`` for an unknown drill or a bad argument, ``DrillRefused``
    when the database holds unfinished charges that are not a drill's,
    ``ServiceUnavailable`` when PostgreSQL or Redis does not answer.
    """
    if name not in DRILLS:
        raise ValueError(f"unknown drill {name!r}; choose one of {', '.join(DRILLS)}")
    if charges < 1:
        raise ValueError(f"charges must be at least 1, got {charges}")
    overrides = dict(env or {})
    moved = sorted(_SHARED & set(overrides))
    if moved:
        raise ValueError(f"env may not change {', '.join(moved)}: the drill counts its own rows")
    base = get_settings()
    fields = Settings.model_fields
    settings = load_settings(**{k.lower(): v for k, v in overrides.items() if k.lower() in fields})
    _require_services(base)
    ensure_database(base.database_url)
    engine = make_engine(base, "drill")
    run = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"payq-drill-{run}-"))
    story = _Story(out)
    drill = _Drill(name, run, charges, settings, overrides, engine, workdir, story)
    try:
        migrate(engine)
        _refuse_foreign_work(drill)
        _DRILL_FUNCTIONS[name](drill)
        ok = not drill.problems
    except BaseException:
        if any(workdir.iterdir()):
            story.progress(f"logs kept in {workdir}/")
        else:
            workdir.rmdir()
        raise
    finally:
        engine.dispose()
    _closing(drill, ok)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        story.progress(f"logs kept in {workdir}/")
    return DrillResult(name, run, ok, story.lines, drill.figures, drill.problems)


def _require_services(settings: Settings) -> None:
    if not postgres_answers(settings.database_url):
        raise ServiceUnavailable(
            "PostgreSQL does not answer at DATABASE_URL: start it, then run the drill again"
        )
    if not redis_answers(settings.redis_url):
        raise ServiceUnavailable(
            "Redis does not answer at REDIS_URL: start it, then run the drill again"
        )


def _refuse_foreign_work(drill: _Drill) -> None:
    with drill.engine.connect() as conn:
        foreign = conn.execute(
            select(func.count()).where(
                charges.c.status.in_(_UNFINISHED), ~charges.c.metadata.has_key("drill")
            )
        ).scalar_one()
    if foreign:
        which, them = ("charge is", "it") if foreign == 1 else ("charges are", "them")
        raise DrillRefused(
            f"{foreign} unfinished {which} in this database and not a drill's: the drill's "
            f"worker and relay would send {them} to the provider simulator. Let {them} finish, "
            "or point DATABASE_URL at a scratch database"
        )


# --- the rig: simulator, worker group, relay ---------------------------------------


def _threads(settings: Settings, want: int) -> int:
    """At most ``want`` threads, and never more than either pool allows."""
    limit = min(settings.payment_pool_max_connections, settings.database_pool_max_connections)
    return max(1, min(want, limit))


@contextlib.contextmanager
def _rig(
    drill: _Drill,
    *,
    threads: int,
    sim_args: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> Iterator[_Rig]:
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}"
    api_key = "sk_drill_" + uuid.uuid4().hex
    child_env = {
        **os.environ,
        **drill.overrides,
        **(env or {}),
        "PAYMENT_PROVIDER_URL": sim_url,
        "PAYMENT_PROVIDER_API_KEY": api_key,
    }
    logs = {name: drill.workdir / f"{name}.log" for name in ("provider-sim", "worker", "relay")}
    sim_argv = ["provider-sim", "--port", str(port), *sim_args]
    worker_argv = ["worker", "--processes", "1", "--threads", str(threads)]
    rig = _Rig(
        sim_url=sim_url,
        api_key=api_key,
        env=child_env,
        threads=threads,
        sim=Supervised("provider-sim", sim_argv, child_env, logs["provider-sim"]),
        worker=Supervised("worker", worker_argv, child_env, logs["worker"]),
        relay=Supervised("relay", ["relay"], child_env, logs["relay"]),
        worker_log=logs["worker"],
    )
    try:
        rig.sim.start()
        _wait_for_http(f"{sim_url}/_stats")
        rig.worker.start()
        rig.relay.start()
        _wait_for_log(logs["worker"], "ready for action", count=1)
        drill.story.progress(
            f"provider simulator on {sim_url}; 1 worker process x {threads} threads and the "
            f"relay are up (logs in {drill.workdir}/)"
        )
        yield rig
    finally:
        rig.stop_workers()
        rig.sim.stop()


def _enqueue(drill: _Drill) -> list[str]:
    from producers import enqueue_charges

    keys = [f"drill-{drill.name}-{drill.run}-{i}" for i in range(drill.total)]
    for start in range(0, len(keys), 50):
        enqueue_charges(
            [
                {
                    "amount": 1000 + i,
                    "currency": "usd",
                    "source": "tok_visa",
                    "idempotency_key": keys[i],
                    "description": f"incident drill {drill.name} {i}",
                    "metadata": {"drill": drill.run},
                }
                for i in range(start, min(start + 50, len(keys)))
            ]
        )
    return keys


def _status_counts(drill: _Drill) -> dict[str, int]:
    with drill.engine.connect() as conn:
        rows = conn.execute(
            select(charges.c.status, func.count()).where(drill.mine()).group_by(charges.c.status)
        )
        return {status: n for status, n in rows}


def _charges_tried(drill: _Drill) -> int:
    """How many of the drill's charges have at least one attempt recorded."""
    with drill.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count(func.distinct(charge_attempts.c.charge_id)))
                .select_from(charge_attempts.join(charges))
                .where(drill.mine())
            ).scalar_one()
        )


def _attempts(drill: _Drill) -> list[RowMapping]:
    with drill.engine.connect() as conn:
        return list(
            conn.execute(
                select(
                    charges.c.idempotency_key,
                    charge_attempts.c.number,
                    charge_attempts.c.started_at,
                    charge_attempts.c.finished_at,
                    charge_attempts.c.outcome,
                    charge_attempts.c.error_class,
                    charge_attempts.c.error_message,
                    charge_attempts.c.latency_ms,
                )
                .select_from(charge_attempts.join(charges))
                .where(drill.mine())
                .order_by(charges.c.idempotency_key, charge_attempts.c.number)
            ).mappings()
        )


def _wait_final(
    drill: _Drill, rig: _Rig, timeout_s: float, tick: Callable[[], None] | None = None
) -> bool:
    """Poll every 100 ms until every drill charge is final; ``tick`` runs each time."""
    deadline = time.monotonic() + timeout_s
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        rig.check()
        if tick is not None:
            tick()
        counts = _status_counts(drill)
        if sum(counts.get(s, 0) for s in _FINAL) >= drill.total:
            return True
        next_at = max(next_at + SAMPLE_INTERVAL_S, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
    drill.problems.append(f"charges still not final after {timeout_s:.0f} s")
    return False


def _budget_s(drill: _Drill, threads: int, call_s: float) -> float:
    """A generous bound on a drill's run: rounds of slow calls, then retries."""
    rounds = math.ceil(drill.total / threads)
    backoff = drill.settings.retry_backoff_max_s * 2
    return 60 + 3 * rounds * (call_s + 1) + backoff


def _gaps_after(attempts: Sequence[RowMapping], error_class: str) -> list[float]:
    """Seconds from the end of each attempt that ended ``error_class`` to the next one."""
    gaps = []
    for prev, nxt in itertools.pairwise(attempts):
        same = prev["idempotency_key"] == nxt["idempotency_key"]
        if same and prev["error_class"] == error_class:
            gaps.append((nxt["started_at"] - prev["finished_at"]).total_seconds())
    return gaps


def _span(values: Sequence[float], fmt: str = ".1f", unit: str = "") -> str:
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    if f"{low:{fmt}}" == f"{high:{fmt}}":
        return f"{low:{fmt}}{unit}"
    return f"{low:{fmt}}-{high:{fmt}}{unit}"


def _ledger(drill: _Drill, rig: _Rig, stats: Mapping[str, Any]) -> None:
    """The figures every drill ends with: final, succeeded, provider charges, duplicates.

    Call after the workers stopped and ``stats`` was read (lookups count as requests).
    """
    with drill.engine.connect() as conn:
        rows = list(
            conn.execute(
                select(
                    charges.c.idempotency_key, charges.c.status, charges.c.provider_charge_id
                ).where(drill.mine())
            ).mappings()
        )
    rig.faults(reset=True)  # no latency or faults for the lookups below
    counts = Counter(row["status"] for row in rows)
    final = sum(counts[s] for s in _FINAL)
    succeeded = [row for row in rows if row["status"] == "succeeded"]
    matched = sum(
        1
        for row in succeeded
        if row["provider_charge_id"] is not None
        and rig.provider_charge_id(row["idempotency_key"]) == row["provider_charge_id"]
    )
    duplicates = int(stats.get("duplicate_charges", -1))
    provider_charges = int(stats.get("charges", -1))
    drill.figures.update(
        charges=drill.total,
        final=final,
        succeeded=len(succeeded),
        failed=counts["failed"],
        dead=counts["dead"],
        provider_charges=provider_charges,
        provider_requests=int(stats.get("charge_requests", -1)),
        replays=int(stats.get("replays", -1)),
        duplicate_charges=duplicates,
        matched=matched,
        charged_once=matched if duplicates == 0 else max(0, matched - max(duplicates, 0)),
    )
    drill.require(final == drill.total, f"{drill.total - final} charges did not end final")
    drill.require(duplicates == 0, f"duplicate_charges is {duplicates}, not 0")
    drill.require(
        provider_charges == len(succeeded) == matched,
        f"the provider made {provider_charges} charges for {len(succeeded)} succeeded charges "
        f"({matched} matched by key)",
    )


def _provider_line(drill: _Drill) -> str:
    f = drill.figures
    return (
        f"The provider made {f['provider_charges']} charges for {f['succeeded']} succeeded "
        f"charges; {f['matched']} of {f['succeeded']} charge ids payq stored match the "
        f"provider's charge for their key; duplicate_charges {f['duplicate_charges']}."
    )


def _closing(drill: _Drill, ok: bool) -> None:
    f = drill.figures
    figures = (
        f"{f.get('final', 0)}/{drill.total} charges final, {f.get('charged_once', 0)} charged "
        f"once at the provider, {f.get('duplicate_charges', '?')} duplicate charges"
    )
    if ok:
        drill.story.say(f"nothing lost: {figures}")
    else:
        drill.story.say(f"NOT OK ({'; '.join(drill.problems)}): {figures}")


# --- payment_timeout ------------------------------------------------------------


def _drill_payment_timeout(drill: _Drill) -> None:
    s = drill.settings
    delay_s = max(INCIDENT_PROVIDER_DELAY_S, s.payment_timeout_s + 3)
    threads = _threads(s, 4)
    drill.story.say(
        f"payq simulate payment_timeout (run {drill.run}): {drill.total} charges; the provider "
        f"answers after {delay_s:.1f} s, PAYMENT_TIMEOUT_MS={s.payment_timeout_ms}"
    )
    sim_args = ["--timeout-rate", "1.0", "--timeout-delay-s", str(delay_s)]
    with _rig(drill, threads=threads, sim_args=sim_args) as rig:
        keys = _enqueue(drill)
        drill.story.progress(f"enqueued {len(keys)} charges; every first attempt will be held")
        healed: list[float] = []

        def heal() -> None:
            if not healed and _charges_tried(drill) >= drill.total:
                rig.faults(timeout_rate=0.0)
                healed.append(time.monotonic())
                drill.story.progress("every charge has had one attempt: the provider is fast again")

        _wait_final(drill, rig, _budget_s(drill, threads, s.payment_timeout_s), heal)
        rig.stop_workers()
        stats = rig.stats()
        requests = {key: rig.requests_for(key) for key in keys}
        _ledger(drill, rig, stats)

    attempts = _attempts(drill)
    cut = [a for a in attempts if a["error_class"] == "timeout"]
    cut_ms = [float(a["latency_ms"]) for a in cut]
    held = sum(1 for recs in requests.values() if recs and recs[0]["fault"] == "timeout")
    retried = sum(1 for recs in requests.values() if len(recs) >= 2)
    replayed = sum(
        1 for recs in requests.values() if any(r["replayed"] and r["status"] == 200 for r in recs)
    )
    gaps = _gaps_after(attempts, "timeout")
    drill.figures.update(
        timeout_ms=s.payment_timeout_ms,
        provider_delay_s=delay_s,
        held=held,
        timeouts=len(cut),
        timed_out_charges=len({a["idempotency_key"] for a in cut}),
        cut_ms_min=min(cut_ms, default=0),
        cut_ms_max=max(cut_ms, default=0),
        keys_retried=retried,
        keys_replayed=replayed,
        retry_gap_s_min=round(min(gaps, default=0), 3),
        retry_gap_s_max=round(max(gaps, default=0), 3),
    )
    drill.require(len(cut) > 0, "no call was cut at the deadline: the timeout did not happen")
    over = [ms for ms in cut_ms if ms > s.payment_timeout_ms + 1000]
    drill.require(not over, f"{len(over)} timed-out calls ran over a second past the deadline")

    step = drill.story.step
    step(
        f"The provider held {held} of {drill.total} first attempts: it charged, then kept the "
        f"answer back, to send it only after {delay_s:.1f} s (the incident's slow provider)."
    )
    step(
        f"The client cut each call at the deadline: {len(cut)} attempts ended "
        f"error_class=timeout at PAYMENT_TIMEOUT_MS={s.payment_timeout_ms} (measured "
        f"{_span(cut_ms, '.0f', ' ms')}); no thread waited the {delay_s:.1f} s out, and each "
        "charge went to retrying, its outcome unknown."
    )
    step(
        f"Each was tried again {_span(gaps, '.1f', ' s')} later (a delayed message: a backoff "
        f"of RETRY_BACKOFF_MIN_S={s.retry_backoff_min_s:g} s or more, then the next free thread) "
        "with the same Idempotency-Key: "
        f"{retried} of {drill.total} keys reached the provider twice or more, and {replayed} "
        "were answered with an idempotent replay (Idempotent-Replayed: true) of the charge "
        "already made, not with a new charge."
    )
    step(_provider_line(drill))


# --- connection_error ------------------------------------------------------------


def _drill_connection_error(drill: _Drill) -> None:
    s = drill.settings
    threads = _threads(s, 4)
    drill.story.say(
        f"payq simulate connection_error (run {drill.run}): {drill.total} charges; the provider "
        "resets every connection until each charge has been tried once"
    )
    with _rig(drill, threads=threads, sim_args=["--reset-rate", "1.0"]) as rig:
        started = time.monotonic()
        keys = _enqueue(drill)
        drill.story.progress(f"enqueued {len(keys)} charges; every connection is being reset")
        window: list[float] = []

        def heal() -> None:
            if not window and _charges_tried(drill) >= drill.total:
                rig.faults(reset_rate=0.0)
                window.append(time.monotonic() - started)
                drill.story.progress("every charge has been tried once: the provider recovered")

        _wait_final(drill, rig, _budget_s(drill, threads, s.payment_timeout_s), heal)
        rig.stop_workers()
        stats = rig.stats()
        requests = {key: rig.requests_for(key) for key in keys}
        _ledger(drill, rig, stats)

    attempts = _attempts(drill)
    errors = [a for a in attempts if a["error_class"] == "connection_error"]
    message = Counter(str(a["error_message"]) for a in errors).most_common(1)
    seen = message[0][0].split("; the charge")[0] if message else "n/a"
    gaps = _gaps_after(attempts, "connection_error")
    no_answer = int(stats.get("by_status", {}).get("no_answer", 0))
    fresh = sum(
        1
        for recs in requests.values()
        if recs and recs[-1]["status"] == 200 and not recs[-1]["replayed"]
    )
    window_s = window[0] if window else 0.0
    drill.figures.update(
        reset_window_s=round(window_s, 3),
        connection_errors=len(errors),
        charges_hit=len({a["idempotency_key"] for a in errors}),
        no_answer=no_answer,
        retry_gap_s_min=round(min(gaps, default=0), 3),
        retry_gap_s_max=round(max(gaps, default=0), 3),
        charged_afresh=fresh,
    )
    drill.require(len(errors) > 0, "no attempt ended connection_error: the fault did not happen")
    last = {a["idempotency_key"]: a for a in attempts}  # ordered by key, then number
    unretried = sum(1 for a in last.values() if a["error_class"] == "connection_error")
    drill.require(unretried == 0, f"{unretried} charges ended on a connection_error, unretried")

    step = drill.story.step
    step(
        f"The provider reset every connection (reset_rate 1.0) for {window_s:.1f} s, until each "
        f"of the {drill.total} charges had been tried once; then it recovered."
    )
    step(
        f"{len(errors)} attempts on {drill.figures['charges_hit']} charges ended "
        f'connection_error ("{seen}"); the provider answered none of them ({no_answer} '
        "requests without an answer) and, as a reset stores nothing, charged nothing for them."
    )
    step(
        f"Each was tried again {_span(gaps, '.1f', ' s')} later (a delayed message: a backoff "
        f"of RETRY_BACKOFF_MIN_S={s.retry_backoff_min_s:g} s or more; no thread slept) with the "
        f"same Idempotency-Key; {fresh} of {drill.total} keys then got one 200, a charge made "
        "afresh."
    )
    step(_provider_line(drill))


# --- database_pool_exhaustion ------------------------------------------------------


def _incident_pool_error(drill: _Drill) -> tuple[float | None, str]:
    """A pool of 2 with both connections out; a third checkout. (ms waited, error)."""
    small = drill.settings.model_copy(update={"database_pool_max_connections": 2})
    engine = make_engine(small, "drill-pool")
    held = []
    try:
        for _ in range(2):
            conn = engine.connect()
            held.append(conn)
            conn.execute(text("SELECT 1"))
        started = time.monotonic()
        try:
            engine.connect().close()
        except PoolTimeout as exc:
            waited_ms = (time.monotonic() - started) * 1000
            return waited_ms, str(exc).split(" (Background on this error")[0]
        return None, "the third checkout got a connection"
    finally:
        for conn in held:
            conn.close()
        engine.dispose()


def _process_group(pgid: int) -> set[int]:
    """Pids whose process group is ``pgid`` (Linux /proc), e.g. a worker group's children."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.add(int(entry))
    return pids


@dataclass(frozen=True)
class _Sample:
    at: float  # time.monotonic()
    open: int  # worker connections to this database
    busy: int  # of those, running a statement or inside a transaction
    in_flight: int  # provider calls in flight at the simulator


def _sample(drill: _Drill, rig: _Rig) -> _Sample:
    group = rig.worker.proc.pid if rig.worker.proc is not None else None
    names = (
        {f"payq-worker-{pid}" for pid in _process_group(group)}
        if group is not None and os.path.isdir("/proc")
        else None
    )
    with drill.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT application_name, state FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'payq-worker-%'"
            )
        ).all()
    mine = [state for app, state in rows if names is None or app in names]
    busy = sum(1 for state in mine if state in ("active", "idle in transaction"))
    return _Sample(time.monotonic(), len(mine), busy, int(rig.stats().get("in_flight", 0)))


def _refused_worker(env: Mapping[str, str], threads: int) -> tuple[int | None, str]:
    """Run ``payq worker --threads <threads>``: its exit code and its error output."""
    argv = ["worker", "--processes", "1", "--threads", str(threads)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "payq.cli", *argv],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"payq worker --threads {threads} was still running after 30 s"
    return proc.returncode, err.strip()


def _drill_database_pool_exhaustion(drill: _Drill) -> None:
    s = drill.settings
    pool = _threads(s, 10)
    drill.story.say(
        f"payq simulate database_pool_exhaustion (run {drill.run}): the incident's pool error, "
        f"then {drill.total} charges through a worker with as many threads as its pool"
    )
    waited_ms, error = _incident_pool_error(drill)
    drill.require(waited_ms is not None, "the small pool did not time out")
    drill.story.step(
        "What the incident saw, reproduced in this process: a pool of 2 connections "
        f"(max_overflow 0, pool_timeout = DB_TIMEOUT_MS {s.db_timeout_ms} ms) with both "
        f"checked out; a third checkout waited {waited_ms or 0:.0f} ms and failed: {error}"
    )

    env = {"DATABASE_POOL_MAX_CONNECTIONS": str(pool)}
    sim_args = ["--latency-ms", str(POOL_DRILL_LATENCY_MS)]
    samples: list[_Sample] = []
    with _rig(drill, threads=pool, sim_args=sim_args, env=env) as rig:
        keys = _enqueue(drill)
        drill.story.progress(f"enqueued {len(keys)} charges; sampling pg_stat_activity")
        budget = _budget_s(drill, pool, POOL_DRILL_LATENCY_MS / 1000)
        _wait_final(drill, rig, budget, lambda: samples.append(_sample(drill, rig)))
        rig.stop_workers()
        stats = rig.stats()
        _ledger(drill, rig, stats)
        child_env = rig.env
    log = rig.worker_log.read_text(errors="replace")
    pool_timeouts = log.count("QueuePool limit")
    attempts = len(_attempts(drill))
    code, refusal = _refused_worker(child_env, pool + 1)

    calls = [x for x in samples if x.in_flight > 0]
    overlapping = [x for x in samples if x.in_flight >= 2]
    held = sum(1 for x in overlapping if x.busy >= x.in_flight)
    max_open = max((x.open for x in samples), default=0)
    busy_max = max((x.busy for x in calls), default=0)
    busy_mean = statistics.fmean([x.busy for x in calls]) if calls else 0.0
    max_in_flight = max((x.in_flight for x in samples), default=0)
    spread_s = samples[-1].at - samples[0].at if len(samples) > 1 else 0.0
    interval_ms = spread_s * 1000 / (len(samples) - 1) if len(samples) > 1 else 0.0
    drill.figures.update(
        small_pool_wait_ms=round(waited_ms or 0, 1),
        small_pool_error=error,
        pool=pool,
        threads=pool,
        samples=len(samples),
        sample_interval_ms=round(interval_ms),
        max_worker_connections=max_open,
        connection_bound=pool,
        call_samples=len(calls),
        max_calls_in_flight=max_in_flight,
        provider_max_in_flight=int(stats.get("max_in_flight", -1)),
        busy_max_during_calls=busy_max,
        busy_mean_during_calls=round(busy_mean, 3),
        overlap_samples=len(overlapping),
        held_samples=held,
        worker_pool_timeouts=pool_timeouts,
        attempts=attempts,
        refusal_exit=-1 if code is None else code,
        refusal=refusal,
    )
    drill.require(max_open <= pool, f"{max_open} worker connections seen, over the pool {pool}")
    drill.require(pool_timeouts == 0, f"{pool_timeouts} pool timeouts in the worker log")
    drill.require(len(calls) > 0, "no sample caught a provider call in flight")
    drill.require(
        held * 2 <= len(overlapping),
        f"in {held} of {len(overlapping)} samples as many connections were busy as calls in "
        "flight: connections look held during provider calls",
    )
    drill.require(
        code == 2 and len(refusal.splitlines()) == 1,
        f"payq worker --threads {pool + 1} was not refused with one line and exit 2 "
        f"(exit {code}): {refusal[:300]}",
    )

    step = drill.story.step
    step(
        "Why payq does not run dry: a worker thread uses at most one connection at a time, and "
        f"threads may not outnumber the pool. Here 1 worker process x {pool} threads with "
        f"DATABASE_POOL_MAX_CONNECTIONS={pool} (threads == pool), a provider answering after "
        f"{POOL_DRILL_LATENCY_MS} ms, {drill.total} charges; pg_stat_activity sampled "
        f"{len(samples)} times over {spread_s:.1f} s (every {interval_ms:.0f} ms): at most "
        f"{max_open} worker connections open (bound: 1 process x {pool} = {pool})."
    )
    verdict = (
        "the rest sat idle between statements: no connection is held during a provider call"
        if held * 2 <= len(overlapping)
        else "connections WERE busy through provider calls"
    )
    step(
        f"While provider calls were in flight ({len(calls)} samples, up to {max_in_flight} calls "
        f"at once), worker connections running a statement or inside a transaction: at most "
        f"{busy_max}, {busy_mean:.2f} on average; with 2 or more calls in flight, {held} of "
        f"{len(overlapping)} samples had as many busy connections as calls; {verdict}."
    )
    step(
        f"{pool_timeouts} pool timeouts in the worker log; {attempts} attempts for "
        f"{drill.total} charges."
    )
    step(
        f"`payq worker --threads {pool + 1}` is refused at start (exit {code}): "
        f"{refusal.splitlines()[0] if refusal else '(no output)'}"
    )
    step(_provider_line(drill))


_DRILL_FUNCTIONS: dict[str, Callable[[_Drill], None]] = {
    "payment_timeout": _drill_payment_timeout,
    "database_pool_exhaustion": _drill_database_pool_exhaustion,
    "connection_error": _drill_connection_error,
}


# --- the command line ------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected 1 to 10000, got {value}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    from payq.logs import configure_logging

    configure_logging(get_settings())
    try:
        result = run_drill(args.drill, charges=args.charges, out=lambda s: print(s, flush=True))
    except DrillRefused as exc:
        print(f"payq: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def add_simulate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``payq simulate <drill> [--charges N]``; its ``func`` returns the exit code."""
    p = sub.add_parser(
        "simulate",
        help="incident drills: reproduce one of the incident's errors and show nothing is lost",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("drill", choices=DRILLS, help="which of the incident's errors to reproduce")
    p.add_argument("--charges", type=_positive, default=20, help="charges to enqueue (default 20)")
    p.set_defaults(func=_cmd_simulate)
