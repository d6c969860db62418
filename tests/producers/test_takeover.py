"""A dead worker process's charges are taken over at once; nobody else's, and never on
silence that proves nothing (a holder never heard of, a gap in what Redis heard)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import text

from payq.db import transaction
from payq.liveness import Heartbeat, known_dead
from payq.settings import Settings, load_settings
from producers import enqueue_charge
from producers.relay import relay_once
from tests.conftest import NAMESPACE, REDIS_URL
from tests.helpers import charge

pytestmark = pytest.mark.usefixtures("clean")

# Fast beats, so that a death is proven in well under a second.
FAST = {"worker_heartbeat_s": 0.1, "takeover_after_s": 0.5, "charge_lease_s": 30}


def settings(**overrides: object) -> Settings:
    return load_settings(payq_namespace=NAMESPACE, **{**FAST, **overrides})


_CLIENTS: list[redis.Redis] = []


def client() -> redis.Redis:
    _CLIENTS.append(redis.Redis.from_url(REDIS_URL))
    return _CLIENTS[-1]


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def held_by(holder: str | None, key: str) -> uuid.UUID:
    """A charge claimed by ``holder`` just now: its lease runs 30 s more."""
    c = enqueue_charge(100, "usd", "tok_visa", key)
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'processing', attempts = 1, holder = :holder, "
                "lease_expires_at = now() + interval '30 s' WHERE id = :id"
            ),
            {"holder": holder, "id": c.id},
        )
    return c.id


def test_a_silent_holder_is_dead_a_beating_one_and_a_stranger_are_not() -> None:
    s = settings()
    witness = Heartbeat(client(), NAMESPACE, s, witness=True)
    alive, dying = Heartbeat(client(), NAMESPACE, s), Heartbeat(client(), NAMESPACE, s)
    for beating in (witness, alive, dying):
        beating.start()
    try:
        time.sleep(0.3)
        dying.stop(wait_s=2)
        holders = [alive.holder, dying.holder, "elsewhere:1:00000000"]
        assert known_dead(client(), NAMESPACE, holders, s) == []  # too soon
        time.sleep(0.8)
        assert known_dead(client(), NAMESPACE, holders, s) == [dying.holder]
    finally:
        witness.stop(wait_s=2)
        alive.stop(wait_s=2)


def test_silence_across_a_gap_in_what_redis_heard_proves_nothing() -> None:
    """Redis down or cut off from everyone: nobody beats, then all at once again. Those
    silent since before the gap are not dead on that; their leases decide."""
    s = settings()
    dying = Heartbeat(client(), NAMESPACE, s)
    dying.beat()
    time.sleep(0.8)  # nobody beats: a gap (over two heartbeats)
    witness = Heartbeat(client(), NAMESPACE, s, witness=True)
    witness.start()
    try:
        time.sleep(0.8)
        assert known_dead(client(), NAMESPACE, [dying.holder], s) == []
    finally:
        witness.stop(wait_s=2)


def test_the_relay_takes_over_a_dead_holders_charges_at_once_and_only_those() -> None:
    s = settings()
    witness = Heartbeat(client(), NAMESPACE, s, witness=True)
    alive, dead = Heartbeat(client(), NAMESPACE, s), Heartbeat(client(), NAMESPACE, s)
    for beating in (witness, alive):
        beating.start()
    dead.beat()  # it beat once, then died
    try:
        dead_ids = [held_by(dead.holder, f"takeover-dead-{i}") for i in range(2)]
        alive_id = held_by(alive.holder, "takeover-alive")
        unknown_id = held_by("never-beat:1:00000000", "takeover-unknown")
        unnamed_id = held_by(None, "takeover-unnamed")
        time.sleep(0.8)
        result = relay_once(s)
        assert (result.taken_over, result.lease_expired) == (2, 2)
        for cid in dead_ids:
            assert charge(cid).lease_expires_at is not None
            assert charge(cid).published_at is not None  # sent again in the same pass
        still_held = [alive_id, unknown_id, unnamed_id]
        with transaction() as conn:
            over = conn.execute(
                text("SELECT id, lease_expires_at < now() AS over FROM charges")
            ).all()
        assert {r.id for r in over if r.over} == set(dead_ids)
        assert not any(r.over for r in over if r.id in still_held)
        assert relay_once(s).taken_over == 0  # once
    finally:
        witness.stop(wait_s=2)
        alive.stop(wait_s=2)


def test_off_the_lease_alone_decides() -> None:
    s = settings(takeover_after_s=0)
    witness = Heartbeat(client(), NAMESPACE, s, witness=True)
    witness.start()
    dead = Heartbeat(client(), NAMESPACE, s)
    dead.beat()
    try:
        held_by(dead.holder, "takeover-off")
        time.sleep(0.8)
        assert relay_once(s).lease_expired == 0
    finally:
        witness.stop(wait_s=2)


def test_a_claim_names_its_process_only_while_it_beats() -> None:
    from payq import liveness

    s = settings()
    assert liveness.holder() is None  # never beat: no claim names it
    beating = Heartbeat(client(), NAMESPACE, s)
    beating.start()
    try:
        time.sleep(0.2)
        assert liveness.holder() == beating.holder
    finally:
        beating.stop(wait_s=2)
    assert liveness.holder() is None


def test_after_a_takeover_the_dead_call_still_bounds_what_a_lookup_proves() -> None:
    """The takeover ends the lease, not the dead process's call: that call may still reach
    the provider until its claim plus the lease, and until then a lookup that finds no
    charge proves nothing (``ledger.pending_calls_s``)."""
    from payq import ledger

    s = settings()
    witness = Heartbeat(client(), NAMESPACE, s, witness=True)
    witness.start()
    dead = Heartbeat(client(), NAMESPACE, s)
    dead.beat()
    try:
        cid = held_by(dead.holder, "takeover-bound")
        with transaction() as conn:
            conn.execute(
                text(
                    "INSERT INTO charge_attempts (charge_id, number, call_id, kind, started_at, "
                    "outcome) VALUES (:id, 1, gen_random_uuid(), 'charge', now(), 'in_flight')"
                ),
                {"id": cid},
            )
        time.sleep(0.8)
        assert relay_once(s).taken_over == 1
        with transaction() as conn:
            left_s = ledger.pending_calls_s(conn, cid, s.charge_lease_s)
        assert s.charge_lease_s - 3 < left_s <= s.charge_lease_s
    finally:
        witness.stop(wait_s=2)


def test_what_a_dead_process_had_fetched_goes_back_on_the_queue_at_once() -> None:
    """Dramatiq's own heartbeat is still fresh (a kill leaves it so for
    ``RELAY_DEAD_WORKER_S``); the proven death is enough, once."""
    s = settings()
    c = enqueue_charge(100, "usd", "tok_visa", "takeover-fetched")
    r, ns = client(), NAMESPACE
    r.lrem(f"{ns}:charges", 0, c.message_id)  # fetched: off the list, into an ack set
    r.zadd(f"{ns}:__heartbeats__", {"dead-worker": int(time.time() * 1000)})
    r.sadd(f"{ns}:__acks__.dead-worker.charges", c.message_id)
    witness = Heartbeat(client(), NAMESPACE, s, witness=True)
    witness.start()
    dead = Heartbeat(client(), NAMESPACE, s, alias="dead-worker")
    alive = Heartbeat(client(), NAMESPACE, s, alias="live-worker")
    alive.start()
    dead.beat()
    try:
        assert relay_once(s).recovered == 0  # not yet proven
        time.sleep(0.8)
        assert relay_once(s).recovered == 1
        assert r.lrange(f"{ns}:charges", 0, -1) == [c.message_id.encode()]  # type: ignore[union-attr]
        assert not r.exists(f"{ns}:__acks__.dead-worker.charges")
        assert relay_once(s).recovered == 0  # once
    finally:
        witness.stop(wait_s=2)
        alive.stop(wait_s=2)
        r.close()
