"""The fleet's concurrency slots, against real Redis, through the gate."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from payq.constants import DeferralCause
from payq.gate import Pass, ProviderGate, Wait
from payq.settings import Settings, load_settings
from tests.conftest import NAMESPACE
from tests.helpers import SUCCEEDED, passed, wait_until

Gates = Callable[[Settings], ProviderGate]


@pytest.fixture
def settings() -> Settings:
    # The shortest lease settings allow: a slot's lease covers a whole call (slot_lease_s).
    return load_settings(
        payq_namespace=NAMESPACE,
        payment_max_concurrency=3,
        fleet_slot_lease_s=1,
        payment_timeout_ms=100,
        payment_connect_timeout_ms=100,
    )


@pytest.fixture
def two(gates: Gates, settings: Settings) -> tuple[ProviderGate, ProviderGate]:
    return gates(settings), gates(settings)


def refused(entry: Pass | Wait, cause: DeferralCause) -> bool:
    return isinstance(entry, Wait) and entry.cause is cause


def test_slots_are_shared_by_the_fleet(two: tuple[ProviderGate, ProviderGate]) -> None:
    a, b = two
    held = [passed(a.enter()), passed(b.enter()), passed(a.enter())]
    full = b.enter()
    assert refused(full, DeferralCause.FLEET_FULL)
    assert "all 3 fleet slots (PAYMENT_MAX_CONCURRENCY)" in full.detail  # type: ignore[union-attr]
    a.leave(held[0], SUCCEEDED, 10)
    assert refused(b.enter(), DeferralCause.FLEET_FULL)  # process a keeps it for its next call
    assert a.enter().token == held[0].token  # type: ignore[union-attr]
    a.leave(held[0], SUCCEEDED, 10)
    a.flush()  # a worker shutting down gives its kept slots back
    assert isinstance(b.enter(), Pass)
    assert a.fleet.in_use() == 3


def test_a_kept_slot_no_call_takes_goes_back_to_the_fleet(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    held = [passed(a.enter()) for _ in range(3)]
    a.leave(held[0], SUCCEEDED, 10)
    wait_until(lambda: isinstance(b.enter(), Pass), 2, "a kept slot given back")


def test_a_running_call_keeps_its_slot_past_the_lease(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    for _ in range(3):
        passed(a.enter())
    time.sleep(2.5)  # two and a half leases: the renewer kept them
    assert refused(b.enter(), DeferralCause.FLEET_FULL)
    assert b.fleet.in_use() == 3


def test_a_dead_workers_slot_comes_back_within_a_lease(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    for _ in range(3):
        passed(a.enter())
    a.fleet.stop_renewing()  # the process is SIGKILLed: nobody renews or releases
    killed = time.monotonic()
    lease_s = a.fleet.lease_ms / 1000  # slot_lease_s: 3.3 s here
    wait_until(lambda: isinstance(b.enter(), Pass), lease_s + 2, "a dead worker's slot")
    assert time.monotonic() - killed <= lease_s + 0.3


def test_redis_losing_its_data_does_not_let_the_fleet_overrun(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    for _ in range(3):
        passed(a.enter())  # three calls in flight
    a.fleet.client.delete(a.fleet.slots_key, a.fleet.epoch_key)  # Redis restarted empty
    first = b.enter()
    assert refused(first, DeferralCause.FLEET_STARTING)  # no slot until they are back
    time.sleep(b.fleet.grace_ms / 1000 + 0.05)
    assert refused(b.enter(), DeferralCause.FLEET_FULL)
    assert b.fleet.in_use() == 3  # the running calls re-registered their slots


def test_a_promoted_replica_counts_as_a_redis_that_lost_slots(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    """A failover's promoted replica holds the old primary's epoch marker, but may lack
    the last slots granted: a marker another Redis server process wrote begins a fresh
    epoch, as a missing one does, and the running calls put their slots back first."""
    a, b = two
    for _ in range(3):
        passed(a.enter())
    client = a.fleet.client
    _, other = client.get(a.fleet.epoch_key).split()  # type: ignore[union-attr]
    assert other.decode() == client.info("server")["run_id"]
    client.set(a.fleet.epoch_key, f"0 {'ab' * 20}")  # replicated from another primary
    client.zpopmax(a.fleet.slots_key)  # whose last grant never reached the replica
    assert refused(b.enter(), DeferralCause.FLEET_STARTING)
    time.sleep(b.fleet.grace_ms / 1000 + 0.05)
    assert refused(b.enter(), DeferralCause.FLEET_FULL)
    assert b.fleet.in_use() == 3


def test_a_settled_namespace_grants_at_once(gates: Gates, settings: Settings) -> None:
    fresh = gates(settings.model_copy(update={"payq_namespace": NAMESPACE + "-fresh"}))
    client: redis.Redis = fresh.fleet.client
    try:
        assert refused(fresh.enter(), DeferralCause.FLEET_STARTING)  # new: waits for the grace
        client.delete(fresh.fleet.epoch_key, fresh.fleet.slots_key)
        fresh.fleet.mark_settled()
        assert isinstance(fresh.enter(), Pass)
    finally:
        fresh.fleet.stop_renewing()
        client.delete(fresh.fleet.epoch_key, fresh.fleet.slots_key)
