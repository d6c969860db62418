"""What every drill shares: its state, its rig of processes, its counts and its verdict.

A drill is a `Drill` (who it is, where it writes, what it has measured) telling
a `Story`. `start_rig` starts the provider simulator, one worker process group
and the relay, and stops them whatever happens; `enqueue` sends the drill's
charges, `wait_final` polls until they all ended final. `ledger` then takes the
figures and checks every drill ends with (every charge final, one provider charge
per succeeded charge, none twice), and `say_verdict` prints the closing line:
"nothing lost" or what was not ok.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, RowMapping, func, select

from payq.models import charge_attempts, charges
from payq.ops.system import LocalSystem, start_local_system
from payq.settings import Settings

__all__ = [
    "SAMPLE_INTERVAL_S",
    "Drill",
    "Figure",
    "Rig",
    "Story",
    "attempts_of",
    "budget_s",
    "charges_tried",
    "enqueue",
    "faulty_until_all_tried",
    "gaps_after",
    "ledger",
    "provider_line",
    "say_verdict",
    "span",
    "start_rig",
    "threads_for",
    "wait_final",
]

Figure = int | float | str

SAMPLE_INTERVAL_S = 0.1
#: How often a waiting drill says how far it is.
PROGRESS_EVERY_S = 10.0
_FINAL = ("succeeded", "failed", "dead")


class Story:
    """The lines a drill prints, kept as they go out."""

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
class Drill:
    """One run of one drill: who it is, where it writes, what it has measured so far."""

    name: str
    run: str
    total: int
    settings: Settings  # what the children run with (the configured ones plus overrides)
    overrides: dict[str, str]
    engine: Engine  # this process's own connections ("payq-drill-<pid>")
    workdir: Path
    story: Story
    figures: dict[str, Figure] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def mine(self) -> Any:
        return charges.c.metadata["drill"].astext == self.run

    def require(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


#: The drill's simulator, worker group and relay.
Rig = LocalSystem


# --- the rig: simulator, worker group, relay ---------------------------------------


def threads_for(settings: Settings, want: int) -> int:
    """At most ``want`` threads, and never more than either pool allows."""
    limit = min(settings.payment_pool_max_connections, settings.database_pool_max_connections)
    return max(1, min(want, limit))


@contextlib.contextmanager
def start_rig(
    drill: Drill,
    *,
    threads: int,
    sim_args: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> Iterator[Rig]:
    """The simulator (with ``sim_args``), one worker process and the relay; stopped on exit."""
    with start_local_system(
        drill.workdir,
        sim_args=sim_args,
        processes=1,
        threads=threads,
        env={**drill.overrides, **(env or {})},
    ) as rig:
        drill.story.progress(
            f"provider simulator on {rig.sim_url}; 1 worker process x {threads} threads and "
            f"the relay are up (logs in {drill.workdir}/)"
        )
        yield rig


# --- enqueueing, waiting, counting ---------------------------------------------------


@dataclass(frozen=True)
class FaultyRun:
    """What ``faulty_until_all_tried`` saw: the provider's counters, each key's requests,
    and when (seconds after the first charge was enqueued) the fault was lifted."""

    stats: dict[str, Any]
    requests: dict[str, list[dict[str, Any]]]
    healed_after_s: float | None


def faulty_until_all_tried(
    drill: Drill,
    *,
    threads: int,
    sim_args: Sequence[str],
    heal: Mapping[str, Any],
    faulty: str,
    healed: str,
) -> FaultyRun:
    """The skeleton of a drill against a faulty provider: start the rig with the fault
    (``sim_args``), enqueue, lift it (``heal``: the knobs) once every charge has been tried,
    wait until all are final, then take the provider's figures and check the ledger.
    ``faulty`` and ``healed`` are the progress lines said at those two moments."""
    with start_rig(drill, threads=threads, sim_args=sim_args) as rig:
        started = time.monotonic()
        keys = enqueue(drill)
        drill.story.progress(f"enqueued {len(keys)} charges; {faulty}")
        lifted: list[float] = []

        def lift() -> None:
            if not lifted and charges_tried(drill) >= drill.total:
                rig.faults(**heal)
                lifted.append(time.monotonic() - started)
                drill.story.progress(healed)

        wait_final(drill, rig, budget_s(drill, threads, drill.settings.payment_timeout_s), lift)
        rig.stop_workers()
        stats = rig.stats()
        requests = {key: rig.requests_for(key) for key in keys}
        ledger(drill, rig, stats)
    return FaultyRun(stats, requests, lifted[0] if lifted else None)


def enqueue(drill: Drill) -> list[str]:
    """Enqueue the drill's charges, marked ``metadata={"drill": <run id>}``; their keys."""
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


