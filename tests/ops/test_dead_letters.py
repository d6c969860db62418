"""Dead-letter draining and reconciliation against real PostgreSQL, Redis and the simulator."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import select, text

from payq.db import transaction
from payq.models import operator_actions
from payq.ops import broker_dlq
from payq.ops.dlq import DeadFilter, dead_charges, purge, replay, show, totals
from payq.ops.reconcile import reconcile
from payq.processing import Result, process_charge
from payq.provider import ProviderClient
from payq.settings import load_settings
from producers import enqueue_charge
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, NAMESPACE, REDIS_URL, TEST_ENV
from tests.helpers import Sim, charge, lease_passes, unique_key

pytestmark = pytest.mark.usefixtures("clean")


class Ops:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.settings = load_settings(payment_provider_url=sim.url, retry_max_attempts=1)
        self.provider = ProviderClient(self.settings)

    def dead(self, step: str, amount: int = 1999, currency: str = "usd") -> uuid.UUID:
        """A charge that went dead after one attempt ending in ``step``; when that step
        leaves the outcome unclear, the lookup before it went dead failed too."""
        self.sim.faults(script=[step], timeout_delay_s=3, lookup_error_rate=1.0)
        cid = enqueue_charge(amount, currency, "tok_visa", unique_key("dead")).id
        result = process_charge(str(cid), settings=self.settings, provider=self.provider)
        self.sim.faults(lookup_error_rate=0.0)
        assert result is Result.DEAD
        return cid

    def run_once_more(self, cid: uuid.UUID) -> Result:
        """One attempt with a budget of one: a failure kills the charge again."""
        return process_charge(str(cid), settings=self.settings, provider=self.provider)

    def run(self, cid: uuid.UUID) -> Result:
        settings = load_settings(payment_provider_url=self.sim.url)
        return process_charge(str(cid), settings=settings, provider=self.provider)

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "payq_cli", *args],
            env={
                **TEST_ENV,
                "PATH": "/usr/bin:/bin",
                "PAYMENT_PROVIDER_URL": self.sim.url,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def ops() -> Iterator[Ops]:
    with SimulatorThread(api_key=API_KEY) as thread:
        o = Ops(Sim(thread.url))
        yield o
        o.provider.close()


def audit_rows() -> list[dict[str, Any]]:
    with transaction() as conn:
        return [dict(r) for r in conn.execute(select(operator_actions)).mappings()]


def test_list_filters_and_totals(ops: Ops) -> None:
    bad = ops.dead("invalid_request", 1000, "usd")
    unknown = ops.dead("timeout", 2500, "usd")
    eur = ops.dead("auth", 700, "eur")
    everything = DeadFilter()
    assert {d.charge.id for d in dead_charges(everything)} == {bad, unknown, eur}
    assert totals(everything) == {"eur": (1, 700), "usd": (2, 3500)}
    assert [d.charge.id for d in dead_charges(DeadFilter(error_class="timeout"))] == [unknown]
    assert [d.charge.id for d in dead_charges(DeadFilter(reason="AUTHENTICATION"))] == [eur]
    assert [d.charge.id for d in dead_charges(DeadFilter(currency="EUR"))] == [eur]
    assert [d.charge.id for d in dead_charges(DeadFilter(min_amount=2000))] == [unknown]
    assert {d.charge.id: d.outcome_unknown for d in dead_charges(everything)} == {
        bad: False,
        unknown: True,
        eur: False,
    }


def test_cli_list_is_a_table_with_totals_and_json_on_request(ops: Ops) -> None:
    ops.dead("invalid_request", 1999, "usd")
    ops.dead("timeout", 500, "jpy")
    table = ops.cli("dlq", "list")
    assert table.returncode == 0, table.stderr
    assert "outcome unknown" in table.stdout
    assert "2 dead charges in the view: 500 JPY, 19.99 USD" in table.stdout
    as_json = json.loads(ops.cli("dlq", "list", "--json").stdout)
    assert as_json["count"] == 2 and as_json["totals"]["usd"] == {"count": 1, "amount": 1999}


def test_show_has_every_attempt(ops: Ops) -> None:
    cid = ops.dead("timeout")
    dead, attempts = show(cid)
    # The call got no answer, and the lookup by key before it went dead failed too.
    assert dead.outcome_unknown
    assert [(a["kind"], a["outcome"]) for a in attempts] == [
        ("charge", "no_answer"),
        ("lookup", "unclear"),
    ]
    out = ops.cli("dlq", "show", str(cid))
    assert out.returncode == 0 and "no_answer" in out.stdout and "timeout" in out.stdout
    assert "outcome unknown" in out.stdout and "lookup" in out.stdout


def test_replay_uses_the_same_key_a_fresh_budget_and_is_audited(ops: Ops) -> None:
    cid = ops.dead("error")
    key = charge(cid).idempotency_key
    report = replay(DeadFilter(ids=[cid]), actor="alice")
    assert report.replayed == [cid]
    c = charge(cid)
    assert (c.status, c.idempotency_key, c.retry_base, c.dead_reason) == ("pending", key, 1, None)
    client = redis.Redis.from_url(REDIS_URL)
    payloads = [json.loads(p) for p in client.hvals(f"{NAMESPACE}:charges.msgs")]
    client.close()
    assert [p["args"] for p in payloads if p["message_id"] == c.message_id] == [[str(cid)]]
    assert ops.run(cid) is Result.SUCCEEDED
    assert [r["status"] for r in ops.sim.requests(key)] == [503, 200]
    [row] = audit_rows()
    assert (row["actor"], row["action"], row["charge_ids"], row["count"]) == (
        "alice",
        "replay",
        [cid],
        1,
    )


def test_replay_dry_run_changes_nothing_and_refuses_to_guess(ops: Ops) -> None:
    cid = ops.dead("error")
    out = ops.cli("dlq", "replay", "--all", "--dry-run")
    assert out.returncode == 0 and "would replay 1 dead charge (" in out.stdout
    assert str(cid) in out.stdout  # a dry run names what it would touch
    assert charge(cid).status == "dead" and audit_rows() == []
    nothing = ops.cli("dlq", "replay")
    assert nothing.returncode == 2 and "give IDs, a filter" in nothing.stderr


def test_replay_is_rate_bounded(ops: Ops) -> None:
    for _ in range(12):
        ops.dead("invalid_request")
    started = time.monotonic()
    report = replay(DeadFilter(), actor="bob", rate_per_s=5)
    assert len(report.replayed) == 12
    assert time.monotonic() - started >= 2.0  # 12 at 5/s: three batches, two waits


def test_a_charge_older_than_key_retention_is_not_replayed(ops: Ops) -> None:
    cid = ops.dead("error")
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET created_at = now() - interval '2 days'"))
    planned = replay(DeadFilter(ids=[cid]), actor="carol", dry_run=True)
    assert planned.planned == [] and cid in planned.skipped  # the dry run tells the truth
    report = replay(DeadFilter(ids=[cid]), actor="carol")
    assert report.replayed == [] and "could charge twice" in report.skipped[cid]
    assert charge(cid).status == "dead"


def test_reconcile_leaves_a_charge_past_key_retention_to_a_person(ops: Ops) -> None:
    cid = ops.dead("timeout")
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET created_at = now() - interval '2 days'"))
    report = reconcile(DeadFilter(), actor="erin", provider=ops.provider)
    assert report.settled == [] and "check by hand" in report.pending[cid]
    assert charge(cid).reconciled_at is None and charge(cid).status == "dead"


def test_a_replayed_charge_starts_afresh_in_the_view(ops: Ops) -> None:
    cid = ops.dead("reset")
    reconcile(DeadFilter(), actor="erin", provider=ops.provider)  # not charged at provider
    purge(DeadFilter(ids=[cid]), actor="dave")
    assert replay(DeadFilter(ids=[cid], include_purged=True), actor="alice").replayed == [cid]
    c = charge(cid)
    assert (c.status, c.purged_at, c.purged_by, c.reconciled_at) == ("pending", None, None, None)
    ops.sim.faults(script=["timeout"], timeout_delay_s=3, lookup_error_rate=1.0)
    assert ops.run_once_more(cid) is Result.DEAD  # dies again, outcome unknown again
    [again] = dead_charges(DeadFilter())
    assert again.charge.id == cid and again.outcome_unknown


def test_reconcile_does_not_mark_a_charge_replayed_meanwhile_not_charged(ops: Ops) -> None:
    cid = ops.dead("reset")  # not charged: the lookup would say so
    lease_passes(cid)  # once its request can no longer arrive

    class ReplayedDuringLookup(ProviderClient):
        def find_charge(self, idempotency_key: str) -> Any:
            with transaction() as conn:  # an operator's replay and a new attempt, meanwhile
                conn.execute(text("UPDATE charges SET attempts = attempts + 1"))
            return super().find_charge(idempotency_key)

    with ReplayedDuringLookup(ops.settings) as provider:
        report = reconcile(DeadFilter(), actor="erin", provider=provider)
    assert report.settled == [] and "changed while" in report.pending[cid]
    assert charge(cid).status == "dead" and charge(cid).reconciled_at is None


def test_a_charge_the_provider_made_is_settled_even_if_replayed_meanwhile(ops: Ops) -> None:
    """The provider's books decide: whoever asked, the charge it made is succeeded."""
    cid = ops.dead("timeout")  # charged, then answered too late

    class ReplayedDuringLookup(ProviderClient):
        def find_charge(self, idempotency_key: str) -> Any:
            with transaction() as conn:  # an operator's replay, meanwhile
                conn.execute(text("UPDATE charges SET status = 'pending', retry_base = attempts"))
            return super().find_charge(idempotency_key)

    with ReplayedDuringLookup(ops.settings) as provider:
        report = reconcile(DeadFilter(), actor="erin", provider=provider)
    assert report.succeeded == [cid]
    assert charge(cid).status == "succeeded"
    [settled] = [r for r in audit_rows() if r["action"] == "settle"]
    assert settled["actor"] == "payq" and settled["params"]["from"] == "pending"


