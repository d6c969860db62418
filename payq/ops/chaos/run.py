"""`run_chaos`: set up the servers and the system, drive the schedule of faults, judge.

One tick every 200 ms restarts what died (the supervisor's ``check()``), applies the
faults that are due (outage, Redis wipe, PostgreSQL restart), freezes or thaws a worker
group when a stall is due, SIGKILLs a worker process when one is due, and every 5 s
prints a progress line. The run ends when the producer is done, every fault was
applied, every killed or frozen group serves again, every charge is final and no dead
charge is of unknown outcome (the relay's sweep looked them up), or at the deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from devservices import ThrowawayPostgres, ThrowawayRedis, free_port
from payq.constants import FINAL_STATUSES, ChargeStatus, DeadOutcome
from payq.db import make_engine
from payq.models import charges
from payq.ops.chaos.doorway import Doorway
from payq.ops.chaos.measure import (
    RATE_WINDOW_S,
    ConnectionSampler,
    Kill,
    across_groups,
    claimed_before,
    killed_in_flight,
    ledger,
    outage_calls,
    relay_republished,
    retry_after,
)
from payq.ops.chaos.plan import ChaosPlan, child_environment, endpoints, simulator_args
from payq.ops.chaos.verdict import ChaosResult, Figure, checks, figure_line, largest, median
from payq.ops.system import LocalSystem, start_local_system
from payq.settings import Settings, load_settings

__all__ = ["run_chaos"]

PROGRESS_EVERY_S = 5.0
TICK_S = 0.2
DATABASE = "payq_chaos"


def run_chaos(
    plan: ChaosPlan | None = None, out: Callable[[str], None] | None = None
) -> ChaosResult:
    """Run the chaos suite and return its figures and failed checks.

    ``out`` receives each printed line (progress, events, the figure line, the verdict).
    The logs are removed when every check passed, and kept (``ChaosResult.logs``)
    otherwise. Raises `devservices.DevServiceError` when Redis or PostgreSQL
    cannot be started.
    """
    plan = plan or ChaosPlan()
    say = out or (lambda line: print(line, flush=True))
    workdir = Path(tempfile.mkdtemp(prefix="payq-chaos-"))
    say(
        f"payq chaos: {plan.charges} charges over {plan.enqueue_s:g} s, {plan.groups} worker "
        f"groups x {plan.processes} processes x {plan.threads} threads, "
        f"PAYMENT_MAX_CONCURRENCY={plan.max_concurrency}; logs in {workdir}/"
    )
    redis_server, pg = ThrowawayRedis(), ThrowawayPostgres()
    ok = False
    try:
        redis_server.start()
        pg.start()
        env = child_environment(plan, pg.create_database(DATABASE), redis_server.url)
        say(f"· throwaway Redis on port {redis_server.port}, PostgreSQL on port {pg.port}")
        _migrate(env, workdir)
        settings = load_settings(**{name.lower(): value for name, value in env.items()})
        engine = make_engine(settings, "chaos")  # not counted among the app's connections
        doorways: list[Doorway] = []

        def named(urls: list[str]) -> list[dict[str, Any]]:
            # Provider a's second address: the doorway to its port, open from the start.
            door = Doorway(free_port(), int(urls[0].rsplit(":", 1)[1]))
            door.open()
            doorways.append(door)
            return endpoints(plan, urls, f"http://127.0.0.1:{door.port}")

        try:
            with start_local_system(
                workdir,
                sim_args=simulator_args(plan),
                processes=plan.processes,
                threads=plan.threads,
                env=env,
                groups=plan.groups,
                providers=2,
                endpoints=named,
            ) as system:
                say(
                    f"· providers a (endpoints a1, a2) and b, {plan.groups} worker groups and "
                    "the relay are up"
                )
                servers = (redis_server, pg)
                result = _Run(plan, settings, system, engine, servers, doorways[0], say).go()
                ok = result.ok
                return result
        finally:
            for door in doorways:
                door.shut()
            engine.dispose()
    finally:
        pg.stop()
        redis_server.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)


def _migrate(env: Mapping[str, str], workdir: Path) -> None:
    """``payq migrate`` against the throwaway database, as a deploy runs it."""
    with (workdir / "migrate.log").open("ab") as log:
        done = subprocess.run(
            [sys.executable, "-m", "payq_cli", "migrate"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=120,
        )
    if done.returncode != 0:
        raise RuntimeError(f"payq migrate failed (exit {done.returncode}); see {workdir}")


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc): a dramatiq master's worker processes."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[-1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


@dataclass
class _Group:
    """What the run knows of one worker group's current master."""

    pid: int | None
    log_offset: int = 0  # where this master's output starts in the group's log
    ready: bool = False  # every process of it said "ready for action"
    killed_at: float | None = None  # when we SIGKILLed one of its processes


