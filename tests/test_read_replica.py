"""Reads from a streaming replica (``payq.reads``), against a real one: a throwaway primary
and its hot standby (``devservices.replica``), replay paused to make lag on demand.

What only reads (status, ``dlq list``/``show``/``export``, the dashboard's pages) reads the
replica while it is close enough behind, and says how far; writes (enqueue, replay,
purge) go to the primary; a replica too far behind, or down, sends reads to the primary
and the output says why.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg2  # type: ignore[import-untyped, unused-ignore]
import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError

from devservices import ThrowawayPostgres
from devservices.replica import ThrowawayReplica
from payq import reads
from payq.constants import ChargeStatus, DeadOutcome
from payq.db import get_engine, make_engine, transaction
from payq.errors import ChargeNotFound
from payq.migrate import migrate
from payq.models import charges
from payq.ops.dlq import DeadFilter, dead_charges, purge, replay, show
from payq.ops.reconcile import reconcile
from payq.ops.status import render, snapshot
from payq.reads import read_source
from payq.runtime import Runtime, runtime, use
from payq.settings import Settings, load_settings
from producers import enqueue_charge
from tests.conftest import TEST_ENV
from tests.helpers import charge, unique_key, wait_until
from tests.webapp import OPERATOR, bearer, intake_settings

#: Small enough that a test waits little for a replica to be "too far behind", large
#: enough that a read right after a write stays within it on a busy machine.
MAX_LAG_S = 3.0


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ThrowawayPostgres, ThrowawayReplica]]:
    """A primary with payq's schema, and its streaming replica."""
    with ThrowawayPostgres(max_connections=60) as primary:
        dsn = primary.create_database("payq")
        engine = make_engine(load_settings(database_url=dsn), "test-migrate")
        migrate(engine)
        engine.dispose()
        with ThrowawayReplica(primary) as replica:
            replica.wait_caught_up()
            yield primary, replica


@dataclass
class Cluster:
    primary: ThrowawayPostgres
    replica: ThrowawayReplica
    settings: Settings

    def env(self) -> dict[str, str]:
        """The environment of a ``payq`` command using this primary and replica."""
        return {
            **TEST_ENV,
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": self.primary.dsn("payq"),
            "DATABASE_READ_URL": self.replica.dsn("payq"),
            "DATABASE_READ_MAX_LAG_S": str(MAX_LAG_S),
        }

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "payq_cli", *args],
            env={**self.env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def dead(self, outcome: DeadOutcome = DeadOutcome.NOT_CHARGED) -> uuid.UUID:
        """A charge enqueued (on the primary, as every write) and then dead."""
        cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("replica")).id
        with transaction() as conn:
            conn.execute(
                update(charges)
                .where(charges.c.id == cid)
                .values(
                    status=ChargeStatus.DEAD,
                    dead_reason="declined for the test",
                    dead_outcome=outcome,
                )
            )
        return cid

    def fresh(self) -> uuid.UUID:
        """A dead charge the replica has replayed: it is caught up, and its last replayed
        commit is a moment old."""
        cid = self.dead()
        self.replica.wait_caught_up()
        return cid

    def behind(self) -> None:
        """Wait until the paused replica is past the bound and the last decision expired."""
        time.sleep(MAX_LAG_S + reads.RECHECK_S + 0.3)


@pytest.fixture
def cluster(servers: tuple[ThrowawayPostgres, ThrowawayReplica]) -> Iterator[Cluster]:
    """This process reads and writes the throwaway pair for one test (a runtime of its
    own: its engines, its decision about the replica), the replica running and replaying."""
    primary, replica = servers
    replica.start()
    replica.resume()
    replica.wait_caught_up()
    settings = intake_settings(
        database_url=primary.dsn("payq"),
        database_read_url=replica.dsn("payq"),
        database_read_max_lag_s=MAX_LAG_S,
    )
    before = use(Runtime(settings, role="test"))
    try:
        with transaction() as conn:
            conn.execute(text("TRUNCATE charge_attempts, charges, operator_actions"))
        replica.wait_caught_up()
        yield Cluster(primary, replica, settings)
    finally:
        replica.resume() if replica.is_running() else None
        runtime().close()
        use(before)