def test_purge_hides_but_keeps_and_needs_yes(ops: Ops) -> None:
    cid = ops.dead("invalid_request")
    refused = ops.cli("dlq", "purge", str(cid))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert purge(DeadFilter(ids=[cid]), actor="dave") == [cid]
    assert dead_charges(DeadFilter()) == []
    kept = dead_charges(DeadFilter(include_purged=True))
    assert [d.charge.purged_by for d in kept] == ["dave"] and charge(cid).status == "dead"
    assert [r["action"] for r in audit_rows()] == ["purge"]


def test_export_csv_and_jsonl(ops: Ops) -> None:
    cid = ops.dead("auth", 4200, "gbp")
    rows = list(csv.DictReader(io.StringIO(ops.cli("dlq", "export", "--format", "csv").stdout)))
    assert [(r["id"], r["amount"], r["currency"]) for r in rows] == [(str(cid), "4200", "gbp")]
    lines = ops.cli("dlq", "export", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(line)["last_error_class"] for line in lines] == ["authentication_failed"]
    assert "source" not in json.loads(lines[0])  # the payment token stays inside


def test_reconcile_settles_unknown_outcomes_without_charging(ops: Ops) -> None:
    charged = ops.dead("timeout")  # the provider charged, then answered too late
    lost = ops.dead("reset")  # the connection dropped before the provider charged
    lease_passes(lost)  # a lookup proves it was not charged once its request cannot arrive
    known = ops.dead("invalid_request")
    charges_before = ops.sim.stats()["charges"]
    assert "would look up 2 dead charges" in ops.cli("reconcile", "--dry-run").stdout
    report = reconcile(DeadFilter(), actor="erin", provider=ops.provider)
    assert report.pending == {}
    assert report.succeeded == [charged] and report.not_charged == [lost]
    assert ops.sim.stats()["charges"] == charges_before  # looked up, never charged
    assert charge(charged).status == "succeeded" and charge(charged).provider_charge_id
    assert charge(lost).status == "dead" and "not charged at the provider" in (
        charge(lost).dead_reason or ""
    )
    assert charge(lost).dead_outcome == "verified_not_charged"
    assert charge(known).reconciled_at is None
    assert {d.charge.id: d.outcome_unknown for d in dead_charges(DeadFilter())} == {
        lost: False,
        known: False,
    }
    actions = {(r["actor"], r["action"]): r for r in audit_rows()}
    assert actions[("payq", "settle")]["charge_ids"] == [charged]  # the answer's change
    assert actions[("erin", "reconcile")]["params"] == {"succeeded": 1, "failed": 0,
                                                        "not_charged": 1}  # fmt: skip
    again = reconcile(DeadFilter(), actor="erin", provider=ops.provider)
    assert again.settled == []