@dataclass
class _Events:
    outage_at: float | None = None
    late: str = ""  # provider a's late answers: "", "on", "over"
    refused: str = ""  # endpoint a2's connections refused: "", "on", "over"
    redis_restarts: int = 0
    pg_restarts: int = 0
    pg_restarted_at: float | None = None
    kills: list[Kill] = field(default_factory=list)
    back_s: list[float] = field(default_factory=list)  # kill -> the new group all ready
    stalls: int = 0
    frozen: tuple[str, int, float] | None = None  # (group, master pid, thaw at)


class _Run:
    """One run: the producer, the schedule of faults, progress lines, then the figures."""

    def __init__(
        self,
        plan: ChaosPlan,
        settings: Settings,
        system: LocalSystem,
        engine: Engine,
        servers: tuple[ThrowawayRedis, ThrowawayPostgres],
        doorway: Doorway,
        say: Callable[[str], None],
    ) -> None:
        self.plan, self.settings, self.system, self.engine = plan, settings, system, engine
        self.redis_server, self.pg = servers
        self.doorway = doorway
        self.say = say
        self.workdir = system.logs["relay"].parent  # the run's folder: every log is there
        self.rng = random.Random(plan.seed)
        self.events = _Events()
        self.sampler = ConnectionSampler(engine)
        self.groups = {
            g.name: _Group(g.proc.pid if g.proc is not None else None) for g in system.workers
        }

    def go(self) -> ChaosResult:
        plan = self.plan
        self.sampler.start()
        producer = self._start_producer()
        t0 = time.time()
        next_kill = t0 + self._kill_gap()
        next_progress = t0 + PROGRESS_EVERY_S
        try:
            while time.time() < t0 + plan.deadline_s:
                self.system.check()
                self._watch_groups()
                now = time.time()
                self._faults_due(now - t0)
                self._stalls_due(now - t0)
                if now >= next_kill:
                    if now - t0 < plan.kills_until_s and self._may_kill(now - t0):
                        self._kill()
                    next_kill = time.time() + self._kill_gap()
                if now >= next_progress:
                    next_progress += PROGRESS_EVERY_S
                    self._progress(now - t0)
                if self._done(producer):
                    break
                time.sleep(TICK_S)
        finally:
            if producer.poll() is None:
                producer.kill()
            producer.wait()
            self._thaw()  # never leave a group frozen
            self.sampler.stop.set()
            self.sampler.join()
        elapsed_s = time.time() - t0
        self.system.stop_workers()
        providers = range(len(self.system.sim_urls))
        stats = [self.system.stats(i) for i in providers]
        logs = [self.system.request_log(i) for i in providers]
        books = [self.system.books(i) for i in providers]
        # Kept with the other logs when a check fails: every call, to see what happened.
        (self.workdir / "provider-requests.json").write_text(json.dumps(logs))
        figures = self._figures(stats, logs, books, elapsed_s)
        failed = checks(figures, plan, producer.returncode)
        line = figure_line(figures)
        self.say(line)
        if failed:
            self.say("chaos FAILED: " + "; ".join(failed))
            self.say(f"logs kept in {self.workdir}/")
        else:
            self.say("chaos ok: every check passed")
        return ChaosResult(figures, failed, line, self.workdir if failed else None)

    def _start_producer(self) -> subprocess.Popen[bytes]:
        """The web app's stand-in (`payq.ops.chaos.produce`), in a process of its own."""
        run_id = uuid.uuid4().hex[:8]
        argv = [sys.executable, "-m", "payq.ops.chaos.produce", "--run", run_id]
        argv += ["--charges", str(self.plan.charges), "--seconds", str(self.plan.enqueue_s)]
        with (self.workdir / "producer.log").open("ab") as log:
            return subprocess.Popen(argv, env=self.system.env, stdout=log, stderr=subprocess.STDOUT)

    # --- the faults ---------------------------------------------------------------
    def _faults_due(self, t: float) -> None:
        plan, events = self.plan, self.events
        if events.outage_at is None and t >= plan.outage_at_s:
            events.outage_at = time.time()
            # Charges fail while lookups answer: a charge that got a 503 is found not
            # charged there and moves to provider b (the 5xx rule of the pin).
            self.system.faults(outage_s=plan.outage_s, outage_mode="charges")
            self.say(
                f"· provider a down for {plan.outage_s:g} s: every charge answered 503 "
                "(lookups by key still answered)"
            )
        self._provider_a_faults(t)
        if not events.redis_restarts and t >= plan.redis_restart_at_s:
            self.redis_server.restart(wipe=True)
            events.redis_restarts += 1
            self.say("· Redis restarted with its data gone: the relay republishes from PostgreSQL")
        if not events.pg_restarts and t >= plan.pg_restart_at_s:
            self.pg.restart()
            events.pg_restarts += 1
            events.pg_restarted_at = time.time()
            self.say("· PostgreSQL restarted")

    def _provider_a_faults(self, t: float) -> None:
        """Provider a charges then answers late for a while; later its second address
        refuses connections for a while."""
        plan, events = self.plan, self.events
        if not events.late and t >= plan.late_at_s:
            events.late = "on"
            self.system.faults(timeout_rate=0.6)
            self.say(f"· provider a charges, then answers too late, for {plan.late_s:g} s")
        elif events.late == "on" and t >= plan.late_at_s + plan.late_s:
            events.late = "over"
            self.system.faults(timeout_rate=0.05)
        if not events.refused and t >= plan.refuse_at_s:
            events.refused = "on"
            self.doorway.shut()
            self.say(f"· endpoint a2 refuses connections for {plan.refuse_s:g} s")
        elif events.refused == "on" and t >= plan.refuse_at_s + plan.refuse_s:
            events.refused = "over"
            self.doorway.open()
            self.say("· endpoint a2 takes connections again")

    def _stalls_due(self, t: float) -> None:
        """Freeze one group when a stall is due (its calls in flight), thaw it after."""
        events, plan = self.events, self.plan
        if events.frozen is not None:
            if time.time() >= events.frozen[2]:
                self._thaw()
            return
        if events.stalls >= plan.stalls or t < plan.stall_at_s(events.stalls):
            return
        ready = [
            name
            for name, group in self.groups.items()
            if group.ready and group.killed_at is None and group.pid is not None
        ]
        if not ready:
            return
        name = self.rng.choice(ready)
        pid = self.groups[name].pid
        assert pid is not None
        os.killpg(pid, signal.SIGSTOP)  # the master and its processes, calls in flight
        events.stalls += 1
        events.frozen = (name, pid, time.time() + plan.stall_s)
        self.say(f"· SIGSTOP worker group {name} for {plan.stall_s:g} s (past its lease)")

    def _thaw(self) -> None:
        frozen = self.events.frozen
        if frozen is None:
            return
        name, pid, _ = frozen
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
        self.events.frozen = None
        self.say(f"· SIGCONT worker group {name}")

    def _kill_gap(self) -> float:
        return self.plan.kill_every_s * self.rng.uniform(0.6, 1.4)

    def _may_kill(self, t: float) -> bool:
        """Not where a kill would distort the breaker's figures or the recovery's."""
        plan = self.plan
        if plan.outage_at_s - RATE_WINDOW_S - 3 <= t <= plan.outage_end_s:
            return False
        restarted = self.events.pg_restarted_at
        if restarted is None:
            return t < plan.pg_restart_at_s - 3
        return time.time() >= restarted + 3

    def _kill(self) -> None:
        """SIGKILL one worker process of a group that is fully up.

        Never one still booting: its dramatiq master would wait out its 30 s
        ``worker_fork_timeout`` for the dead process before stopping the group.
        """
        eligible = []
        frozen = self.events.frozen[0] if self.events.frozen else None
        for name, group in self.groups.items():
            if name == frozen:
                continue
            if group.ready and group.killed_at is None and group.pid is not None:
                kids = _children(group.pid)
                if len(kids) == self.plan.processes:
                    eligible.append((name, kids))
        if not eligible:
            return
        name, kids = self.rng.choice(eligible)
        pid = self.rng.choice(kids)
        os.kill(pid, signal.SIGKILL)
        at = time.time()
        self.groups[name].killed_at = at
        try:
            claimed: list[tuple[uuid.UUID, int]] | None = claimed_before(
                self.engine, self.settings, at
            )
        except SQLAlchemyError:
            claimed = None
        self.events.kills.append(Kill(at, name, pid, claimed))
        self.say(f"· SIGKILL worker process {pid} of {name}")

    def _watch_groups(self) -> None:
        """Notice restarted masters, and when all the processes of each are ready."""
        for supervised in self.system.workers:
            group = self.groups[supervised.name]
            pid = supervised.proc.pid if supervised.proc is not None else None
            log = self.system.logs[supervised.name]
            if pid != group.pid:  # restarted: its output starts here
                group = _Group(pid, log.stat().st_size, killed_at=group.killed_at)
                self.groups[supervised.name] = group
            if group.ready or not supervised.alive():
                continue
            with log.open("rb") as f:
                f.seek(group.log_offset)
                group.ready = f.read().count(b"ready for action") >= self.plan.processes
            if group.ready and group.killed_at is not None:
                self.events.back_s.append(time.time() - group.killed_at)
                group.killed_at = None

    # --- progress -----------------------------------------------------------------
    def _done(self, producer: subprocess.Popen[bytes]) -> bool:
        """Everything enqueued and final, every fault applied, every group serving again."""
        events = self.events
        if producer.poll() is None or not events.pg_restarts:
            return False
        if events.stalls < self.plan.stalls or events.frozen is not None:
            return False
        if not all(g.ready and g.killed_at is None for g in self.groups.values()):
            return False
        try:
            counts = self._counts()
        except SQLAlchemyError:
            return False
        if sum(counts.get(s, 0) for s in FINAL_STATUSES) < self.plan.charges:
            return False
        try:  # and the sweep has looked up every charge of unknown outcome
            with self.engine.connect() as conn:
                unknown = conn.execute(
                    select(func.count()).where(charges.c.dead_outcome == DeadOutcome.UNKNOWN)
                ).scalar_one()
        except SQLAlchemyError:
            return False
        return unknown == 0

    def _counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(charges.c.status, func.count()).group_by(charges.c.status))
            return {status: n for status, n in rows}

    def _progress(self, t: float) -> None:
        try:
            counts = self._counts()
        except SQLAlchemyError:
            self.say(f"  [{t:5.1f}s] PostgreSQL does not answer")
            return
        try:
            stats = self.system.stats()
            stats_b = self.system.stats(1)
        except Exception:  # the figures are for the eye only; the verdict reads them again
            stats, stats_b = {}, {}
        final = sum(counts.get(s, 0) for s in FINAL_STATUSES)
        states = " · ".join(
            f"{s} {counts.get(s, 0)}" for s in ("pending", "processing", "retrying", "dead")
        )
        self.say(
            f"  [{t:5.1f}s] enqueued {sum(counts.values())}/{self.plan.charges} · final {final} "
            f"· {states} | provider a {stats.get('requests', '?')} requests, "
            f"{stats.get('in_flight', '?')} in flight, b {stats_b.get('requests', '?')} "
            f"requests | kills {len(self.events.kills)} | "
            f"app connections {self.sampler.latest} (max {self.sampler.max_total})"
        )

    # --- figures ------------------------------------------------------------------
    def _figures(
        self,
        stats: list[dict[str, Any]],
        logs: list[list[dict[str, Any]]],
        books: list[list[dict[str, Any]]],
        elapsed_s: float,
    ) -> dict[str, Figure]:
        """Figures over both providers (their books and request logs together), the
        outage's over provider a's own log."""
        plan, pool, events = self.plan, self.settings.database_pool_max_connections, self.events
        counts = self._counts()
        log = sorted((r for one in logs for r in one), key=lambda r: float(r["at"]))
        limited, violations, slack_ms = retry_after(log)
        during, expected = outage_calls(logs[0], events.outage_at, plan.outage_s)
        lost = killed_in_flight(self.engine, events.kills)
        takeover = [r.takeover_s for r in lost if r.takeover_s is not None]
        recovery = [r.final_s for r in lost if r.final_s is not None]
        relay_lost, relay_leases = relay_republished(self.system.logs["relay"])
        return {
            **ledger(self.engine, [b for book in books for b in book], log),
            **across_groups(books, logs),
            "stalls": events.stalls,
            "charges": plan.charges,
            "final": sum(counts.get(s, 0) for s in FINAL_STATUSES),
            "succeeded": counts.get(ChargeStatus.SUCCEEDED, 0),
            "failed": counts.get(ChargeStatus.FAILED, 0),
            "dead": counts.get(ChargeStatus.DEAD, 0),
            "provider_requests": sum(int(st.get("requests", -1)) for st in stats),
            "duplicate_charges": sum(int(st.get("duplicate_charges", 1)) for st in stats),
            "max_in_flight": max(int(st.get("max_in_flight", -1)) for st in stats),
            # Which requests were open at that peak, per provider: names a 9/8's cause.
            "in_flight_peak": " | ".join(
                f"provider {'ab'[i] if i < 2 else i}: {', '.join(st.get('peak', []))}"
                for i, st in enumerate(stats)
            ),
            "max_concurrency": plan.max_concurrency,
            "max_app_connections": self.sampler.max_total,
            # Every worker process's pool, and the relay's (one process, one pool).
            "app_connection_bound": plan.groups * plan.processes * pool + pool,
            "max_process_connections": self.sampler.max_per_process,
            "connection_samples": self.sampler.samples,
            "connection_samples_missed": self.sampler.missed,
            "kills": len(events.kills),
            "group_restarts": sum(group.restarts for group in self.system.workers),
            "group_back_s_median": median(events.back_s),
            "group_back_s_max": largest(events.back_s),
            "redis_restarts": events.redis_restarts,
            "pg_restarts": events.pg_restarts,
            "rate_limited": limited,
            "retry_after_violations": violations,
            "retry_after_min_slack_ms": round(slack_ms) if slack_ms is not None else "n/a",
            "relay_republished_lost": relay_lost,
            "relay_republished_leases": relay_leases,
            "outage_calls": during,
            "outage_expected_calls": round(expected),
            "killed_in_flight": len(lost),
            "takeover_s_median": median(takeover),
            "takeover_s_max": largest(takeover),
            "recovery_s_median": median(recovery),
            "recovery_s_max": largest(recovery),
            "elapsed_s": round(elapsed_s, 1),
        }
