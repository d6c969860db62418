"""The relay against real PostgreSQL and Redis: it publishes what is lost, and only that."""

from __future__ import annotations

import json
import threading

import pytest
import redis
from sqlalchemy import text

from payq.db import transaction
from producers import enqueue_charge
from producers.relay import relay_once
from tests.conftest import NAMESPACE, REDIS_URL
from tests.helpers import charge

pytestmark = pytest.mark.usefixtures("clean")


def client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def queued(queue: str = "charges") -> list[str]:
    r = client()
    try:
        return [json.loads(p)["args"][0] for p in r.hvals(f"{NAMESPACE}:{queue}.msgs")]
    finally:
        r.close()


def age(seconds: int) -> None:
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET created_at = created_at - make_interval(secs => :s), "
                "published_at = published_at - make_interval(secs => :s), "
                "next_attempt_at = next_attempt_at - make_interval(secs => :s)"
            ),
            {"s": seconds},
        )


def test_a_queued_charge_is_left_alone() -> None:
    c = enqueue_charge(100, "usd", "tok_visa", "relay-1")
    age(60)
    result = relay_once()
    assert (result.checked, result.republished) == (1, 0)
    assert queued() == [str(c.id)]


def test_a_charge_whose_message_was_lost_is_published_again() -> None:
    c = enqueue_charge(100, "usd", "tok_visa", "relay-2")
    r = client()
    r.delete(f"{NAMESPACE}:charges", f"{NAMESPACE}:charges.msgs")  # Redis lost it
    r.close()
    assert relay_once().republished == 0  # too recent: the producer may still publish
    age(60)
    assert relay_once().republished == 1
    assert queued() == [str(c.id)]
    assert charge(c.id).message_id != c.message_id
    assert relay_once().checked == 0  # stamped: not looked at again at once


def test_an_expired_lease_is_published_at_once_and_again_if_that_is_lost() -> None:
    c = enqueue_charge(100, "usd", "tok_visa", "relay-3")
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'processing', attempts = 1, "
                "lease_expires_at = now() - interval '1 s'"
            )
        )
    first, second = relay_once(), relay_once()
    assert (first.lease_expired, second.lease_expired) == (1, 0)
    assert queued().count(str(c.id)) == 2  # the original delivery and the takeover
    age(60)  # nobody took it over: the takeover message is presumed lost
    assert relay_once().lease_expired == 1


def test_an_overdue_retry_whose_delayed_message_was_lost_is_published() -> None:
    c = enqueue_charge(100, "usd", "tok_visa", "relay-4")
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'retrying', next_attempt_at = now(), "
                "message_id = 'lost', published_at = now()"
            )
        )
    assert relay_once().republished == 0  # not overdue long enough yet
    age(60)
    assert relay_once().republished == 1
    assert str(c.id) in queued()


def test_final_charges_are_never_published() -> None:
    enqueue_charge(100, "usd", "tok_visa", "relay-5")
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET status = 'succeeded'"))
    age(3600)
    assert relay_once().checked == 0


