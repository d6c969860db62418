"""`payq status`, `payq health`, worker reports, alerts and metrics, against real services."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from devservices import free_port
from payq.gate import BreakerState, Pass, ProviderGate, Wait
from payq.health import Check, Level, check_breaker, check_provider, run_checks, worst
from payq.ops.status import snapshot
from payq.processing import process_charge
from payq.provider import ProviderClient
from payq.settings import load_settings
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, REDIS_URL, TEST_ENV
from tests.helpers import SUCCEEDED, TIMED_OUT, Sim, call, charge, passed, statuses, wait_until
from tests.ops.endpoints import TwoEndpoints, two_endpoints
from tests.processes import PayqProcess

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """A connection of the test's own, standing for another worker process of the fleet."""
    conn = redis.Redis.from_url(REDIS_URL)
    yield conn
    conn.close()


class Slots:
    """Fleet slots the test holds, as a busy worker process would."""

    def __init__(self, client: redis.Redis) -> None:
        self.gate = ProviderGate(client, load_settings())
        self.calls: list[Pass] = []

    def take(self, n: int) -> None:
        for _ in range(n):
            self.calls.append(passed(self.gate.enter()))

    def free(self, n: int) -> None:
        for _ in range(n):
            self.gate.leave(self.calls.pop(), None)
        self.gate.flush()  # the slots it kept for its next call go back too


@pytest.fixture
def held_slots(client: redis.Redis) -> Iterator[Slots]:
    slots = Slots(client)
    yield slots
    slots.free(len(slots.calls))  # nothing left for the renewer to put back
    slots.gate.stop_keeping()
    slots.gate.fleet.stop_renewing()


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses listening on ``port``, read from the kernel's socket table."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def enqueue(n: int) -> list[uuid.UUID]:
    tag = uuid.uuid4().hex[:6]
    rows = [
        {"amount": 100, "currency": "usd", "source": "tok_visa", "idempotency_key": f"s-{tag}-{i}"}
        for i in range(n)
    ]
    return [c.id for c in enqueue_charges(rows)]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payq_cli", *args],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_counts_queues_charges_and_provider_figures(sim: Sim) -> None:
    settings = load_settings(payment_provider_url=sim.url)
    ids = enqueue(5)
    sim.faults(script=["ok", "ok", "error", "decline"])
    with ProviderClient(settings) as provider:
        for cid in ids[:4]:
            process_charge(str(cid), settings=settings, provider=provider)
    snap = snapshot(settings)
    assert snap["charges"]["succeeded"] == 2 and snap["charges"]["retrying"] == 1
    assert snap["charges"]["failed"] == 1 and snap["charges"]["pending"] == 1
    assert snap["queues"]["ready"] == 5  # nothing consumed the messages: no worker ran
    five = snap["provider"]["last_5_min"]
    assert (five["attempts"], five["succeeded"], five["declined"], five["errors"]) == (4, 2, 1, 1)
    assert five["errors_by_class"] == {"provider_unavailable": 1}
    assert five["p50_ms"] is not None
    out = cli("status", PAYMENT_PROVIDER_URL=sim.url)
    assert out.returncode == 0 and "succeeded 2" in out.stdout and "50.0% charged" in out.stdout
    assert json.loads(cli("status", "--json").stdout)["charges"]["failed"] == 1


