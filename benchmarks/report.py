"""The results: what was measured, the machine it ran on, and the tables (Markdown).

The same text is printed and written to ``benchmarks/results.md``. Every figure is
min / median / max over the runs; ratios and efficiencies use the medians.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import Plan, Window

__all__ = [
    "Point",
    "Results",
    "Send",
    "SendOne",
    "describe",
    "describe_latencies",
    "render",
]

#: The reading of the figures, written by hand; appended to every report.
FINDINGS = Path(__file__).with_name("findings.md")

SendOne = Callable[[str], None]
Send = Callable[[str, int], int]

PAYQ, DRAMATIQ, CELERY = "payq", "plain Dramatiq", "plain Celery"
SIM_BUSY = 0.85  # of one core: above this the simulator may be what limits a run
OTHERS_BUSY = 0.25  # cores used by other work during a window: worth a caution

HOW = """\
How these figures were obtained: `make bench` (`python -m benchmarks.run`) starts a
private Redis, uses a `payq_bench` database on the configured PostgreSQL (or a
throwaway one), and one provider simulator (`payq provider-sim`, no faults, a fixed
latency). For each throughput run it queues a backlog with the workers stopped,
starts the workers (`payq worker`; `dramatiq benchmarks.plain_dramatiq`; one `celery
-A benchmarks.plain_celery worker --pool threads` per process), waits until every
worker process is up, warms up, and measures one window: charges/s are provider calls
counted by the simulator; worker CPU is user + system time of every process of the
worker group (psutil), divided by the charges of the window. Redis CPU comes from
`INFO cpu`, PostgreSQL CPU from the backends serving payq's workers. Runs of the three
systems alternate, so that other work on the machine does not land on one system
only. payq runs with `PAYMENT_MAX_CONCURRENCY` far above processes x threads (the fleet
limit never refuses), both pools sized to the threads, `LOG_LEVEL=WARNING`, metrics
off, no relay. Enqueue rates are one producer thread in the benchmark's process, no
workers running. Light-load latency is from just before the send call to the request's
arrival at the simulator, charges sent at a steady 10/s to an otherwise idle group.
Idle Redis calls are counted with MONITOR, keeping only the worker group's own
connections (a Lua script counts as one call). Where payq's worker time goes:
`python -m benchmarks.profile` (py-spy on each worker process during a 20 ms run; not
part of `make bench`). Benchmarks are not tests: nothing fails on a figure, and on a
shared 2-core machine figures move by 10-20 % between runs."""


@dataclass(frozen=True)
class Point:
    latency_ms: float
    processes: int
    threads: int

    @property
    def bound(self) -> float:
        """Charges/s if every thread did nothing but wait for the provider."""
        return self.processes * self.threads * 1000 / self.latency_ms

    def title(self) -> str:
        return (
            f"{self.latency_ms:g} ms provider latency, {self.processes} processes x "
            f"{self.threads} threads (bound {self.bound:,.0f} charges/s)"
        )


@dataclass
class Results:
    plan: Plan
    enqueue: dict[str, list[float]] = field(default_factory=dict)
    throughput: dict[Point, dict[str, list[Window]]] = field(default_factory=dict)
    light: dict[str, list[list[float]]] = field(default_factory=dict)
    idle: dict[str, tuple[float, Counter[str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    elapsed_s: float = 0.0


# --- figures ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    low, mid, high = min(finite), statistics.median(finite), max(finite)
    return f"{low:{fmt}} / {mid:{fmt}} / {high:{fmt}}"


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


def describe(window: Window) -> str:
    dry = "" if window.backlog_left else ", queue ran dry"
    delayed = f", {window.delayed_left} delayed messages" if window.delayed_left else ""
    return (
        f"{window.rate:,.0f} charges/s, worker CPU "
        f"{window.per_charge_ms(window.worker_cpu_s):.2f} ms/charge, simulator "
        f"{window.sim_cpu_s / window.seconds:.0%} of a core{dry}{delayed}"
    )


def describe_latencies(runs: list[list[float]]) -> str:
    pooled = [v for run in runs for v in run]
    return (
        f"p50 {percentile(pooled, 0.5):.0f} ms, p99 {percentile(pooled, 0.99):.0f} ms "
        f"({len(pooled)} charges)"
    )


# --- tables -----------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _throughput(point: Point, by_system: dict[str, list[Window]]) -> list[str]:
    payq = by_system.get(PAYQ, [])
    payq_rate = _median([w.rate for w in payq])
    payq_cpu = _median([w.per_charge_ms(w.worker_cpu_s) for w in payq])
    rows = []
    for name, windows in by_system.items():
        rate = _median([w.rate for w in windows])
        cpu = [w.per_charge_ms(w.worker_cpu_s) for w in windows]
        dry = sum(1 for w in windows if not w.backlog_left)
        rows.append(
            [
                name + (f" (queue ran dry in {dry} run(s))" if dry else ""),
                _spread([w.rate for w in windows]),
                f"{rate / point.bound:.2f}",
                _spread(cpu, ".2f"),
                _ratio(payq_rate, rate),
                _ratio(payq_cpu, _median(cpu)),
                _services_cpu(windows),
                f"{_median([w.sim_cpu_s / w.seconds for w in windows]):.0%}",
                _machine(windows),
            ]
        )
    header = [
        "system",
        "charges/s",
        "efficiency",
        "worker CPU ms/charge",
        "payq ÷ this, charges/s",
        "payq ÷ this, CPU/charge",
        "Redis + PostgreSQL CPU ms/charge",
        "simulator CPU (of a core)",
        "machine busy, cores (other work)",
    ]
    return [f"### {point.title()}", "", *_table(header, rows), ""]


def _services_cpu(windows: Sequence[Window]) -> str:
    redis_ms = _median([w.per_charge_ms(w.redis_cpu_s) for w in windows])
    db_ms = _median([w.per_charge_ms(w.db_cpu_s) for w in windows])
    return f"{redis_ms:.2f}" + ("" if math.isnan(db_ms) else f" + {db_ms:.2f}")


def _others_s(window: Window) -> float:
    """Busy CPU of the window that none of the run's processes used: other work."""
    ours = window.worker_cpu_s + window.sim_cpu_s + window.redis_cpu_s + (window.db_cpu_s or 0)
    return max(0.0, window.machine_cpu_s - ours)


