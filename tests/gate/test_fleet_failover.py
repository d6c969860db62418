"""The fleet limit across a real Sentinel failover whose promoted replica lacks the last
slots granted: they are put back before any slot is granted again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devservices import free_port
from devservices.sentinel import ThrowawaySentinels
from payq.constants import DeferralCause
from payq.gate import Pass, ProviderGate, Wait
from payq.redis_client import redis_client
from payq.settings import load_settings
from tests.conftest import NAMESPACE
from tests.helpers import passed, wait_until

MASTER = "payq-gate"


@pytest.fixture
def two() -> Iterator[tuple[ProviderGate, ProviderGate, ThrowawaySentinels]]:
    """Two processes' gates, both through Sentinel, and the setup they share."""
    with ThrowawaySentinels(MASTER) as setup:
        settings = load_settings(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            redis_sentinels=setup.sentinel_list,
            redis_sentinel_master=MASTER,
            payq_namespace=NAMESPACE,
            payment_max_concurrency=3,
            fleet_slot_lease_s=3,
        )
        clients = [redis_client(settings, socket_timeout_s=1, connect_timeout_s=1) for _ in "ab"]
        gates = [ProviderGate(client, settings) for client in clients]
        try:
            yield gates[0], gates[1], setup
        finally:
            for gate, client in zip(gates, clients, strict=True):
                gate.stop_keeping()
                gate.fleet.stop_renewing()
                client.close()


def test_slots_the_promoted_replica_lacks_are_put_back_before_any_is_granted(
    two: tuple[ProviderGate, ProviderGate, ThrowawaySentinels], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, setup = two
    a.fleet.mark_settled()
    assert a.fleet.client.wait(1, 2000) == 1  # the replica has the epoch
    setup.freeze_replicas()
    held = [passed(a.enter()) for _ in range(3)]  # three calls in flight...
    # ... granted by the primary alone: it dies before its replica hears of them.
    old = setup.kill_primary()
    setup.thaw_replicas()
    setup.wait_for_promotion(old)

    answers: list[Pass | Wait] = []

    def answered() -> bool:
        answers.append(b.enter())
        last = answers[-1]
        return not (isinstance(last, Wait) and last.cause is DeferralCause.REDIS)

    def none_granted() -> None:
        granted = [answer for answer in answers if isinstance(answer, Pass)]
        assert not granted, f"process b was granted a slot of a's three: {answers}"

    wait_until(answered, 15, "process b to reach the promoted replica")
    none_granted()
    answered_at = time.monotonic()
    wait_until(lambda: b.fleet.in_use() == 3, 5, "process a to put its three slots back")
    while time.monotonic() < answered_at + 2 * b.fleet.grace_ms / 1000:
        answers.append(b.enter())
    none_granted()
    assert answers[-1].cause is DeferralCause.FLEET_FULL  # type: ignore[union-attr]
    assert all(a.fleet.holds(h.token) for h in held)
    client = b.fleet.client
    _, began_by = client.get(b.fleet.epoch_key).split()  # type: ignore[union-attr]
    assert began_by.decode() == client.info("server")["run_id"]  # a fresh epoch
    restored = [r for r in caplog.records if "put back after Redis lost them" in r.message]
    assert restored and restored[0].restored == 3  # type: ignore[attr-defined]
