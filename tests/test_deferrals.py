"""A charge that must wait is deferred before its claim: a delayed message, no attempt used.

Real PostgreSQL, Redis and the simulator; the breaker and the fleet limit are the real
ones, pushed into the state under test through their own API.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from payq.constants import QUEUE_NAME
from payq.db import get_engine
from payq.gate import ProviderGate
from payq.processing import Result, UnknownCharge, process_charge
from payq.provider import ProviderClient
from payq.settings import Settings, load_settings
from producers import enqueue_charge
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, NAMESPACE, REDIS_URL
from tests.helpers import (
    SUCCEEDED,
    Sim,
    attempts,
    charge,
    fail_calls,
    passed,
    unique_key,
    wait_until,
)


class Rig:
    def __init__(self, sim: Sim, settings: Settings, client: redis.Redis) -> None:
        self.sim = sim
        self.settings = settings
        self.client = client
        self.provider = ProviderClient(settings)
        self.gate = ProviderGate(client, settings)

    def enqueue(self) -> uuid.UUID:
        return enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id

    def run(self, cid: uuid.UUID, message_id: str | None = None) -> Result:
        return process_charge(
            str(cid),
            message_id=message_id or charge(cid).message_id,
            settings=self.settings,
            provider=self.provider,
            gate=self.gate,
        )

    def delayed(self, cid: uuid.UUID) -> dict[str, int]:
        """The delayed messages for this charge: Redis id -> eta (ms)."""
        raw = self.client.hgetall(f"{NAMESPACE}:{QUEUE_NAME}.DQ.msgs")
        found = {}
        for redis_id, body in raw.items():
            message = json.loads(body)
            if message["args"] == [str(cid)]:
                found[redis_id.decode()] = int(message["options"]["eta"])
        return found


@pytest.fixture
def rig(clean: None) -> Iterator[Rig]:
    client = redis.Redis.from_url(REDIS_URL)
    with SimulatorThread(api_key=API_KEY) as thread:
        settings = load_settings(
            payment_provider_url=thread.url,
            payment_max_concurrency=2,
            breaker_min_calls=4,
            breaker_open_s=5,
        )
        r = Rig(Sim(thread.url), settings, client)
        yield r
        r.provider.close()
        r.gate.stop_keeping()
        r.gate.fleet.stop_renewing()
    client.close()


def assert_untouched(rig: Rig, cid: uuid.UUID) -> None:
    c = charge(cid)
    assert (c.status, c.attempts) == ("pending", 0)
    assert attempts(cid) == []
    assert rig.sim.stats()["requests"] == 0


def test_an_open_breaker_defers_to_when_it_may_half_open(rig: Rig) -> None:
    fail_calls(rig.gate, 4)
    cid = rig.enqueue()
    before_ms = time.time() * 1000
    assert rig.run(cid) is Result.DEFERRED
    assert_untouched(rig, cid)
    delayed = rig.delayed(cid)
    # The same Redis id as the row names, so the relay sees it queued and sends no other.
    assert list(delayed) == [charge(cid).message_id]
    eta = next(iter(delayed.values()))
    # Open for 5 s: due then, spread over at most 3 s more so the fleet does not stampede.
    assert before_ms + 4500 <= eta <= before_ms + 5000 + 3000 + 500
    assert rig.gate.fleet.in_use() == 0  # no slot kept


def test_a_full_fleet_defers_a_moment_without_an_attempt(rig: Rig) -> None:
    other_process = ProviderGate(rig.client, rig.settings)
    try:
        passed(other_process.enter())
        passed(other_process.enter())
        cid = rig.enqueue()
        before_ms = time.time() * 1000
        assert rig.run(cid) is Result.DEFERRED
        assert_untouched(rig, cid)
        [eta] = rig.delayed(cid).values()
        assert before_ms + 150 <= eta <= before_ms + 1000 + 500  # short and jittered
    finally:
        other_process.fleet.stop_renewing()


def test_a_half_open_probe_that_finds_the_fleet_full_is_given_back(rig: Rig) -> None:
    other_process = ProviderGate(rig.client, rig.settings)
    try:
        passed(other_process.enter())
        passed(other_process.enter())  # the fleet's two slots
        # A process with room of its own (a larger PAYMENT_MAX_CONCURRENCY) opens it.
        roomy = rig.settings.model_copy(update={"payment_max_concurrency": 10})
        fail_calls(ProviderGate(rig.client, roomy), 4)
        rig.client.hset(rig.gate.breaker.state_key, "until", 0)  # the open time is over
        cid = rig.enqueue()
        assert rig.run(cid) is Result.DEFERRED
        assert int(rig.client.hget(rig.gate.breaker.state_key, "probes") or 0) == 0
    finally:
        other_process.fleet.stop_renewing()


def test_an_exhausted_database_pool_defers_and_says_so(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    cid = rig.enqueue()
    message_id = charge(cid).message_id
    engine = get_engine()
    held = [engine.connect() for _ in range(engine.pool.size())]  # type: ignore[attr-defined]
    try:
        with caplog.at_level(logging.WARNING, logger="payq.charge"):
            assert rig.run(cid, message_id) is Result.DEFERRED
    finally:
        for conn in held:
            conn.close()
    assert_untouched(rig, cid)
    assert len(rig.delayed(cid)) == 1
    [record] = [r for r in caplog.records if "pool exhausted" in r.getMessage()]
    size = rig.settings.database_pool_max_connections
    assert record.getMessage().startswith(
        f"database connection pool exhausted: no connection within DB_TIMEOUT_MS "
        f"({rig.settings.db_timeout_ms} ms), {size} of {size} in use"
    )
    assert record.cause == "db_pool"  # type: ignore[attr-defined]
    assert rig.gate.fleet.in_use() == 0  # the slot was not kept while waiting


def test_deferral_costs_no_attempt_however_often(rig: Rig) -> None:
    fail_calls(rig.gate, 4)
    cid = rig.enqueue()
    for _ in range(12):  # more deferrals than RETRY_MAX_ATTEMPTS
        assert rig.run(cid) is Result.DEFERRED
    rig.client.delete(rig.gate.breaker.state_key)  # closed again
    assert rig.run(cid) is Result.SUCCEEDED
    assert charge(cid).attempts == 1


def test_the_slot_is_freed_on_every_path(rig: Rig) -> None:
    cid = rig.enqueue()
    assert rig.run(cid) is Result.SUCCEEDED
    assert rig.run(cid) is Result.SKIPPED  # a duplicate delivery: no call
    with pytest.raises(UnknownCharge, match="no charge with id"):
        process_charge(
            str(uuid.uuid4()), settings=rig.settings, provider=rig.provider, gate=rig.gate
        )
    # No path leaks a slot: the process keeps at most the one its calls share (given back
    # after REUSE_FOR_S unused), and none once it gives them back.
    assert rig.gate.fleet.in_use() <= 1 and rig.gate.fleet.held() <= 1
    rig.gate.flush()
    assert rig.gate.fleet.in_use() == 0 and rig.gate.fleet.held() == 0


def test_leaving_frees_the_slot_and_counts_the_call_in_one_step(rig: Rig) -> None:
    from payq.errors import ProviderTimeout
    from payq.gate import BreakerState, Pass

    for _ in range(4):  # BREAKER_MIN_CALLS=4 in this rig
        entry = rig.gate.enter()
        assert isinstance(entry, Pass) and rig.gate.fleet.in_use() == 1
        rig.gate.leave(entry, ProviderTimeout("no answer within 1500 ms"), 1500)
        assert rig.gate.fleet.in_use() == 0
    snap = rig.gate.breaker.snapshot()
    assert snap.state is BreakerState.OPEN and "4 of 4 calls failed" in snap.reason


def test_a_busy_process_keeps_its_slot_for_the_next_call_and_counts_it_soon(
    rig: Rig,
) -> None:
    from payq.gate import REUSE_FOR_S, Pass

    first = rig.gate.enter()
    assert isinstance(first, Pass)
    rig.gate.leave(first, SUCCEEDED, 20)
    assert rig.gate.fleet.in_use() == 1  # kept here, still held in Redis
    second = rig.gate.enter()  # no round trip: the kept slot
    assert isinstance(second, Pass) and second.token == first.token
    assert rig.gate.fleet.in_use() == 1
    rig.gate.leave(second, SUCCEEDED, 20)
    started = time.monotonic()
    wait_until(lambda: rig.gate.fleet.in_use() == 0, 3, "the idle slot given back")
    assert time.monotonic() - started >= REUSE_FOR_S - 0.05
    assert rig.gate.fleet.held() == 0
    assert rig.gate.breaker.snapshot().window_calls == 2


def test_a_failure_is_told_at_once_with_the_calls_counted_before_it(rig: Rig) -> None:
    from payq.errors import ProviderTimeout
    from payq.gate import BreakerState, Pass

    rig.gate.stop_keeping()  # the counts can reach Redis only with the failure
    for _ in range(3):
        entry = rig.gate.enter()
        assert isinstance(entry, Pass)
        rig.gate.leave(entry, SUCCEEDED, 20)
    assert rig.gate.breaker.snapshot().window_calls == 0  # counted here so far
    entry = rig.gate.enter()
    assert isinstance(entry, Pass)
    rig.gate.leave(entry, ProviderTimeout("no answer within 1500 ms"), 1500)
    snap = rig.gate.breaker.snapshot()
    assert (snap.window_calls, snap.window_failures) == (4, 1)
    assert snap.state is BreakerState.CLOSED  # 1 of 4 is under the failure rate
    assert rig.gate.fleet.in_use() == 0  # a failed call's slot goes back at once


def test_slow_calls_counted_here_open_the_breaker_when_they_are_sent(rig: Rig) -> None:
    from payq.gate import BreakerState, Pass

    rig.gate.stop_keeping()
    slow_ms = rig.settings.breaker_slow_call_ms
    for _ in range(4):  # BREAKER_MIN_CALLS=4 here; every one slow
        entry = rig.gate.enter()
        assert isinstance(entry, Pass)
        rig.gate.leave(entry, SUCCEEDED, slow_ms)
    assert rig.gate.breaker.snapshot().state is BreakerState.CLOSED  # not sent yet
    rig.gate.flush()
    snap = rig.gate.breaker.snapshot()
    assert snap.state is BreakerState.OPEN and "4 of 4 calls were slow" in snap.reason
    assert rig.gate.fleet.in_use() == 0


def test_a_breaker_opened_elsewhere_stops_this_process_within_the_trust_period(
    rig: Rig,
) -> None:
    from payq.gate import REUSE_FOR_S, Pass, Wait

    rig.gate.stop_keeping()  # the slot stays kept, and nothing reads the breaker again
    entry = rig.gate.enter()
    assert isinstance(entry, Pass)
    rig.gate.leave(entry, SUCCEEDED, 20)
    elsewhere = ProviderGate(rig.client, rig.settings)  # another process
    fail_calls(elsewhere, 4)
    time.sleep(REUSE_FOR_S + 0.05)
    refused = rig.gate.enter()  # a kept slot is there, but the trust has run out
    assert isinstance(refused, Wait) and refused.cause == "breaker_open"
    rig.gate.flush()


def test_a_kept_slot_that_redis_lost_is_never_used_again(rig: Rig) -> None:
    from payq.gate import Pass

    rig.gate.stop_keeping()
    entry = rig.gate.enter()
    assert isinstance(entry, Pass)
    rig.gate.leave(entry, SUCCEEDED, 20)
    rig.client.zrem(rig.gate.fleet.slots_key, entry.token)  # gone: a stall, an eviction
    rig.gate.fleet.renew()  # finds it lost
    again = rig.gate.enter()
    assert isinstance(again, Pass) and again.token != entry.token
    assert rig.gate.fleet.in_use() == 1  # the new one only
    rig.gate.leave(again, SUCCEEDED, 20)
    rig.gate.flush()
    assert rig.gate.fleet.in_use() == 0 and rig.gate.fleet.held() == 0


def test_a_deferral_hands_the_charge_a_fresh_message_and_drops_stale_duplicates(
    rig: Rig,
) -> None:
    fail_calls(rig.gate, 4)
    cid = rig.enqueue()
    first = charge(cid).message_id
    assert rig.run(cid, first) is Result.DEFERRED
    second = charge(cid).message_id
    # A new Redis id: Dramatiq's late delete of a due delayed copy cannot take it.
    assert second != first and list(rig.delayed(cid)) == [second]
    # The old message, delivered again, names a message the row no longer does: dropped.
    assert rig.run(cid, first) is Result.SKIPPED
    assert list(rig.delayed(cid)) == [second] and charge(cid).message_id == second


def test_a_message_sent_while_the_database_was_down_is_adopted_not_dropped(rig: Rig) -> None:
    fail_calls(rig.gate, 4)
    cid = rig.enqueue()
    # The row's message was consumed; the one now delivered was deferred while the
    # database could not record its id (the hand-over was skipped).
    rig.client.delete(f"{NAMESPACE}:{QUEUE_NAME}", f"{NAMESPACE}:{QUEUE_NAME}.msgs")
    assert rig.run(cid, "sent-while-the-database-was-down") is Result.DEFERRED
    adopted = charge(cid).message_id
    assert list(rig.delayed(cid)) == [adopted]  # the charge keeps a message of its own


def test_a_slot_that_lapsed_before_the_call_sends_nothing_and_uses_no_attempt(
    clean: None,
) -> None:
    """A process frozen between the gate and its call, longer than the slot's lease: its
    slot may be someone else's by then. Found out before the call, not after."""

    class FrozenAfterTheGate(ProviderGate):
        def enter(self) -> Any:
            passed = super().enter()
            self.fleet.stop_renewing(wait_s=1)  # the whole process stands still...
            time.sleep(self.fleet.lease_ms / 1000 + 0.3)  # ...past the slot's lease
            return passed

    client = redis.Redis.from_url(REDIS_URL)
    with SimulatorThread(api_key=API_KEY) as thread:
        settings = load_settings(  # the shortest slot lease (slot_lease_s): 3.3 s
            payment_provider_url=thread.url,
            fleet_slot_lease_s=0.5,
            payment_timeout_ms=100,
            payment_connect_timeout_ms=100,
        )
        gate = FrozenAfterTheGate(client, settings)
        cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("order")).id
        with ProviderClient(settings) as provider:
            result = process_charge(str(cid), settings=settings, provider=provider, gate=gate)
        assert result is Result.DEFERRED
        assert Sim(thread.url).stats()["requests"] == 0  # no call without a slot
        c = charge(cid)
        assert (c.status, c.attempts) == ("retrying", 0) and attempts(cid) == []
        assert c.message_id in {*[m for m in _delayed_ids(client, cid)]}
        gate.stop_keeping()
    client.close()


def _delayed_ids(client: redis.Redis, cid: uuid.UUID) -> list[str]:
    raw = client.hgetall(f"{NAMESPACE}:{QUEUE_NAME}.DQ.msgs")
    return [k.decode() for k, v in raw.items() if json.loads(v)["args"] == [str(cid)]]
