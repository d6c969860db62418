"""The chaos suite, small: every fault of ``make chaos`` in under two minutes.

It runs on throwaway Redis and PostgreSQL servers of its own (not the suite's), with
real worker processes; the full size is ``make chaos``.
"""

from __future__ import annotations

import time

import pytest

from payq.ops.chaos import ChaosPlan, run_chaos

pytestmark = pytest.mark.e2e

# The requirement's 15 s outage (a breaker's reaction time is the same in a small run),
# a fifth of the charges, SIGKILLs more often, three stalls past the lease.
SMALL = ChaosPlan(charges=600, enqueue_s=45, outage_s=15, kill_every_s=3, deadline_s=95)


def test_small_chaos_run_passes_every_check_and_really_did_the_damage() -> None:
    printed: list[str] = []
    started = time.monotonic()
    result = run_chaos(SMALL, out=printed.append)
    took_s = time.monotonic() - started
    print("\n".join(printed))  # shown by pytest when the test fails
    assert result.ok, result.failed
    assert result.logs is None  # removed when every check passed

    # One line of figures, printed as returned, and a closing verdict.
    assert [line for line in printed if line.startswith("chaos: ")] == [result.line]
    assert printed[-1] == "chaos ok: every check passed"

    f = result.figures
    assert f["final"] == f["charges"] == 600
    assert int(f["succeeded"]) + int(f["failed"]) + int(f["dead"]) == 600
    assert f["duplicate_charges"] == 0
    # payq's books agree with the provider's, after stalls past the lease.
    assert (f["phantom"], f["unknown_dead"], f["unrecorded_calls"], f["ledger_mismatch"]) == (
        0,
        0,
        0,
        0,
    )
    assert f["stalls"] == SMALL.stalls > 0
    assert 0 < int(f["max_in_flight"]) <= SMALL.max_concurrency < SMALL.fleet_threads
    # The damage happened: kills with restarts, both servers restarted, 429s, an outage.
    assert int(f["kills"]) >= 2 and int(f["group_restarts"]) >= int(f["kills"])
    assert f["redis_restarts"] == 1 and f["pg_restarts"] == 1
    assert int(f["rate_limited"]) > 0 and f["retry_after_violations"] == 0
    assert 0 < int(f["outage_calls"]) < int(f["outage_expected_calls"])
    assert int(f["relay_republished_lost"]) > 0  # Redis came back empty
    if int(f["killed_in_flight"]):  # a charge in flight in a killed process finished later
        assert isinstance(f["takeover_s_max"], float) and isinstance(f["recovery_s_max"], float)
    # pg_stat_activity was read about every 100 ms, and saw the app's connections.
    assert int(f["connection_samples"]) >= 5 * float(f["elapsed_s"])
    assert 0 < int(f["max_app_connections"]) <= int(f["app_connection_bound"])
    # Its length is bounded by the plan's deadline, not asserted: speed is for benchmarks.
    print(f"small chaos run: {took_s:.0f} s")
