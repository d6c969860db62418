"""The chaos run's checks and its one line of figures."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from payq.ops.chaos.plan import ChaosPlan

__all__ = [
    "BREAKER_MAX_FRACTION",
    "ChaosResult",
    "Figure",
    "checks",
    "figure_line",
    "largest",
    "median",
]

Figure = int | float | str

#: Calls during the outage, as a share of what they would have been, that still pass.
BREAKER_MAX_FRACTION = 0.25


@dataclass(frozen=True)
class ChaosResult:
    """What a run measured: ``figures`` by name, the printed ``line``, the ``failed`` checks
    (empty when ok), and where the logs were kept when a check failed."""

    figures: dict[str, Figure]
    failed: list[str]
    line: str
    logs: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def checks(f: Mapping[str, Figure], plan: ChaosPlan, producer_exit: int) -> list[str]:
    """Each failed check, named, with its figures; empty when all passed.

    Besides payq's promises, it checks that the damage was really done: a check that
    had nothing to measure (no 429, no kill) does not pass.
    """
    expected = int(f["outage_expected_calls"])
    results = [
        (producer_exit == 0, f"producer: exited {producer_exit}, not every charge enqueued"),
        (f["final"] == plan.charges, f"every_charge_final: {f['final']}/{plan.charges}"),
        (f["duplicate_charges"] == 0, f"duplicate_charges: {f['duplicate_charges']}"),
        (
            f["cross_group_charges"] == 0,
            f"cross_group_charges: {f['cross_group_charges']} charged by both providers",
        ),
        (int(f["moved"]) > 0, "moved: no charge went from provider a to b: failover untested"),
        (f["phantom"] == 0, f"phantom: {f['phantom']} charged at the provider, not succeeded"),
        (f["ledger_mismatch"] == 0, f"ledger_mismatch: {f['ledger_mismatch']}"),
        (f["unknown_dead"] == 0, f"unknown_dead: {f['unknown_dead']} after the sweep"),
        (f["unrecorded_calls"] == 0, f"unrecorded_calls: {f['unrecorded_calls']}"),
        (f["stalls"] == plan.stalls, f"stalls: {f['stalls']} of {plan.stalls} applied"),
        (
            0 <= int(f["max_in_flight"]) <= plan.max_concurrency,
            f"max_in_flight: {f['max_in_flight']} > PAYMENT_MAX_CONCURRENCY "
            f"{plan.max_concurrency}; open at the peak: {f.get('in_flight_peak', '?')}",
        ),
        (
            int(f["max_app_connections"]) <= int(f["app_connection_bound"]),
            f"app_connections: {f['max_app_connections']} > {f['app_connection_bound']}",
        ),
        (int(f["connection_samples"]) > 0, "app_connections: pg_stat_activity never sampled"),
        (
            f["retry_after_violations"] == 0,
            f"retry_after: {f['retry_after_violations']} requests came before Retry-After",
        ),
        (int(f["rate_limited"]) > 0, "retry_after: no 429 was answered, nothing was checked"),
        (expected > 0, "breaker: no calls before the outage to compare with"),
        (
            int(f["outage_calls"]) < BREAKER_MAX_FRACTION * expected,
            f"breaker: {f['outage_calls']} calls during the outage, not under "
            f"{BREAKER_MAX_FRACTION:.0%} of the {expected} expected",
        ),
        (int(f["kills"]) >= 1, "kills: no worker process was killed"),
        (
            int(f["group_restarts"]) >= int(f["kills"]),
            f"kills: {f['kills']} kills but {f['group_restarts']} group restarts",
        ),
        (
            f["redis_restarts"] == 1 and f["pg_restarts"] == 1,
            f"restarts: Redis {f['redis_restarts']}, PostgreSQL {f['pg_restarts']}, not 1 each",
        ),
    ]
    return [problem for passed, problem in results if not passed]


def figure_line(f: Mapping[str, Figure]) -> str:
    """``chaos: charges=... elapsed_s=...``: every figure that a check or a reader needs."""
    expected = int(f["outage_expected_calls"])
    share = f"{int(f['outage_calls']) / expected:.1%}" if expected else "n/a"
    return (
        f"chaos: charges={f['charges']} final={f['final']} succeeded={f['succeeded']} "
        f"failed={f['failed']} dead={f['dead']} duplicate_charges={f['duplicate_charges']} "
        f"cross_group_charges={f['cross_group_charges']} moved={f['moved']} "
        f"phantom={f['phantom']} unknown_dead={f['unknown_dead']} "
        f"unrecorded_calls={f['unrecorded_calls']} ledger_mismatch={f['ledger_mismatch']} "
        f"max_in_flight={f['max_in_flight']}/{f['max_concurrency']} "
        f"max_app_connections={f['max_app_connections']}/{f['app_connection_bound']} "
        f"connection_samples={f['connection_samples']} kills={f['kills']} "
        f"group_restarts={f['group_restarts']} stalls={f['stalls']} "
        f"redis_restarts={f['redis_restarts']} "
        f"pg_restarts={f['pg_restarts']} rate_limited={f['rate_limited']} "
        f"retry_after_violations={f['retry_after_violations']} "
        f"(min slack {f['retry_after_min_slack_ms']} ms) "
        f"relay_republished lost={f['relay_republished_lost']} "
        f"leases={f['relay_republished_leases']} "
        f"outage_calls={f['outage_calls']}/expected_{expected} ({share}) "
        f"killed_in_flight={f['killed_in_flight']} "
        f"group_back_s median={f['group_back_s_median']} max={f['group_back_s_max']} "
        f"takeover_s median={f['takeover_s_median']} max={f['takeover_s_max']} "
        f"recovery_s median={f['recovery_s_median']} max={f['recovery_s_max']} "
        f"elapsed_s={f['elapsed_s']}"
    )


def median(values: list[float]) -> float | str:
    """Rounded to 0.1, or ``n/a`` for none."""
    return round(statistics.median(values), 1) if values else "n/a"


def largest(values: list[float]) -> float | str:
    """Rounded to 0.1, or ``n/a`` for none."""
    return round(max(values), 1) if values else "n/a"