def test_relays_running_side_by_side_publish_each_charge_once() -> None:
    from producers import enqueue_charges

    made = enqueue_charges(
        [
            {"amount": 1, "currency": "usd", "source": "tok_visa", "idempotency_key": f"p-{i}"}
            for i in range(300)
        ]
    )
    r = client()
    r.delete(f"{NAMESPACE}:charges", f"{NAMESPACE}:charges.msgs")
    r.close()
    age(60)
    results = []
    threads = [threading.Thread(target=lambda: results.append(relay_once())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(x.republished for x in results) == 300
    assert sorted(queued()) == sorted(str(c.id) for c in made)


def test_messages_held_by_a_dead_worker_go_back_on_the_queue() -> None:
    import time

    from payq.settings import get_settings

    c = enqueue_charge(100, "usd", "tok_visa", "relay-dead-worker")
    r = client()
    ns = NAMESPACE
    r.lrem(f"{ns}:charges", 0, c.message_id)  # fetched: off the list, into an ack set
    now_ms = int(time.time() * 1000)
    stale_ms = now_ms - int(get_settings().relay_dead_worker_s * 1000) - 1000
    r.zadd(f"{ns}:__heartbeats__", {"dead-worker": stale_ms, "live-worker": now_ms})
    r.sadd(f"{ns}:__acks__.dead-worker.charges", c.message_id)
    r.sadd(f"{ns}:__acks__.live-worker.charges", "busy-message")
    r.hset(f"{ns}:charges.msgs", "busy-message", b"{}")

    assert relay_once().recovered == 1
    assert r.lrange(f"{ns}:charges", 0, -1) == [c.message_id.encode()]  # type: ignore[union-attr]
    assert not r.exists(f"{ns}:__acks__.dead-worker.charges")
    assert r.smembers(f"{ns}:__acks__.live-worker.charges") == {b"busy-message"}
    assert r.zscore(f"{ns}:__heartbeats__", "dead-worker") is None
    r.close()


def test_a_deferred_message_that_falls_due_is_still_seen_as_queued() -> None:
    import dramatiq

    from payq.broker import get_broker, publish

    c = enqueue_charge(100, "usd", "tok_visa", "relay-due")
    r = client()
    r.delete(f"{NAMESPACE}:charges", f"{NAMESPACE}:charges.msgs")  # consumed and deferred:
    publish([(c.id, c.message_id)], delay_ms=0)  # the worker's deferral, same id
    raw = r.hget(f"{NAMESPACE}:charges.DQ.msgs", c.message_id)
    # What Dramatiq's worker does when the eta has passed (worker.py, delayed messages):
    due = dramatiq.Message.decode(raw).copy(queue_name="charges")
    del due.options["eta"]
    get_broker().enqueue(due)
    r.hdel(f"{NAMESPACE}:charges.DQ.msgs", c.message_id)  # and the delayed copy is acked
    assert r.lindex(f"{NAMESPACE}:charges", 0).decode() == c.message_id  # same Redis id
    r.close()
    age(60)
    assert relay_once().republished == 0  # not mistaken for a lost message
    assert queued() == [str(c.id)]


def _deferred(key: str, due_in_s: int) -> tuple[str, str]:
    """A charge whose only message is a delayed one that a worker has fetched (it sits in
    that live worker's ack set), as a deferral leaves it: (charge id, message id)."""
    import time

    from payq.broker import new_message_id, publish

    c = enqueue_charge(100, "usd", "tok_visa", key)
    r = client()
    r.delete(f"{NAMESPACE}:charges", f"{NAMESPACE}:charges.msgs")  # consumed, then deferred
    message_id = new_message_id()
    publish([(c.id, message_id)], delay_ms=0)
    payload = json.loads(r.hget(f"{NAMESPACE}:charges.DQ.msgs", message_id))  # type: ignore[arg-type]
    payload["options"]["eta"] = int((time.time() + due_in_s) * 1000)
    r.hset(f"{NAMESPACE}:charges.DQ.msgs", message_id, json.dumps(payload))
    r.lrem(f"{NAMESPACE}:charges.DQ", 0, message_id)  # fetched by a live worker
    r.sadd(f"{NAMESPACE}:__acks__.live-worker.charges.DQ", message_id)
    r.zadd(f"{NAMESPACE}:__heartbeats__", {"live-worker": 10**13})  # alive for good
    r.close()
    with transaction() as conn:
        conn.execute(
            text("UPDATE charges SET message_id = :m WHERE id = :c"), {"m": message_id, "c": c.id}
        )
    age(60)
    return str(c.id), message_id


def test_a_delayed_message_long_overdue_is_replaced() -> None:
    # Dramatiq's delay-queue consumer drops what it fetched on a Redis connection error
    # and leaves it in the ack set of a worker that is still alive: nothing moves it.
    charge_id, stuck = _deferred("relay-overdue", due_in_s=-60)
    assert relay_once().republished == 1
    assert queued() == [charge_id]  # a fresh message on the queue itself
    assert charge(charge_id).message_id != stuck


def test_a_delayed_message_not_yet_overdue_is_left_alone() -> None:
    charge_id, _ = _deferred("relay-not-overdue", due_in_s=5)
    assert relay_once().republished == 0
    assert queued() == []
    assert queued("charges.DQ") == [charge_id]


def test_a_takeover_goes_to_the_head_of_the_queue() -> None:
    waiting = [enqueue_charge(100, "usd", "tok_visa", f"relay-q{i}") for i in range(3)]
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'processing', attempts = 1, "
                "lease_expires_at = now() - interval '1 s' WHERE id = :id"
            ),
            {"id": waiting[1].id},
        )
    assert relay_once().lease_expired == 1
    r = client()
    head = r.lindex(f"{NAMESPACE}:charges", 0).decode()
    r.close()
    assert head == charge(waiting[1].id).message_id  # not behind the whole backlog