def _machine(windows: Sequence[Window]) -> str:
    busy = _median([w.machine_cpu_s / w.seconds for w in windows])
    others = _median([_others_s(w) / w.seconds for w in windows])
    return f"{busy:.2f} ({others:.2f})"


def _scaling(results: Results) -> list[str]:
    rows = []
    for point in sorted(results.throughput, key=lambda p: p.processes):
        if point.latency_ms != 20.0 or point.threads != 8 or PAYQ not in results.throughput[point]:
            continue
        windows = results.throughput[point][PAYQ]
        rate = _median([w.rate for w in windows])
        rows.append(
            [
                f"{point.processes} x {point.threads}",
                f"{point.bound:,.0f}",
                _spread([w.rate for w in windows]),
                f"{rate / point.bound:.2f}",
                _spread([w.per_charge_ms(w.worker_cpu_s) for w in windows], ".2f"),
                _services_cpu(windows),
                _machine(windows),
            ]
        )
    header = [
        "processes x threads",
        "bound",
        "charges/s",
        "efficiency",
        "worker CPU ms/charge",
        "Redis + PostgreSQL CPU ms/charge",
        "machine busy, cores (other work)",
    ]
    return ["## payq by worker processes (20 ms latency)", "", *_table(header, rows), ""]


def _enqueue(results: Results) -> list[str]:
    send = next((v for k, v in results.enqueue.items() if "Dramatiq" in k), [])
    rows = [
        [name, _spread(rates), _ratio(_median(rates), _median(send))]
        for name, rates in results.enqueue.items()
    ]
    header = ["producer call", "charges/s", "÷ plain Dramatiq send"]
    return ["## Enqueue rates (one producer thread, no workers)", "", *_table(header, rows), ""]


def _light(results: Results) -> list[str]:
    rows = []
    for name, runs in results.light.items():
        pooled = [v for run in runs for v in run]
        rows.append(
            [
                name,
                _spread([percentile(run, 0.5) for run in runs]),
                _spread([percentile(run, 0.99) for run in runs]),
                f"{percentile(pooled, 0.5):.0f} / {percentile(pooled, 0.99):.0f}",
                f"{max(pooled, default=math.nan):.0f}",
                str(len(pooled)),
            ]
        )
    header = ["system", "p50 ms", "p99 ms", "all runs p50 / p99 ms", "max ms", "charges"]
    rate = results.plan.light_rate_per_s
    title = f"## Enqueue-to-provider-call latency at {rate:g} charges/s (2 x 8, 20 ms)"
    return [title, "", *_table(header, rows), ""]


def _idle(results: Results) -> list[str]:
    seconds = results.plan.idle_s
    rows = [
        [
            name,
            f"{rate:.1f}",
            ", ".join(f"{cmd} {n / seconds:.1f}" for cmd, n in commands.most_common(8)) or "-",
        ]
        for name, (rate, commands) in results.idle.items()
    ]
    header = ["system", "Redis calls/s", "by command (calls/s)"]
    title = f"## One idle worker process (1 x 8, empty queue), {seconds:g} s of MONITOR"
    return [title, "", *_table(header, rows), ""]


