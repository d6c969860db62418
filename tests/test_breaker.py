"""The fleet's circuit breaker and concurrency slots, against real Redis.

Two ``FleetBreaker``/``FleetLimit`` objects over separate connections stand for two
worker processes: what one does, the other must see.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import redis

from payq.breaker import BreakerState, CallOutcome, FleetBreaker
from payq.errors import (
    AuthenticationFailed,
    CardDeclined,
    IdempotencyKeyInUse,
    InvalidRequest,
    ProviderConnectionError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from payq.fleet import FleetLimit, SlotRefused
from payq.gate import call_outcome
from payq.provider import ProviderCharge
from payq.settings import Settings, load_settings
from tests.conftest import NAMESPACE, REDIS_URL
from tests.helpers import wait_until

FAIL, OK, NEUTRAL = CallOutcome.FAILURE, CallOutcome.SUCCESS, CallOutcome.NEUTRAL


@pytest.fixture
def settings(clean: None) -> Settings:
    return load_settings(
        breaker_min_calls=6,
        breaker_window_s=10,
        breaker_failure_rate=0.5,
        breaker_slow_call_rate=0.8,
        breaker_slow_call_ms=500,
        breaker_open_s=1,
        breaker_half_open_probes=2,
    )


@pytest.fixture
def clients() -> Iterator[tuple[redis.Redis, redis.Redis]]:
    a, b = redis.Redis.from_url(REDIS_URL), redis.Redis.from_url(REDIS_URL)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def two(
    settings: Settings, clients: tuple[redis.Redis, redis.Redis]
) -> tuple[FleetBreaker, FleetBreaker]:
    return FleetBreaker(clients[0], NAMESPACE, settings), FleetBreaker(
        clients[1], NAMESPACE, settings
    )


def open_it(breaker: FleetBreaker) -> None:
    for _ in range(6):
        breaker.record(FAIL, 10, probe=False)
    assert breaker.snapshot().state is BreakerState.OPEN


@pytest.mark.parametrize(
    ("outcome", "counts_as"),
    [
        (ProviderCharge("ch_1", "succeeded", 1999, "usd"), OK),
        (ProviderTimeout("no answer within 5000 ms"), FAIL),
        (ProviderConnectionError("connection reset"), FAIL),
        (ProviderUnavailable("503 from the provider", status=503), FAIL),
        (ProviderRateLimited("429", status=429, retry_after_s=2), FAIL),
        (CardDeclined("declined", code="card_declined", provider_charge_id="ch_2"), NEUTRAL),
        (InvalidRequest("bad amount", status=400), NEUTRAL),
        (AuthenticationFailed("bad key", status=401), NEUTRAL),
        # Our own earlier call for this key is still running there: not a sick provider.
        (IdempotencyKeyInUse("in use", status=409), NEUTRAL),
    ],
)
def test_what_counts_as_a_failure(outcome: object, counts_as: CallOutcome) -> None:
    assert call_outcome(outcome) is counts_as  # type: ignore[arg-type]


def test_opens_on_the_failure_rate_only_after_the_minimum_calls(
    two: tuple[FleetBreaker, FleetBreaker],
) -> None:
    a, b = two
    for _ in range(5):
        assert a.record(FAIL, 10, probe=False) is None  # 5 of 5 failed, but under 6 calls
    assert b.snapshot().state is BreakerState.CLOSED
    assert b.record(FAIL, 10, probe=False) is BreakerState.OPEN  # the other process tips it
    snap = a.snapshot()
    assert snap.state is BreakerState.OPEN and "6 of 6 calls failed" in snap.reason
    assert 0 < snap.open_for_ms <= 1000 and snap.opened == 1


def test_stays_closed_below_the_rate_and_on_declines(
    two: tuple[FleetBreaker, FleetBreaker],
) -> None:
    a, _ = two
    for outcome in [FAIL, OK, FAIL, OK, NEUTRAL, NEUTRAL, OK, FAIL, NEUTRAL, NEUTRAL] * 3:
        assert a.record(outcome, 10, probe=False) is None  # 30 % failed: under 50 %
    snap = a.snapshot()
    assert snap.state is BreakerState.CLOSED
    assert (snap.window_calls, snap.window_failures) == (30, 9)


def test_opens_on_the_slow_call_rate(two: tuple[FleetBreaker, FleetBreaker]) -> None:
    a, _ = two
    results = [a.record(OK, 600, probe=False) for _ in range(6)]  # all slow, all succeeded
    assert results[-1] is BreakerState.OPEN and results[:-1] == [None] * 5
    assert "6 of 6 calls were slow" in a.snapshot().reason


def test_open_refuses_then_half_opens_with_a_fleet_wide_number_of_probes(
    two: tuple[FleetBreaker, FleetBreaker],
) -> None:
    a, b = two
    open_it(a)
    refused = b.admit()
    assert not refused.allowed and refused.state is BreakerState.OPEN
    assert 0 < refused.wait_ms <= 1000
    time.sleep(refused.wait_ms / 1000 + 0.05)
    first = a.admit()
    assert first.allowed and first.probe and first.changed_to is BreakerState.HALF_OPEN
    second = b.admit()
    assert second.allowed and second.probe and second.changed_to is None
    third = a.admit()  # two probes across the fleet, however many processes ask
    assert not third.allowed and third.state is BreakerState.HALF_OPEN
    assert a.record(OK, 10, probe=True) is None
    assert b.record(OK, 10, probe=True) is BreakerState.CLOSED
    assert a.admit().allowed and not a.admit().probe
    # The outage's failures are forgotten: one failure after closing does not reopen it.
    assert a.record(FAIL, 10, probe=False) is None
    assert a.snapshot().window_calls == 1


def test_a_failed_probe_reopens_it(two: tuple[FleetBreaker, FleetBreaker]) -> None:
    a, b = two
    open_it(a)
    time.sleep(1.05)
    assert a.admit().probe
    assert b.record(FAIL, 10, probe=True) is BreakerState.OPEN
    assert not b.admit().allowed
    assert a.snapshot().opened == 2


def test_probes_lost_with_their_worker_are_replaced(
    two: tuple[FleetBreaker, FleetBreaker],
) -> None:
    a, b = two
    a.probe_timeout_ms = b.probe_timeout_ms = 300
    open_it(a)
    time.sleep(1.05)
    assert a.admit().probe and a.admit().probe  # both probes taken; their worker dies
    assert not b.admit().allowed
    time.sleep(0.35)
    assert b.admit().probe  # not stuck half-open for ever


def test_an_unused_probe_is_given_back(two: tuple[FleetBreaker, FleetBreaker]) -> None:
    a, b = two
    open_it(a)
    time.sleep(1.05)
    assert a.admit().probe and a.admit().probe
    assert not b.admit().allowed
    a.return_probe()  # its charge was already final: no call was made
    assert b.admit().probe


def test_changes_of_state_are_logged_and_opening_alerts(
    two: tuple[FleetBreaker, FleetBreaker], caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = two
    with caplog.at_level(logging.INFO, logger="payq.breaker"):
        open_it(a)
        time.sleep(1.05)
        a.admit()
        a.record(OK, 10, probe=True)
        a.admit()
        a.record(OK, 10, probe=True)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0][0] == logging.ERROR
    assert lines[0][1].startswith("ALERT circuit breaker opened: 6 of 6 calls failed")
    assert [m.split(":")[0] for _, m in lines[1:]] == [
        "circuit breaker half-open",
        "circuit breaker closed",
    ]


# --- the fleet's concurrency slots -----------------------------------------------------


@pytest.fixture
def limits(
    clean: None, clients: tuple[redis.Redis, redis.Redis]
) -> Iterator[tuple[FleetLimit, FleetLimit]]:
    a = FleetLimit(clients[0], NAMESPACE, limit=3, lease_s=1.0)
    b = FleetLimit(clients[1], NAMESPACE, limit=3, lease_s=1.0)
    yield a, b
    a.stop_renewing()
    b.stop_renewing()


def test_slots_are_shared_by_the_fleet(limits: tuple[FleetLimit, FleetLimit]) -> None:
    a, b = limits
    held = [a.try_acquire(), b.try_acquire(), a.try_acquire()]
    assert all(isinstance(t, str) for t in held)
    refused = b.try_acquire()
    assert isinstance(refused, SlotRefused)
    assert (refused.in_use, refused.limit, refused.starting) == (3, 3, False)
    a.release(str(held[0]))
    assert isinstance(b.try_acquire(), str)
    assert a.in_use() == 3


def test_a_running_call_keeps_its_slot_past_the_lease(
    limits: tuple[FleetLimit, FleetLimit],
) -> None:
    a, b = limits
    for _ in range(3):
        assert isinstance(a.try_acquire(), str)
    time.sleep(2.5)  # two and a half leases: the renewer kept them
    assert isinstance(b.try_acquire(), SlotRefused)
    assert b.in_use() == 3


def test_a_dead_workers_slot_comes_back_within_a_lease(
    limits: tuple[FleetLimit, FleetLimit],
) -> None:
    a, b = limits
    for _ in range(3):
        assert isinstance(a.try_acquire(), str)
    a.stop_renewing()  # the process is SIGKILLed: nobody renews or releases
    killed = time.monotonic()
    wait_until(lambda: isinstance(b.try_acquire(), str), 3, "a dead worker's slot")
    assert time.monotonic() - killed <= 1.0 + 0.3


def test_redis_losing_its_data_does_not_let_the_fleet_overrun(
    limits: tuple[FleetLimit, FleetLimit], clients: tuple[redis.Redis, redis.Redis]
) -> None:
    a, b = limits
    for _ in range(3):
        assert isinstance(a.try_acquire(), str)  # three calls in flight
    clients[0].delete(a.slots_key, a.epoch_key)  # Redis restarted empty
    first = b.try_acquire()
    assert isinstance(first, SlotRefused) and first.starting  # no slot until they are back
    time.sleep(first.wait_ms / 1000 + 0.05)
    refused = b.try_acquire()
    assert isinstance(refused, SlotRefused) and not refused.starting
    assert refused.in_use == 3  # the running calls re-registered their slots


def test_a_settled_namespace_grants_at_once(
    clean: None, clients: tuple[redis.Redis, redis.Redis]
) -> None:
    fresh = FleetLimit(clients[0], NAMESPACE + "-fresh", limit=1, lease_s=1.0)
    try:
        assert isinstance(fresh.try_acquire(), SlotRefused)  # new: waits for the grace
        fresh.client.delete(fresh.epoch_key, fresh.slots_key)
        fresh.mark_settled()
        assert isinstance(fresh.try_acquire(), str)
    finally:
        fresh.stop_renewing()
        fresh.client.delete(fresh.epoch_key, fresh.slots_key)


def test_probes_are_judged_by_the_failure_rate_not_by_one_unlucky_call(
    settings: Settings, clients: tuple[redis.Redis, redis.Redis]
) -> None:
    three = settings.model_copy(update={"breaker_half_open_probes": 3})
    a = FleetBreaker(clients[0], NAMESPACE, three)
    open_it(a)
    time.sleep(1.05)
    assert all(a.admit().probe for _ in range(3))
    assert a.record(FAIL, 10, probe=True) is None  # 1 of 3: under 50 %, keep probing
    assert a.record(OK, 10, probe=True) is None
    assert a.record(OK, 10, probe=True) is BreakerState.CLOSED
    assert "2 of 3 half-open probes succeeded" in a.snapshot().reason
    open_it(a)
    time.sleep(1.05)
    assert all(a.admit().probe for _ in range(3))
    assert a.record(FAIL, 10, probe=True) is None
    assert a.record(FAIL, 10, probe=True) is BreakerState.OPEN  # 2 of 3: at least 50 %
    assert "2 of 3 half-open probes failed" in a.snapshot().reason