def test_broker_dead_letters_list_requeue_drop(ops: Ops) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    xq, xq_msgs = f"{NAMESPACE}:charges.XQ", f"{NAMESPACE}:charges.XQ.msgs"
    good = {
        "queue_name": "charges",
        "actor_name": "process_charge",
        "args": ["x"],
        "kwargs": {},
        "options": {"redis_message_id": "m1"},
        "message_id": "m1",
        "message_timestamp": 0,
    }
    client.zadd(xq, {"m1": 1_000, "m2": 2_000})
    client.hset(xq_msgs, mapping={"m1": json.dumps(good), "m2": b"\x00garbage"})
    letters = broker_dlq.list_dead_letters()
    assert [(d.redis_id, d.decodable) for d in letters] == [("m1", True), ("m2", False)]
    out = ops.cli("dlq", "broker", "requeue", "--all")
    assert "requeued 1" in out.stdout and "left m2: undecodable" in out.stdout
    assert client.lrange(f"{NAMESPACE}:charges", 0, -1) == [b"m1"]
    assert ops.cli("dlq", "broker", "drop", "m2").returncode == 2  # needs --yes
    assert "dropped 1" in ops.cli("dlq", "broker", "drop", "m2", "--yes").stdout
    assert client.zcard(xq) == 0
    client.close()