def _status_counts(drill: Drill) -> dict[str, int]:
    with drill.engine.connect() as conn:
        rows = conn.execute(
            select(charges.c.status, func.count()).where(drill.mine()).group_by(charges.c.status)
        )
        return {status: n for status, n in rows}


def charges_tried(drill: Drill) -> int:
    """How many of the drill's charges have at least one attempt recorded."""
    with drill.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count(func.distinct(charge_attempts.c.charge_id)))
                .select_from(charge_attempts.join(charges))
                .where(drill.mine())
            ).scalar_one()
        )


def attempts_of(drill: Drill) -> list[RowMapping]:
    """The attempts on the drill's charges, ordered by idempotency key, then number."""
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


def wait_final(
    drill: Drill, rig: Rig, timeout_s: float, tick: Callable[[], None] | None = None
) -> bool:
    """Poll every 100 ms until every drill charge is final; ``tick`` runs each time. Every
    ``PROGRESS_EVERY_S`` a line says how far it is: a drill can take minutes."""
    started = time.monotonic()
    deadline = started + timeout_s
    next_at = started
    next_progress = started + PROGRESS_EVERY_S
    while time.monotonic() < deadline:
        rig.check()
        if tick is not None:
            tick()
        counts = _status_counts(drill)
        final = sum(counts.get(s, 0) for s in _FINAL)
        if final >= drill.total:
            return True
        if time.monotonic() >= next_progress:
            next_progress += PROGRESS_EVERY_S
            waiting = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()) if s not in _FINAL)
            drill.story.progress(
                f"[{time.monotonic() - started:.0f} s] {final} of {drill.total} charges final"
                f" ({waiting}); waiting up to {timeout_s:.0f} s"
            )
        next_at = max(next_at + SAMPLE_INTERVAL_S, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
    drill.problems.append(f"charges still not final after {timeout_s:.0f} s")
    return False


def budget_s(drill: Drill, threads: int, call_s: float) -> float:
    """A generous bound on a drill's run: rounds of slow calls, then retries."""
    rounds = math.ceil(drill.total / threads)
    backoff = drill.settings.retry_backoff_max_s * 2
    return 60 + 3 * rounds * (call_s + 1) + backoff


def gaps_after(attempts: Sequence[RowMapping], error_class: str) -> list[float]:
    """Seconds from the end of each attempt that ended ``error_class`` to the next one."""
    gaps = []
    for prev, nxt in itertools.pairwise(attempts):
        same = prev["idempotency_key"] == nxt["idempotency_key"]
        if same and prev["error_class"] == error_class:
            gaps.append((nxt["started_at"] - prev["finished_at"]).total_seconds())
    return gaps


def span(values: Sequence[float], fmt: str = ".1f", unit: str = "") -> str:
    """``low-high<unit>`` (one figure when both format alike), or ``n/a``."""
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    if f"{low:{fmt}}" == f"{high:{fmt}}":
        return f"{low:{fmt}}{unit}"
    return f"{low:{fmt}}-{high:{fmt}}{unit}"


# --- the common checks and the verdict -----------------------------------------------


def ledger(drill: Drill, rig: Rig, stats: Mapping[str, Any]) -> None:
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


def provider_line(drill: Drill) -> str:
    """Every drill's last step: the provider's charges against payq's, from `ledger`."""
    f = drill.figures
    return (
        f"The provider made {f['provider_charges']} charges for {f['succeeded']} succeeded "
        f"charges; {f['matched']} of {f['succeeded']} charge ids payq stored match the "
        f"provider's charge for their key; duplicate_charges {f['duplicate_charges']}."
    )


def say_verdict(drill: Drill, ok: bool) -> None:
    """The closing line: ``nothing lost: ...`` when ok, else ``NOT OK (<problems>): ...``."""
    f = drill.figures
    figures = (
        f"{f.get('final', 0)}/{drill.total} charges final, {f.get('charged_once', 0)} charged "
        f"once at the provider, {f.get('duplicate_charges', '?')} duplicate charges"
    )
    if ok:
        drill.story.say(f"nothing lost: {figures}")
    else:
        drill.story.say(f"NOT OK ({'; '.join(drill.problems)}): {figures}")
