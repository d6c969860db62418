"""End to end: two worker "hosts" against one Redis and one PostgreSQL.

Each host is a `payq worker` group in a process group of its own, with its own threads
and pool sizes, as two machines of a fleet would be; they share the fleet's settings
(`PAYMENT_MAX_CONCURRENCY`, the breaker's thresholds) and nothing else but Redis, the
database and the provider. The fleet limit and the circuit breaker live in Redis, so
they hold across hosts: together the hosts have 10 threads, each host alone could run 4
calls at once, yet the provider never sees more than 4, and the hosts are refused slots;
and once one host's failures open the breaker, neither host calls the provider until it
half-opens. (Which host is refused depends on which one holds the slots: a busy process
keeps its slots for its next calls, so host A, whose threads equal the limit, may be
the one that never is.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import redis

from payq.figures import worker_reports
from payq.gate import BreakerState, FleetBreaker, FleetLimit, ProviderGate
from payq.settings import load_settings
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, REDIS_URL
from tests.e2e.test_workers import all_final, enqueue
from tests.helpers import Sim, statuses, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

MAX_CONCURRENCY = 4
BREAKER_OPEN_S = 3

# The fleet's settings: the same on every host.
FLEET = {
    "PAYMENT_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "BREAKER_MIN_CALLS": "6",
    "BREAKER_WINDOW_S": "2",
    "BREAKER_OPEN_S": str(BREAKER_OPEN_S),
    "RETRY_MAX_ATTEMPTS": "10",  # the outage's failed attempts must not make charges dead
    "HEALTH_CHECK_INTERVAL_S": "3600",  # no provider lookups from the health checks
}
# Each host's own: 4 + 6 = 10 threads against a fleet limit of 4.
HOSTS = {
    "A": (
        ("worker", "--processes", "1", "--threads", "4"),
        {"DATABASE_POOL_MAX_CONNECTIONS": "4", "PAYMENT_POOL_MAX_CONNECTIONS": "4"},
    ),
    "B": (
        ("worker", "--processes", "1"),
        {
            "WORKER_THREADS": "6",
            "DATABASE_POOL_MAX_CONNECTIONS": "8",
            "PAYMENT_POOL_MAX_CONNECTIONS": "6",
        },
    ),
}

SUCCEEDED = "charge succeeded"
BREAKER_DEFERRAL = "circuit breaker is open"
BREAKER_OPENED = "circuit breaker opened"


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=150)
        yield sim


@pytest.fixture
def gate() -> Iterator[tuple[FleetBreaker, FleetLimit]]:
    """The fleet's breaker and slots as the hosts see them, read from the test's side."""
    client = redis.Redis.from_url(REDIS_URL)
    settings = load_settings(
        breaker_window_s=int(FLEET["BREAKER_WINDOW_S"]), payment_max_concurrency=MAX_CONCURRENCY
    )
    reader = ProviderGate(client, settings)  # reads only: it holds no slot
    yield reader.breaker, reader.fleet
    client.close()


def reports_by_host(hosts: dict[str, PayqProcess]) -> dict[str, list[dict[str, object]]]:
    """Each host's worker reports in Redis (a report's group is its dramatiq master)."""
    groups = {host.proc.pid: name for name, host in hosts.items() if host.proc is not None}
    found: dict[str, list[dict[str, object]]] = {name: [] for name in hosts}
    for report in worker_reports():
        if report["group"] in groups:
            found[groups[report["group"]]].append(report)
    return found


def fleet_full(report: dict[str, object]) -> int:
    deferred = report.get("deferred")
    return int(deferred.get("fleet_full", 0)) if isinstance(deferred, dict) else 0


def test_two_hosts_share_the_fleet_limit_and_the_circuit_breaker(
    sim: Sim, gate: tuple[FleetBreaker, FleetLimit]
) -> None:
    breaker, fleet = gate
    started = time.monotonic()
    fleet_env = {**FLEET, "PAYMENT_PROVIDER_URL": sim.url}
    with ExitStack() as stack:
        hosts = {
            name: stack.enter_context(PayqProcess(*args, env={**fleet_env, **own}))
            for name, (args, own) in HOSTS.items()
        }
        # A fleet runs a relay too: it publishes again any charge whose message is lost.
        stack.enter_context(PayqProcess("relay", env=fleet_env))
        wait_until(lambda: all(reports_by_host(hosts).values()), 40, "both hosts' workers to start")

        # 1. The fleet limit holds across hosts.
        fleet_ids = enqueue(80, "fleet")
        wait_until(lambda: all_final(fleet_ids), 60, "the first 80 charges to end final")
        stats = sim.stats()
        assert statuses() == {"succeeded": 80}
        assert stats["charges"] == 80 and stats["duplicate_charges"] == 0
        assert stats["max_in_flight"] <= MAX_CONCURRENCY, (
            f"{stats['max_in_flight']} provider calls at once across the hosts, "
            f"PAYMENT_MAX_CONCURRENCY={MAX_CONCURRENCY}"
        )
        succeeded = {name: host.output().count(SUCCEEDED) for name, host in hosts.items()}
        assert sum(succeeded.values()) == 80 and all(succeeded.values()), succeeded
        # Slots were refused across the hosts (reports come every 5 s).
        refused = wait_until(
            lambda: sum(fleet_full(r) for rs in reports_by_host(hosts).values() for r in rs),
            15,
            "a host's report of a full fleet",
        )
        fleet_s = time.monotonic() - started
        calls_before_outage = stats["charge_requests"]

        # 2. One host's failures open the breaker; no host calls until it half-opens.
        marks = {name: len(host.output()) for name, host in hosts.items()}
        sim.faults(outage_s=60)
        outage_ids = enqueue(40, "outage")
        wait_until(lambda: breaker.snapshot().state is BreakerState.OPEN, 20, "the breaker to open")
        sim.faults(outage_s=0)  # the provider is back; the fleet learns it from its probes
        # Calls let through before it opened hold slots until they end; after that, a call
        # needs the breaker's admission and a slot in one Redis script: none may start.
        wait_until(lambda: fleet.in_use() == 0, 5, "calls admitted before the opening to end")
        frozen = sim.stats()["charge_requests"]
        snap = breaker.snapshot()
        assert snap.state is BreakerState.OPEN, "the breaker half-opened too soon to watch it"
        open_from = time.monotonic()

        offered: list[uuid.UUID] = []

        def watch_open_breaker() -> bool:
            calls = sim.stats()["charge_requests"]  # first the count, then the state
            if breaker.snapshot().state is not BreakerState.OPEN:
                return True
            assert calls == frozen, f"{calls - frozen} provider calls while the breaker was open"
            # Which host fetches a message is up to Redis: until each host has met the
            # open breaker, offer one more charge per look, for either to take.
            if not all(
                BREAKER_DEFERRAL in host.output()[marks[name] :] for name, host in hosts.items()
            ):
                offered.extend(enqueue(1, "while-open"))
            return False

        wait_until(watch_open_breaker, BREAKER_OPEN_S + 10, "the breaker to half-open")
        watched_s = time.monotonic() - open_from
        assert watched_s >= snap.open_for_ms / 1000 - 0.2

        outage_ids += offered
        wait_until(lambda: all_final(outage_ids), 40, "the outage's charges to end final")
        logs = {name: host.output()[marks[name] :] for name, host in hosts.items()}
        openers = [name for name, text in logs.items() if BREAKER_OPENED in text]
        assert len(openers) == 1 and breaker.snapshot().opened == 1, openers
        deferrals = {name: text.count(BREAKER_DEFERRAL) for name, text in logs.items()}
        assert all(deferrals.values()), f"every host defers while the breaker is open: {deferrals}"
        assert breaker.snapshot().state is BreakerState.CLOSED

    stats = sim.stats()
    total = len(fleet_ids) + len(outage_ids)
    assert statuses() == {"succeeded": total}
    assert stats["charges"] == total and stats["duplicate_charges"] == 0
    assert stats["max_in_flight"] <= MAX_CONCURRENCY
    print(
        f"two hosts: succeeded A={succeeded['A']} B={succeeded['B']} of 80 in {fleet_s:.1f} s, "
        f"max_in_flight {stats['max_in_flight']}/{MAX_CONCURRENCY}, hosts refused a full "
        f"fleet {refused} times; breaker opened by host {openers[0]}, open {watched_s:.1f} s "
        f"after {frozen - calls_before_outage} failed calls, no call while open, breaker "
        f"deferrals A={deferrals['A']} B={deferrals['B']} ({len(offered)} charges offered while "
        f"open); {time.monotonic() - started:.1f} s"
    )
