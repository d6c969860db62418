"""Incident drills: each one against a real worker group, the relay and the simulator.

The suite's environment (its own database and Redis namespace) is what the drills
run against; the overrides below only make them quick.
"""

from __future__ import annotations

import argparse
import re

import pytest

from payq.ops.drills import DrillRefused, DrillResult, add_simulate_command, run_drill
from producers import enqueue_charge

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

QUICK = {
    "PAYMENT_TIMEOUT_MS": "1500",
    "RETRY_BACKOFF_MIN_S": "0.2",
    "RETRY_BACKOFF_MAX_S": "1",
    "DB_TIMEOUT_MS": "1000",
}


def drill(name: str, charges: int) -> DrillResult:
    printed: list[str] = []
    result = run_drill(name, charges=charges, out=printed.append, env=QUICK)
    print("\n".join(printed))  # shown by pytest when the test fails
    assert printed == result.lines
    assert result.ok, result.problems
    assert result.problems == []
    steps = [line for line in result.lines if re.match(r"\d+\. ", line)]
    assert [line.split(".")[0] for line in steps] == [str(i) for i in range(1, len(steps) + 1)]
    assert result.lines[-1] == (
        f"nothing lost: {charges}/{charges} charges final, {charges} charged once at the "
        "provider, 0 duplicate charges"
    )
    f = result.figures
    assert f["final"] == f["succeeded"] == f["provider_charges"] == f["matched"] == charges
    assert f["duplicate_charges"] == 0
    return result


def test_payment_timeout_drill_cuts_at_the_deadline_and_retries_with_the_same_key() -> None:
    result = drill("payment_timeout", 6)
    f = result.figures
    # Every charge's first call was held by the provider and cut at the 1500 ms deadline.
    assert f["held"] == 6 and f["timed_out_charges"] == 6 and int(f["timeouts"]) >= 6
    assert 1500 <= int(f["cut_ms_min"]) <= int(f["cut_ms_max"]) < 2500
    assert f["provider_delay_s"] == 8.0
    # Retried with the same key; the provider replayed the charge instead of charging again.
    assert f["keys_retried"] == f["keys_replayed"] == 6 and int(f["replays"]) >= 6
    assert float(f["retry_gap_s_min"]) >= 0.15
    story = "\n".join(result.lines)
    assert "error_class=timeout at PAYMENT_TIMEOUT_MS=1500" in story
    assert "Idempotent-Replayed: true" in story


def test_connection_error_drill_retries_after_backoff_and_charges_once() -> None:
    result = drill("connection_error", 6)
    f = result.figures
    assert f["charges_hit"] == 6 and int(f["connection_errors"]) >= 6
    # What the client saw as connection errors is what the provider left unanswered.
    assert f["no_answer"] == f["connection_errors"]
    assert float(f["retry_gap_s_min"]) >= 0.15  # after a backoff, not at once
    assert f["charged_afresh"] == 6
    assert "ended connection_error" in "\n".join(result.lines)


def test_database_pool_exhaustion_drill_shows_the_error_and_the_bound() -> None:
    result = drill("database_pool_exhaustion", 10)
    f = result.figures
    # (a) the incident's error, with its wait of DB_TIMEOUT_MS.
    assert "QueuePool limit of size 2 overflow 0 reached, connection timed out" in str(
        f["small_pool_error"]
    )
    assert 950 <= float(f["small_pool_wait_ms"]) < 2000
    # (b) threads == pool, connections never above it, not held through provider calls.
    pool = int(f["pool"])
    assert f["threads"] == pool == f["connection_bound"] == 5  # min(DB 10, HTTP 5)
    assert 1 <= int(f["max_worker_connections"]) <= pool
    assert int(f["max_calls_in_flight"]) >= 2 and int(f["call_samples"]) >= 5
    # Sampled, so an instant where every thread records at once can show all connections
    # busy; what must hold is that busy connections rarely keep pace with calls in flight.
    assert int(f["held_samples"]) * 4 <= int(f["overlap_samples"])
    assert f["worker_pool_timeouts"] == 0
    # The refusal: one line, exit 2.
    assert f["refusal_exit"] == 2
    assert str(f["refusal"]).startswith(f"payq: {pool + 1} worker threads per process exceed ")
    assert f"is refused at start (exit 2): payq: {pool + 1} worker threads" in "\n".join(
        result.lines
    )


def test_a_drill_refuses_a_database_with_unfinished_charges_of_others() -> None:
    enqueue_charge(1999, "usd", "tok_visa", "not-a-drill-1")
    printed: list[str] = []
    with pytest.raises(
        DrillRefused, match=r"^1 unfinished charge is in this database and not a drill"
    ):
        run_drill("payment_timeout", charges=1, out=printed.append, env=QUICK)
    assert printed == []


def test_run_drill_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown drill"):
        run_drill("disk_full")
    with pytest.raises(ValueError, match="at least 1"):
        run_drill("payment_timeout", charges=0)
    with pytest.raises(ValueError, match="may not change DATABASE_URL"):
        run_drill("payment_timeout", env={"DATABASE_URL": "postgresql://elsewhere/x"})


def test_simulate_command_parses() -> None:
    parser = argparse.ArgumentParser(prog="payq")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_command(sub)
    args = parser.parse_args(["simulate", "payment_timeout", "--charges", "5"])
    assert (args.command, args.drill, args.charges) == ("simulate", "payment_timeout", 5)
    assert callable(args.func)
    assert parser.parse_args(["simulate", "connection_error"]).charges == 20
    for bad in (["simulate", "disk_full"], ["simulate", "payment_timeout", "--charges", "0"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2


def test_a_drill_refuses_while_workers_it_does_not_own_consume_its_queues() -> None:
    """Reproduced: a drill beside live workers charged 19 of its 20 test charges through
    the live fleet's provider."""
    from tests.helpers import wait_until
    from tests.processes import PayqProcess

    with PayqProcess("worker", "--processes", "1", "--threads", "1") as live:
        wait_until(lambda: "ready for action" in live.output(), 30, "the live worker to start")
        with pytest.raises(DrillRefused, match=r"^1 worker process is consuming"):
            run_drill("payment_timeout", charges=1, out=lambda line: None, env=QUICK)
