"""payq's picture of Dramatiq's Redis layout, pinned against the installed Dramatiq.

Dramatiq's own broker writes the messages here, on real Redis, and payq's ``Layout``
must find each where Dramatiq put it: ready, delayed, fetched by a worker, dead-lettered,
and its heartbeat. An upgrade of Dramatiq that moves any of them fails here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from payq.dramatiq_redis import Layout
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    namespace = f"pin-{uuid.uuid4().hex[:8]}"
    made = RedisBroker(url=REDIS_URL, namespace=namespace)
    yield made
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*"))
    if keys:
        client.delete(*keys)
    client.close()
    made.close()


def test_the_layout_is_where_dramatiqs_own_broker_puts_things(broker: RedisBroker) -> None:
    layout, client = Layout(broker.namespace), broker.client
    message = dramatiq.Message(
        queue_name="pinned", actor_name="nobody", args=(), kwargs={}, options={}
    )
    ready = broker.enqueue(message)
    rid = ready.options["redis_message_id"]
    assert client.lindex(layout.queue("pinned"), 0).decode() == rid
    assert client.hexists(layout.messages("pinned"), rid)

    later = broker.enqueue(message.copy(message_id=str(uuid.uuid4())), delay=60_000)
    assert later.queue_name == layout.delayed("pinned") == "pinned.DQ"
    later_id = later.options["redis_message_id"]
    assert client.hexists(layout.messages(layout.delayed("pinned")), later_id)

    consumer = broker.consume("pinned", prefetch=1, timeout=100)
    fetched = next(iter(consumer))
    assert fetched is not None and fetched.options["redis_message_id"] == rid
    worker_id = broker.broker_id
    assert client.sismember(layout.acks(worker_id, "pinned"), rid)  # fetched, not acked
    assert client.zscore(layout.heartbeats, worker_id) is not None
    consumer.nack(fetched)  # dead-lettered
    assert client.zscore(layout.dead("pinned"), rid) is not None
    assert client.hexists(layout.dead_messages("pinned"), rid)
    consumer.close()


def test_the_script_it_comes_from_still_says_so() -> None:
    """The layout as Dramatiq's dispatch script documents it, word for word."""
    script = (Path(dramatiq.__file__).parent / "brokers" / "redis" / "dispatch.lua").read_text()
    for documented in (
        "$namespace:__acks__.$worker_id.$queue_name",
        "$namespace:__heartbeats__",
        "$namespace:$queue_name.msgs",
        "$namespace:$queue_name.XQ",
        "$namespace:$queue_name.XQ.msgs",
    ):
        assert documented in script, documented
    assert dramatiq.__version__.startswith("2."), "a new Dramatiq: check payq.dramatiq_redis"


def test_a_charge_broker_that_cannot_reach_redis_raises_dramatiqs_connection_error() -> None:
    """What Dramatiq's delay-queue consumer restarts on: any other error ends its thread."""
    from dramatiq.errors import ConnectionClosed

    from devservices import free_port
    from payq.broker import charge_message, make_broker
    from payq.settings import load_settings

    broker = make_broker(load_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    for delay in (None, 10):
        with pytest.raises(ConnectionClosed):
            broker.enqueue(charge_message(uuid.uuid4()), delay=delay)
    broker.close()