def _replica_rows(replica: ThrowawayReplica, sql: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(replica.dsn("payq").replace("+psycopg2", ""))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def test_reads_come_from_the_replica_and_writes_go_to_the_primary(cluster: Cluster) -> None:
    replayed_before = cluster.fresh()
    purged_before = cluster.fresh()
    seen = cluster.fresh()
    cluster.replica.pause()
    unseen = cluster.dead(DeadOutcome.UNKNOWN)  # on the primary only, until replay resumes
    listed = {d.charge.id for d in dead_charges(DeadFilter())}
    assert listed == {replayed_before, purged_before, seen}  # the replica's view
    assert reconcile(DeadFilter(), actor="test", dry_run=True).planned == []  # its search too
    source = read_source()
    assert source.replica and source.lag_s is not None and 0 <= source.lag_s <= MAX_LAG_S
    # The replica's own sessions show who reads there: this process's read pool.
    names = [n for (n,) in _replica_rows(cluster.replica, "SELECT application_name FROM "
                                          "pg_stat_activity")]  # fmt: skip
    assert any(n.startswith("payq-test-read-") for n in names), names

    snap = snapshot(cluster.settings)
    assert snap["reads"]["from"] == "replica" and snap["charges"]["dead"] == 3
    assert snap["reads"]["lag_s"] <= MAX_LAG_S and snap["reads"]["warning"] is None
    assert "reads      from the replica, " in render(snap)
    with pytest.raises(ChargeNotFound, match=str(unseen)):
        show(unseen)  # not on the replica yet

    # Writes, and the reads they decide by, are the primary's: they see what it has.
    assert purge(DeadFilter(ids=[unseen, purged_before]), actor="test") != []
    assert set(purge(DeadFilter(ids=[unseen]), actor="test", dry_run=True)) == set()
    assert replay(DeadFilter(ids=[replayed_before]), actor="test").replayed == [replayed_before]
    assert charge(replayed_before).status is ChargeStatus.PENDING
    assert charge(unseen).purged_at is not None
    # ...while the replica still shows what it had (within the bound, so read from it).
    assert {d.charge.id for d in dead_charges(DeadFilter())} == listed

    cluster.replica.resume()
    cluster.replica.wait_caught_up()
    time.sleep(reads.RECHECK_S + 0.1)
    assert {d.charge.id for d in dead_charges(DeadFilter())} == {seen}


def test_a_replica_past_the_bound_sends_reads_to_the_primary_and_says_so(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.fresh()
    cluster.replica.pause()
    unseen = cluster.dead()
    cluster.behind()
    with caplog.at_level(logging.WARNING, logger="payq.reads"):
        snap = snapshot(cluster.settings)
        time.sleep(reads.RECHECK_S + 0.1)
        read_source()  # measured again, still behind: not logged again
    reads_ = snap["reads"]
    assert reads_["from"] == "primary" and reads_["lag_s"] > MAX_LAG_S
    assert "DATABASE_READ_MAX_LAG_S" in reads_["warning"] and "behind" in reads_["warning"]
    assert "reads      from the PRIMARY: the replica at DATABASE_READ_URL is " in render(snap)
    assert snap["charges"]["dead"] == 2  # the primary's figures, with the unseen charge
    assert show(unseen)[0].charge.id == unseen
    warnings = [r.getMessage() for r in caplog.records if r.name == "payq.reads"]
    assert len(warnings) == 1 and "behind" in warnings[0], warnings

    listed = cluster.cli("dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert str(unseen) in listed.stdout
    assert "payq: read from the PRIMARY: the replica at DATABASE_READ_URL is" in listed.stderr
    status = cluster.cli("status")
    assert status.returncode == 0, status.stderr
    assert "reads      from the PRIMARY: " in status.stdout

    cluster.replica.resume()
    cluster.replica.wait_caught_up()
    time.sleep(reads.RECHECK_S + 0.1)
    assert read_source().replica


def test_an_idle_primary_is_not_lag(cluster: Cluster) -> None:
    """Nothing committed for longer than the bound: the replica has replayed everything
    it received, so it is read, though its last replayed commit is old."""
    cluster.fresh()
    time.sleep(MAX_LAG_S + reads.RECHECK_S + 0.3)
    rows = _replica_rows(
        cluster.replica, "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())"
    )
    assert float(rows[0][0]) > MAX_LAG_S
    source = read_source()
    assert source.replica and source.lag_s == 0.0
    status = cluster.cli("status")
    assert status.returncode == 0, status.stderr
    assert "reads      from the replica, 0.0 s behind (at most 3 s)" in status.stdout


def test_a_stopped_replica_sends_reads_to_the_primary_with_a_warning(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = cluster.fresh()
    monkeypatch.setattr(reads, "RECHECK_S", 60.0)  # only a failed read ends the decision
    assert read_source().replica
    cluster.replica.stop(keep_data=True)
    failed = 0
    for _ in range(2):  # the read in flight may fail; the next one asks the replica again
        try:
            assert [d.charge.id for d in dead_charges(DeadFilter())] == [cid]
            break
        except OperationalError:
            failed += 1
    assert failed <= 1 and not read_source().replica
    monkeypatch.setattr(reads, "DOWN_RECHECK_S", 0.0)  # measure at every read
    with caplog.at_level(logging.WARNING, logger="payq.reads"):
        assert [d.charge.id for d in dead_charges(DeadFilter())] == [cid]
        snap = snapshot(cluster.settings)
    warning = snap["reads"]["warning"]
    assert snap["reads"]["from"] == "primary" and snap["charges"]["dead"] == 1
    assert warning.startswith("the replica at DATABASE_READ_URL did not answer"), warning
    assert str(cluster.replica.port) not in warning  # never the URL
    logged = [r.getMessage() for r in caplog.records if r.name == "payq.reads"]
    assert len(logged) == 1, logged  # once per change, not per read
    listed = cluster.cli("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert str(cid) in listed.stdout
    assert "payq: read from the PRIMARY: the replica at DATABASE_READ_URL did not" in (
        listed.stderr
    )
    exported = cluster.cli("dlq", "export", "--format", "jsonl")
    assert exported.returncode == 0 and str(cid) in exported.stdout
    assert "did not answer" in exported.stderr and "did not" not in exported.stdout

    cluster.replica.start()
    wait_until(lambda: read_source().replica, 20, "reads back on the replica")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_dashboard_shows_the_lag_and_any_fallback(cluster: Cluster) -> None:
    from payq_cli.serve import build_app

    cid = cluster.fresh()
    app = build_app(cluster.settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {**bearer(OPERATOR), "Accept": "text/html"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://ops", headers=headers
    ) as web:
        page = await web.get("/ops")
        assert page.status_code == 200, page.text
        assert 'data-reads="replica"' in page.text and "behind (at most 3 s)" in page.text
        dead = await web.get("/ops/dead")
        assert str(cid) in dead.text and 'data-reads="primary"' not in dead.text

        cluster.replica.pause()
        unseen = cluster.dead()
        assert str(unseen) not in (await web.get("/ops/dead")).text  # from the replica
        # A change's confirmation is the primary's: what it would touch, and its money.
        confirm = await web.get(f"/ops/confirm/purge?id={unseen}")
        assert confirm.status_code == 200, confirm.text
        assert 'data-confirm-count="1"' in confirm.text and "19.99 USD" in confirm.text
        cluster.behind()
        live = await web.get("/ops/live")
        assert 'data-reads="primary"' in live.text and "DATABASE_READ_MAX_LAG_S" in live.text
        dead = await web.get("/ops/dead")
        assert str(unseen) in dead.text  # from the primary, and the page says so
        assert 'data-reads="primary"' in dead.text and "Read from the primary" in dead.text
    app.state.health.close()


def test_a_bad_read_url_is_one_line_naming_the_setting(cluster: Cluster) -> None:
    from payq.errors import ConfigError

    assert load_settings(database_read_url="").read_url is None
    with pytest.raises(ConfigError, match=r"^DATABASE_READ_URL: must be a postgresql://"):
        load_settings(database_read_url="mysql://reader:secret@127.0.0.1/payq")
    status = cluster.cli("status", DATABASE_READ_URL="mysql://reader:secret@127.0.0.1/payq")
    assert status.returncode == 2
    assert len(status.stderr.strip().splitlines()) == 1 and "DATABASE_READ_URL" in status.stderr
    assert "secret" not in status.stderr
    # A URL that names no standby (here: the primary itself) is not read, and says so.
    settings = cluster.settings.model_copy(update={"database_read_url": None})
    primary_as_replica = settings.model_copy(
        update={"database_read_url": load_settings(
            database_read_url=cluster.primary.dsn("payq")).database_read_url}
    )  # fmt: skip
    with_primary = Runtime(primary_as_replica, role="test")
    before = use(with_primary)
    try:
        source = read_source()
        assert not source.replica and "not a standby" in (source.warning or "")
        assert source.engine is get_engine()
        with transaction(source.engine) as conn:
            assert conn.execute(text("SELECT NOT pg_is_in_recovery()")).scalar_one()
    finally:
        with_primary.close()
        use(before)


def test_a_read_url_naming_another_database_says_to_name_the_primarys(cluster: Cluster) -> None:
    """Reproduced before: "... the database DATABASE_READ_URL names does not exist: run
    `payq migrate` (it creates it)", which a read-only replica cannot follow."""
    status = cluster.cli("status", DATABASE_READ_URL=cluster.replica.dsn("payq_not_there"))
    assert status.returncode == 0, status.stderr
    assert "does not exist there: name DATABASE_URL's database" in status.stdout
    assert "payq migrate" not in status.stdout + status.stderr


def test_the_health_gauges_count_dead_charges_on_the_replica(cluster: Cluster) -> None:
    from prometheus_client import REGISTRY

    from payq.broker import get_broker
    from payq.constants import redis_key
    from workers.middleware.health import HealthChecks

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("payq_dead_letters")

    broker = get_broker()
    leader = redis_key(broker.namespace, "health", "leader")
    seen = cluster.fresh()
    cluster.replica.pause()
    cluster.dead()  # on the primary only
    checks = HealthChecks(cluster.settings)
    try:
        broker.client.delete(leader)
        checks()
        assert gauge() == 1  # the replica's count
        assert [d.charge.id for d in dead_charges(DeadFilter())] == [seen]
        cluster.behind()
        broker.client.delete(leader)
        checks()
        assert gauge() == 2  # past the bound: the primary's
    finally:
        broker.client.delete(leader)
        for client in (checks._clients or {}).values():
            client.close()
        if checks._engine is not None:
            checks._engine.dispose()
