"""`payq status`, `payq health`, worker reports, alerts and metrics, against real services."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from payq.devservices import free_port
from payq.ops.health import Level, run_checks, worst
from payq.ops.status import snapshot
from payq.processing import process_charge
from payq.provider import ProviderClient
from payq.settings import load_settings
from payq.sim import SimulatorThread
from producers import enqueue_charges
from tests.conftest import API_KEY, TEST_ENV
from tests.helpers import Sim, statuses, wait_until
from tests.processes import PayqProcess

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


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
        [sys.executable, "-m", "payq.cli", *args],
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
    assert bad_key.returncode == 2 and "refused PAYMENT_PROVIDER_API_KEY" in bad_key.stdout
    no_redis = cli("health", "--no-provider", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert no_redis.returncode == 2
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
    assert "1 charges went dead in the last 1 s" in detail and "payq dlq list" in detail
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
    assert "dramatiq_messages_total" in body
    assert 'payq_provider_attempts_total{error_class="provider_unavailable"} 12.0' in body
    lines = [line for line in log_text.splitlines() if line.startswith("{")]
    assert len(lines) > 10 and all("level" in json.loads(line) for line in lines)
    assert API_KEY not in log_text