def _targets(results: Results) -> list[str]:
    lines = ["## Targets (medians)", ""]

    def mark(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")

    def rate(point: Point, name: str) -> float:
        return _median([w.rate for w in results.throughput.get(point, {}).get(name, [])])

    def cpu(point: Point, name: str) -> float:
        windows = results.throughput.get(point, {}).get(name, [])
        return _median([w.per_charge_ms(w.worker_cpu_s) for w in windows])

    fast, slow = Point(20.0, 2, 8), Point(200.0, 2, 32)
    p, d, c = rate(fast, PAYQ), rate(fast, DRAMATIQ), rate(fast, CELERY)
    mark(
        p >= 0.8 * d and p > c,
        f"20 ms: payq ≥ 0.8 x plain Dramatiq and above plain Celery: payq {p:,.0f}/s = "
        f"{_ratio(p, d)} x Dramatiq ({d:,.0f}/s), {_ratio(p, c)} x Celery ({c:,.0f}/s)",
    )
    eff = rate(slow, PAYQ) / slow.bound
    mark(eff >= 0.95, f"200 ms, 64 calls at once: payq ≥ 0.95 of the bound: {eff:.2f}")
    for point in (fast, slow):
        pc, dc = cpu(point, PAYQ), cpu(point, DRAMATIQ)
        mark(
            pc <= 2 * dc,
            f"{point.latency_ms:g} ms: worker CPU per charge ≤ 2 x plain Dramatiq's: "
            f"{pc:.2f} ms vs {dc:.2f} ms ({_ratio(pc, dc)} x)",
        )
    rates = {k: _median(v) for k, v in results.enqueue.items()}
    single = next((v for k, v in rates.items() if "one at a time (durable)" in k), math.nan)
    batch = next((v for k, v in rates.items() if "batches" in k), math.nan)
    send = next((v for k, v in rates.items() if "Dramatiq" in k), math.nan)
    mark(single >= 1000, f"durable single enqueue ≥ 1,000 charges/s: {single:,.0f}")
    mark(batch >= send, f"batch enqueue ≥ plain Dramatiq send: {batch:,.0f} vs {send:,.0f}")
    pooled = [v for run in results.light.get(PAYQ, []) for v in run]
    p50, p99 = percentile(pooled, 0.5), percentile(pooled, 0.99)
    mark(p50 <= 50 and p99 <= 200, f"light load p50 ≤ 50 ms, p99 ≤ 200 ms: {p50:.0f} / {p99:.0f}")
    idle = results.idle.get(PAYQ, (math.nan, Counter()))[0]
    mark(idle <= 20, f"idle worker process ≤ ~20 Redis calls/s: {idle:.1f}")
    return [*lines, ""]


def _cautions(results: Results) -> list[str]:
    lines = []
    for point, by_system in results.throughput.items():
        for name, windows in by_system.items():
            others = max(_others_s(w) / w.seconds for w in windows)
            if others >= OTHERS_BUSY:
                lines.append(
                    f"- {point.latency_ms:g} ms, {point.processes} x {point.threads}, {name}: "
                    f"other work on the machine used up to {others:.2f} cores during a window"
                )
            busy = max(w.sim_cpu_s / w.seconds for w in windows)
            if busy >= SIM_BUSY:
                lines.append(
                    f"- {point.latency_ms:g} ms, {point.processes} x {point.threads}, {name}: the "
                    f"simulator used {busy:.0%} of a core; it may have limited the run"
                )
            dry = sum(1 for w in windows if not w.backlog_left)
            if dry:
                lines.append(
                    f"- {point.latency_ms:g} ms, {point.processes} x {point.threads}, {name}: the "
                    f"queue ran dry in {dry} run(s); those figures are lower bounds"
                )
            delayed = max(w.delayed_left for w in windows)
            if delayed:
                lines.append(
                    f"- {point.latency_ms:g} ms, {point.processes} x {point.threads}, {name}: up "
                    f"to {delayed} messages were in the delay queue at a window's end (deferred)"
                )
    return ["## Cautions", "", *lines, ""] if lines else []


def render(results: Results) -> str:
    plan = results.plan
    m = results.machine
    head = [
        "# payq benchmarks",
        "",
        HOW,
        "",
        f"- date: {m.get('date', '?')}",
        f"- machine: {m.get('machine', '?')}; {m.get('load', '')}",
        f"- software: {m.get('python', '?')}",
        f"- services: {m.get('services', '?')}",
        *(f"- {note}" for note in results.notes),
        f"- command: `{results.command}` (what `make bench` runs), "
        f"{results.elapsed_s / 60:.1f} minutes",
        f"- each figure: min / median / max over {plan.runs} run(s); windows of "
        f"{plan.window_s:g} s after {plan.warmup_s:g} s of warm-up; enqueue runs of "
        f"{plan.enqueue_s:g} s; light load {plan.runs} x {plan.light_window_s:g} s",
        "",
        "## Throughput side by side",
        "",
        "Efficiency: median charges/s ÷ bound (processes x threads ÷ provider latency). "
        "Machine busy: all cores' busy time over the window, in cores; in brackets the part "
        "no process of the run used (other work on the machine).",
        "",
    ]
    body: list[str] = []
    for point, by_system in results.throughput.items():
        if len(by_system) > 1:
            body += _throughput(point, by_system)
    body += _scaling(results) + _enqueue(results) + _light(results) + _idle(results)
    body += _targets(results) + _cautions(results)
    body += ["", FINDINGS.read_text().rstrip()] if FINDINGS.exists() else []
    return "\n".join(head + body).rstrip() + "\n"
