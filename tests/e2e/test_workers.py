"""End to end: real `payq worker` and `payq relay` processes, real Redis and PostgreSQL,
the simulator over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from devservices import ThrowawayRedis
from payq.constants import FINAL_STATUSES
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, NAMESPACE, REDIS_URL, TEST_ENV
from tests.helpers import Sim, attempts, charge, statuses, wait_until
from tests.processes import PayqProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


def enqueue(n: int, prefix: str = "e2e") -> list[uuid.UUID]:
    tag = uuid.uuid4().hex[:6]
    made = enqueue_charges(
        [
            {
                "amount": 100 + i,
                "currency": "usd",
                "source": "tok_visa",
                "idempotency_key": f"{prefix}-{tag}-{i}",
            }
            for i in range(n)
        ]
    )
    return [c.id for c in made]


def all_final(ids: list[uuid.UUID]) -> bool:
    return all(charge(cid).status in FINAL_STATUSES for cid in ids)


def test_charges_under_faults_each_end_final_and_are_charged_once(sim: Sim) -> None:
    sim.faults(
        error_rate=0.2,
        decline_rate=0.1,
        rate_limit_rate=0.05,
        retry_after_s=1,
        timeout_rate=0.05,
        timeout_delay_s=2.5,
        reset_rate=0.03,
        latency_ms=20,
        seed=7,
    )
    env = {"PAYMENT_PROVIDER_URL": sim.url, "RETRY_MAX_ATTEMPTS": "8"}
    with PayqProcess("worker", "--processes", "2", "--threads", "3", env=env):
        ids = enqueue(120)
        wait_until(lambda: all_final(ids), 90, "every charge to end final")
    counts = statuses()
    stats = sim.stats()
    assert stats["duplicate_charges"] == 0
    # Exactly one provider charge per succeeded charge, none for the others.
    assert stats["charges"] == counts.get("succeeded", 0) > 0
    assert counts.get("failed", 0) > 0 and stats["requests"] > len(ids)  # faults really fired
    for cid in ids:
        c = charge(cid)
        history = attempts(cid)
        assert len(history) == c.attempts >= 1
        if c.status == "succeeded":
            assert history[-1]["outcome"] == "succeeded" and c.provider_charge_id


def test_retry_after_is_honoured_by_real_workers(sim: Sim) -> None:
    sim.faults(script=["rate_limit", "error", "ok"], retry_after_s=2)
    env = {"PAYMENT_PROVIDER_URL": sim.url}
    with PayqProcess("worker", "--processes", "1", "--threads", "2", env=env):
        [cid] = enqueue(1, "retry-after")
        wait_until(lambda: all_final([cid]), 30, "the charge to end final")
    c = charge(cid)
    requests = sim.requests(c.idempotency_key)
    assert c.status == "succeeded" and [r["status"] for r in requests] == [429, 503, 200]
    waited = requests[1]["at"] - requests[0]["at"]
    assert waited >= 2.0, (
        f"the provider said Retry-After: 2 and was called again after {waited:.2f} s"
    )
    assert [a["error_class"] for a in attempts(cid)] == [
        "rate_limited",
        "provider_unavailable",
        None,
    ]


def test_one_message_delivered_twice_to_two_worker_processes_charges_once(sim: Sim) -> None:
    from payq.broker import publish

    sim.faults(latency_ms=300)
    [cid] = enqueue(1, "twice")
    publish([(cid, f"dup-{uuid.uuid4().hex}") for _ in range(3)])  # three more messages
    env = {"PAYMENT_PROVIDER_URL": sim.url}
    with PayqProcess("worker", "--processes", "2", "--threads", "2", env=env):
        wait_until(lambda: all_final([cid]), 30, "the charge to end final")
        time.sleep(1)  # let the duplicates be delivered and skipped
    assert charge(cid).attempts == 1 and len(attempts(cid)) == 1
    assert sim.stats()["requests"] == 1 and sim.stats()["charges"] == 1


def test_undecodable_message_is_dead_lettered_and_the_worker_keeps_serving(sim: Sim) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    garbage_id = "garbage-" + uuid.uuid4().hex
    client.hset(f"{NAMESPACE}:charges.msgs", garbage_id, b"\x00not json at all")
    client.rpush(f"{NAMESPACE}:charges", garbage_id)
    with PayqProcess(
        "worker", "--processes", "1", "--threads", "2", env={"PAYMENT_PROVIDER_URL": sim.url}
    ) as worker:
        wait_until(
            lambda: client.zscore(f"{NAMESPACE}:charges.XQ", garbage_id) is not None,
            20,
            "the undecodable message to reach the dead-letter set",
        )
        ids = enqueue(10)
        wait_until(lambda: all_final(ids), 30, "charges after the bad message to complete")
        assert "undecodable message" in worker.output()
    assert client.hget(f"{NAMESPACE}:charges.XQ.msgs", garbage_id) == b"\x00not json at all"
    client.close()


def test_message_for_a_charge_that_does_not_exist_is_dead_lettered(sim: Sim) -> None:
    from payq.broker import publish

    missing = uuid.uuid4()
    publish([(missing, "m-" + uuid.uuid4().hex)])
    client = redis.Redis.from_url(REDIS_URL)
    with PayqProcess(
        "worker", "--processes", "1", "--threads", "1", env={"PAYMENT_PROVIDER_URL": sim.url}
    ) as worker:
        wait_until(lambda: client.zcard(f"{NAMESPACE}:charges.XQ") == 1, 20, "the dead letter")
        assert f"no charge with id {missing}" in worker.output()
        ids = enqueue(3)
        wait_until(lambda: all_final(ids), 20, "later charges to complete")
    [payload] = client.hvals(f"{NAMESPACE}:charges.XQ.msgs")
    assert json.loads(payload)["args"] == [str(missing)]
    client.close()


def test_redis_losing_every_key_loses_no_charge() -> None:
    with ThrowawayRedis() as throwaway, SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        sim.faults(latency_ms=100)
        env = {"REDIS_URL": throwaway.url, "PAYMENT_PROVIDER_URL": sim.url}
        from payq.broker import BROKER, make_broker
        from payq.runtime import runtime
        from payq.settings import load_settings

        with runtime().replaced(BROKER, make_broker(load_settings(redis_url=throwaway.url))):
            ids = enqueue(60, "flush")
        with PayqProcess("worker", "--processes", "1", "--threads", "2", env=env):
            wait_until(lambda: sim.stats()["requests"] >= 5, 20, "some charges to start")
            throwaway.restart(wipe=True)  # every queued and in-flight message is gone
            with PayqProcess("relay", env=env):
                wait_until(lambda: all_final(ids), 60, "the relay to bring every charge back")
        stats = sim.stats()
        assert statuses() == {"succeeded": 60}
        assert stats["duplicate_charges"] == 0 and stats["charges"] == 60


def test_worker_with_more_threads_than_its_pools_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "payq_cli", "worker", "--processes", "1", "--threads", "6"],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin", "PAYMENT_POOL_MAX_CONNECTIONS": "5"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "6 worker threads per process exceed PAYMENT_POOL_MAX_CONNECTIONS=5" in lines[0]


def test_dramatiq_workers_directly_refuses_too_many_threads_too() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dramatiq", "workers", "--processes", "1", "--threads", "12"],
        env={**TEST_ENV, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert (
        "12 worker threads per process exceed PAYMENT_POOL_MAX_CONNECTIONS=5 and "
        "DATABASE_POOL_MAX_CONNECTIONS=10" in result.stderr
    )
    assert time.monotonic() - started < 30


def test_worker_killed_mid_call_its_charges_finish_elsewhere_once(sim: Sim) -> None:
    import os
    import signal

    sim.faults(latency_ms=1000)  # under the suite's 1500 ms PAYMENT_TIMEOUT_MS
    env = {
        "PAYMENT_PROVIDER_URL": sim.url,
        "CHARGE_LEASE_S": "6",  # over 1.5 + 2 x (1 + 1) s, the worst case of one attempt
        "DB_TIMEOUT_MS": "1000",
        "DB_STATEMENT_TIMEOUT_MS": "1000",
        "RELAY_DEAD_WORKER_S": "5",
    }
    with PayqProcess("relay", env=env):
        victim = PayqProcess("worker", "--processes", "1", "--threads", "2", env=env).start()
        try:
            ids = enqueue(6, "killed")
            wait_until(lambda: sim.stats()["in_flight"] >= 1, 20, "a provider call in flight")
            assert victim.proc is not None
            os.killpg(victim.proc.pid, signal.SIGKILL)  # no goodbye: calls, prefetch, acks lost
            killed_at = time.monotonic()
            with PayqProcess("worker", "--processes", "1", "--threads", "2", env=env):
                wait_until(lambda: all_final(ids), 40, "the killed worker's charges to finish")
                recovery_s = time.monotonic() - killed_at
        finally:
            victim.stop()
            victim.log_path.unlink(missing_ok=True)
    assert statuses() == {"succeeded": 6}
    stats = sim.stats()
    assert stats["duplicate_charges"] == 0 and stats["charges"] == 6
    # Bounded by the lease (6 s) plus relay passes, not by Dramatiq's 60 s heartbeat lottery.
    assert recovery_s < 25, f"recovery took {recovery_s:.1f} s"
    print(f"recovery after SIGKILL: {recovery_s:.1f} s")