def test_the_small_stumbles_of_the_cli_are_gone(ops: Ops) -> None:
    dead = ops.dead("invalid_request")
    alive = enqueue_charge(1999, "usd", "tok_visa", unique_key("alive")).id
    # A replay of a charge that is not dead says what it is.
    out = ops.cli("dlq", "replay", str(alive), str(dead), "--dry-run")
    assert f"skipped {alive}: not dead: it is pending" in out.stdout
    # Purged charges are marked when listed, and left out of the total.
    purge(DeadFilter(ids=[dead]), actor="dave")
    listed = ops.cli("dlq", "list", "--include-purged").stdout
    assert "(purged)" in listed
    assert "0 dead charges in the view: nothing; 1 purged charge listed, not counted" in listed
    # Dry runs list ids; plurals are right.
    assert str(dead) in ops.cli("dlq", "purge", "--include-purged", "--all", "--dry-run").stdout
    # reconcile without the provider's key names the setting.
    no_key = ops.cli("reconcile", PAYMENT_PROVIDER_API_KEY="")
    assert no_key.returncode == 2 and "PAYMENT_PROVIDER_API_KEY: is not set" in no_key.stderr


def test_help_reads_plainly_and_explains_json_and_dry_run(ops: Ops) -> None:
    top = ops.cli("--help").stdout
    assert "``" not in top and "Exit codes" in top
    replay_help = ops.cli("dlq", "replay", "--help").stdout
    assert "print JSON instead of a table" in replay_help
    assert "change nothing" in replay_help