def test_health_is_ok_then_names_what_is_wrong(sim: Sim) -> None:
    ok = cli("health", PAYMENT_PROVIDER_URL=sim.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert {line.split()[1] for line in ok.stdout.splitlines()[:-1]} >= {
        "redis", "postgres", "provider", "breaker", "error_rate", "dead_letters", "pools"
    }  # fmt: skip
    bad_key = cli("health", PAYMENT_PROVIDER_URL=sim.url, PAYMENT_PROVIDER_API_KEY="sk_wrong")
    assert bad_key.returncode == 3 and "refused PAYMENT_PROVIDER_API_KEY" in bad_key.stdout
    no_redis = cli("health", "--no-provider", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert no_redis.returncode == 3  # payq's table: 3, a service down
    assert any(line.startswith("down") and "redis" in line for line in no_redis.stdout.splitlines())


def test_charges_going_dead_make_health_degraded_for_one_interval(sim: Sim) -> None:
    settings = load_settings(payment_provider_url=sim.url, health_check_interval_s=1)
    assert worst(run_checks(settings, provider=False)) is Level.OK
    sim.faults(script=["invalid_request"])
    [cid] = enqueue(1)
    with ProviderClient(settings) as provider:
        process_charge(str(cid), settings=settings, provider=provider)
    checks = {c.name: c for c in run_checks(settings, provider=False)}
    assert checks["dead_letters"].level is Level.DEGRADED
    detail = checks["dead_letters"].detail
    assert "1 charge went dead in the last 1 s" in detail and "payq dlq list" in detail
    time.sleep(1.2)
    again = {c.name: c for c in run_checks(settings, provider=False)}
    assert again["dead_letters"].level is Level.OK  # none new since


def test_workers_report_alert_and_serve_metrics_without_leaking_the_key(sim: Sim) -> None:
    port = free_port()
    sim.faults(error_rate=1.0)
    env = {
        "PAYMENT_PROVIDER_URL": sim.url,
        "HEALTH_CHECK_INTERVAL_S": "2",
        "HEALTH_MIN_ATTEMPTS": "3",
        "METRICS_PORT": str(port),
        "LOG_FORMAT": "json",
        "RETRY_MAX_ATTEMPTS": "2",
    }
    with PayqProcess("worker", "--processes", "2", "--threads", "2", env=env) as worker:
        ids = enqueue(6)
        wait_until(lambda: statuses().get("dead", 0) == len(ids), 30, "every charge to go dead")
        wait_until(lambda: "ALERT error_rate degraded" in worker.output(), 20, "the alert")
        workers = wait_until(
            lambda: [w for w in snapshot()["workers"] if w["threads"] == 2], 15, "worker reports"
        )
        assert len(workers) == 2 and {w["http_size"] for w in workers} == {5}
        body = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0, Dramatiq's default
        log_text = worker.output()
    assert 'payq_charges_total{outcome="dead"} 6.0' in body
    assert "payq_breaker_state 0.0" in body  # 12 failed calls: under BREAKER_MIN_CALLS
    assert "payq_fleet_slots_in_use " in body
    assert "dramatiq_messages_total" in body
    assert 'payq_provider_attempts_total{error_class="provider_unavailable"} 12.0' in body
    lines = [line for line in log_text.splitlines() if line.startswith("{")]
    assert len(lines) > 10 and all("level" in json.loads(line) for line in lines)
    assert API_KEY not in log_text


def test_status_and_health_show_an_open_breaker_and_the_fleet_slots_in_use(
    client: redis.Redis, held_slots: Slots
) -> None:
    pinned = {"BREAKER_WINDOW_S": "30", "BREAKER_MIN_CALLS": "20", "BREAKER_FAILURE_RATE": "0.5"}
    settings = load_settings(breaker_window_s=30, breaker_min_calls=20, breaker_failure_rate=0.5)
    held_slots.take(3)  # three calls in flight elsewhere
    gate = ProviderGate(client, settings)
    for _ in range(2):
        call(gate, SUCCEEDED, 40)
    for _ in range(18):  # the 18th failure is the 20th call: it opens
        call(gate, TIMED_OUT, 1500)
    assert isinstance(gate.enter(), Wait)  # open: no more calls
    gate.flush()
    gate.stop_keeping()
    gate.fleet.stop_renewing()
    assert gate.breaker.snapshot().state is BreakerState.OPEN

    out = cli("status", **pinned)
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("breaker ")]
    assert "open until " in line and "s more): 18 of 20 calls failed in 30 s" in line
    assert "(opened 1 time; 30 s window: 20 calls, 18 failed, 0 slow)" in line
    assert "fleet      3 of 20 slots in use (PAYMENT_MAX_CONCURRENCY)" in out.stdout
    snap = json.loads(cli("status", "--json", **pinned).stdout)
    assert snap["breaker"]["state"] == "open" and snap["breaker"]["opened"] == 1
    assert snap["breaker"]["reason"] == "18 of 20 calls failed in 30 s"
    assert snap["breaker"]["window"] == {"calls": 20, "failures": 18, "slow": 0}
    assert snap["fleet"]["slots_in_use"] == 3 and snap["fleet"]["max_concurrency"] == 20

    health = cli("health", "--no-provider", **pinned)
    assert health.returncode == 1, health.stdout + health.stderr  # degraded, not down
    [line] = [x for x in health.stdout.splitlines() if x.split()[1:2] == ["breaker"]]
    assert line.startswith("degraded") and "18 of 20 calls failed in 30 s" in line
    assert "charges are deferred, using no attempt" in line
    assert health.stdout.splitlines()[-1] == "degraded"


def test_the_breaker_check_follows_the_breaker_through_open_half_open_and_closed(
    client: redis.Redis,
) -> None:
    settings = load_settings(
        breaker_window_s=30,
        breaker_min_calls=4,
        breaker_failure_rate=0.5,
        breaker_open_s=1,
        breaker_half_open_probes=1,
    )
    gate = ProviderGate(client, settings)
    call(gate, SUCCEEDED, 40)
    gate.flush()
    closed = check_breaker(gate)
    assert closed == Check("breaker", Level.OK, "closed (30 s window: 1 calls, 0 failed, 0 slow)")
    for _ in range(3):
        call(gate, TIMED_OUT, 40)
    opened = check_breaker(gate)
    assert opened.level is Level.DEGRADED
    assert (
        opened.detail.startswith("open until ") and "3 of 4 calls failed in 30 s" in opened.detail
    )
    time.sleep(1.1)
    over = check_breaker(gate)  # BREAKER_OPEN_S is over, but no charge has asked yet
    assert over.level is Level.DEGRADED
    assert over.detail.startswith("open (BREAKER_OPEN_S over: half-opens at the next charge)")
    probe = passed(gate.enter())  # the next charge after BREAKER_OPEN_S: a probe
    assert probe.probe
    half_open = check_breaker(gate)
    assert half_open.level is Level.DEGRADED
    assert half_open.detail.startswith("half-open for ")
    assert "charges beyond its probes are deferred" in half_open.detail
    gate.leave(probe, SUCCEEDED, 40)
    gate.stop_keeping()
    gate.fleet.stop_renewing()
    again = check_breaker(gate)
    assert again.level is Level.OK
    assert again.detail.startswith(
        "closed 0 s ago: 1 of 1 half-open probes succeeded (opened 1 time; "
    )


def test_the_provider_check_holds_a_fleet_slot_and_never_calls_over_the_limit(
    sim: Sim, client: redis.Redis, held_slots: Slots
) -> None:
    settings = load_settings(payment_provider_url=sim.url)
    gate = ProviderGate(client, settings)
    held_slots.take(settings.payment_max_concurrency)
    with ProviderClient(settings) as provider, contextlib.ExitStack() as after:
        after.callback(gate.fleet.stop_renewing)  # it renews the slot the check took
        before = sim.stats()["requests"]
        after.callback(gate.stop_keeping)  # and may keep it for the next call
        full = check_provider(provider, gate)
        assert full == Check(
            "provider",
            Level.OK,
            "not probed: all 20 fleet slots (PAYMENT_MAX_CONCURRENCY) are in use",
        )
        assert sim.stats()["requests"] == before  # the provider was not called
        assert run_checks(settings, client=provider, gate=gate)[2] == full

        held_slots.free(1)  # one slot free: the check takes it
        sim.faults(latency_ms=600)
        checked: list[Check] = []
        probe = threading.Thread(target=lambda: checked.append(check_provider(provider, gate)))
        probe.start()
        wait_until(lambda: gate.fleet.in_use() == 20, 5, "the check to hold the free slot")
        probe.join(5)
        [done] = checked
        assert done.level is Level.OK and done.detail.startswith("answered a lookup in ")
        assert sim.stats()["requests"] == before + 1
        assert gate.fleet.in_use() == 19  # given back at once: `payq health` exits after

        # Redis (the fleet limit) does not answer: no call without a slot.
        gone = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        blind = ProviderGate(gone, settings)
        no_redis = check_provider(provider, blind)
        assert no_redis == Check(
            "provider", Level.DEGRADED, "not probed: Redis did not answer (ConnectionError)"
        )
        assert sim.stats()["requests"] == before + 1
        unknown = check_breaker(blind)
        assert unknown.level is Level.DEGRADED and unknown.detail.startswith("state unknown")
        gone.close()


def test_health_says_which_checks_it_could_not_run_when_a_service_is_down() -> None:
    down = cli("health", "--no-provider", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    lines = {line.split()[1]: line for line in down.stdout.splitlines()[:-1]}
    for name in ("error_rate", "dead_letters", "unknown_outcomes", "pools"):
        assert name in lines and "not checked: redis did not answer" in lines[name], down.stdout


def test_the_provider_check_leaves_the_breaker_alone_and_its_probes_to_charges(
    sim: Sim, client: redis.Redis
) -> None:
    settings = load_settings(
        payment_provider_url=sim.url,
        breaker_min_calls=4,
        breaker_open_s=1,
        breaker_half_open_probes=1,
    )
    gate = ProviderGate(client, settings)
    with ProviderClient(settings) as provider, contextlib.ExitStack() as after:
        after.callback(gate.fleet.stop_renewing)
        after.callback(gate.stop_keeping)
        sim.faults(error_rate=1.0, lookup_error_rate=1.0)
        for _ in range(3):
            assert check_provider(provider, gate).level is Level.DOWN
        assert gate.breaker.snapshot().window_calls == 0  # the checks are not charges
        for _ in range(4):
            call(gate, TIMED_OUT)  # charges' calls open it
        time.sleep(gate.breaker.snapshot().open_for_ms / 1000 + 0.05)
        before = sim.stats()["requests"]
        half_open = check_provider(provider, gate)  # the one probe place: not the check's
        assert half_open == Check(
            "provider", Level.DEGRADED, "not probed: the circuit breaker is half-open"
        )
        assert sim.stats()["requests"] == before
        assert passed(gate.enter()).probe  # still there for a charge


@pytest.fixture
def ends() -> Iterator[TwoEndpoints]:
    with two_endpoints() as both:
        yield both


def test_status_shows_each_endpoint_with_its_own_breaker_slots_and_figures(
    ends: TwoEndpoints,
) -> None:
    at_a, at_b = ends.failover()
    held = passed(ends.route("b").gate.enter())  # one call in flight at b
    snap = snapshot(ends.settings)
    a, b = snap["endpoints"]
    assert (a["name"], a["group"], a["priority"]) == ("a", "a", 1)
    assert (b["name"], b["group"], b["priority"]) == ("b", "b", 2)
    assert a["breaker"]["state"] == "open" and b["breaker"]["state"] == "closed"
    assert snap["breaker"]["state"] == "open"  # the first-priority endpoint's, as before
    assert (a["fleet"]["slots_in_use"], b["fleet"]["slots_in_use"]) == (0, 1)
    a60, b60 = a["last_60_min"], b["last_60_min"]
    assert (a60["calls"], a60["succeeded"], a60["errors"], a60["charged"]) == (2, 1, 1, 1)
    assert a60["errors_by_class"] == {"rate_limited": 1}
    assert (b60["calls"], b60["succeeded"], b60["errors"], b60["charged"]) == (1, 1, 0, 1)
    assert b60["errors_by_class"] == {} and b60["p50_ms"] is not None
    assert (a60["failovers_out"], a60["failovers_in"], b60["failovers_in"]) == (1, 0, 1)
    assert (a60["moved_in"], b60["moved_in"]) == (0, 1)  # b is another ledger group

    out = cli("status", **ends.env)
    assert out.returncode == 0, out.stderr
    rows = {x.split()[0]: x.split() for x in out.stdout.splitlines() if x.startswith("  a ")}
    rows |= {x.split()[0]: x.split() for x in out.stdout.splitlines() if x.startswith("  b ")}
    assert rows["a"][1:5] == ["a", "1", "open", "0/20"]
    assert rows["b"][1:5] == ["b", "2", "closed", "1/20"]
    assert "  a: breaker open until " in out.stdout
    assert "  b: breaker closed (" in out.stdout
    assert "  a: errors (60 min) rate_limited 1" in out.stdout
    assert "  b: errors (60 min) none" in out.stdout
    as_json = json.loads(cli("status", "--json", **ends.env).stdout)
    assert [e["breaker"]["state"] for e in as_json["endpoints"]] == ["open", "closed"]
    ends.route("b").gate.leave(held, None, keep=False)
    assert charge(at_a).charged_endpoint == "a" and charge(at_b).charged_endpoint == "b"


def test_status_with_one_endpoint_shows_it_as_a_one_row_table(sim: Sim) -> None:
    settings = load_settings(payment_provider_url=sim.url)
    [cid] = enqueue(1)
    with ProviderClient(settings) as provider:
        process_charge(str(cid), settings=settings, provider=provider)
    [default] = snapshot(settings)["endpoints"]
    assert (default["name"], default["group"], default["breaker"]["state"]) == (
        "default",
        "default",
        "closed",
    )
    assert default["last_5_min"]["calls"] == 1 and default["last_60_min"]["charged"] == 1
    out = cli("status", PAYMENT_PROVIDER_URL=sim.url).stdout
    assert "endpoints  1 endpoint, highest priority first" in out
    [row] = [x.split() for x in out.splitlines() if x.startswith("  default ")]
    assert row[1:6] == ["default", "1", "closed", "0/20", "1"]


def test_health_checks_each_endpoint_and_says_which_breaker_is_open(ends: TwoEndpoints) -> None:
    ends.open_breaker("a")
    before_a, before_b = ends.a.stats()["requests"], ends.b.stats()["requests"]
    checks = {c.name: c for c in run_checks(ends.settings, routes=ends.routes)}
    assert "provider" not in checks and "breaker" not in checks  # named by endpoint
    assert checks["breaker:a"].level is Level.DEGRADED
    assert checks["breaker:a"].detail.startswith("open until ")
    assert "charges are deferred, using no attempt" in checks["breaker:a"].detail
    assert checks["breaker:b"].level is Level.OK
    assert checks["breaker:b"].detail.startswith("closed (")
    assert checks["provider:a"] == Check(
        "provider:a", Level.DEGRADED, "not probed: endpoint a's circuit breaker is open"
    )
    assert checks["provider:b"].level is Level.OK
    assert checks["provider:b"].detail.startswith("answered a lookup in ")
    assert ends.a.stats()["requests"] == before_a  # a was not called past its breaker
    assert ends.b.stats()["requests"] == before_b + 1  # b was: one lookup
    assert worst(list(checks.values())) is Level.DEGRADED

    out = cli("health", **ends.env)
    assert out.returncode == 1, out.stdout + out.stderr  # degraded, not down
    lines = {line.split()[1]: line for line in out.stdout.splitlines()[:-1]}
    assert lines["breaker:a"].startswith("degraded") and "open until" in lines["breaker:a"]
    assert lines["breaker:b"].startswith("ok") and "closed (" in lines["breaker:b"]
    assert lines["provider:a"].startswith("degraded")
    assert lines["provider:b"].startswith("ok")


def test_health_names_the_endpoint_whose_key_is_refused(ends: TwoEndpoints) -> None:
    endpoints = [
        {"name": "a", "url": ends.a.url},
        {"name": "b", "url": ends.b.url, "api_key": "sk_wrong"},
    ]
    out = cli("health", PAYMENT_ENDPOINTS=json.dumps(endpoints))
    # b is down, but charges go to a: degraded (down only when no endpoint answers).
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {line.split()[1]: line for line in out.stdout.splitlines()[:-1]}
    assert lines["provider:a"].startswith("ok")
    assert lines["provider:b"].startswith("degraded")
    assert "endpoint b refused its API key" in lines["provider:b"]
    assert "other endpoints answer" in lines["provider:b"]
    both = [{"name": "a", "url": ends.a.url, "api_key": "sk_wrong"}, endpoints[1]]
    out = cli("health", PAYMENT_ENDPOINTS=json.dumps(both))
    assert out.returncode == 3, out.stdout + out.stderr  # no endpoint answers: down
    assert "sk_wrong" not in out.stdout


def test_one_endpoint_down_while_another_answers_is_degraded_not_down() -> None:
    from payq.health import Check, Level, _down_only_if_all

    down, ok = Check("provider:a", Level.DOWN, "refused"), Check("provider:b", Level.OK, "ok")
    assert [c.level for c in _down_only_if_all([down, ok])] == [Level.DEGRADED, Level.OK]
    assert [c.level for c in _down_only_if_all([down, down])] == [Level.DOWN, Level.DOWN]
    assert _down_only_if_all([down]) == [down]  # one endpoint: down is down
