"""Dramatiq over Redis: the broker both producers and workers use.

Messages carry only a charge id (the database holds the rest). Producers
address the charge actor by name, so they never import worker code.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.encoder import JSONEncoder, MessageData
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Middleware, TimeLimit, default_middleware

from payq.constants import ACTOR_NAME, QUEUE_NAME, UNDECODABLE_ACTOR_NAME
from payq.dramatiq_redis import Layout
from payq.errors import ServiceUnavailable
from payq.redis_client import redis_client
from payq.runtime import Part, Runtime, runtime
from payq.settings import Settings

__all__ = [
    "ChargeBroker",
    "SafeJSONEncoder",
    "charge_message",
    "get_broker",
    "make_broker",
    "new_message_id",
    "publish",
    "publish_or_leave_to_relay",
    "queued",
]

log = logging.getLogger(__name__)


class SafeJSONEncoder(JSONEncoder):
    """Dramatiq's JSON encoder, except that an undecodable message is not fatal.

    Dramatiq's Redis consumer decodes a message before it knows how to reject it;
    a decode error restarts the consumer and leaves the message in limbo. Here the
    raw payload is looked up in the queue's hash to find its Redis id, and a message
    for an actor that does not exist is returned instead: the worker then moves it,
    with its raw payload intact, to Dramatiq's dead-letter set and carries on.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def decode(self, data: bytes) -> MessageData:
        try:
            fields: MessageData = super().decode(data)
            if not isinstance(fields, dict) or not {"actor_name", "args"} <= fields.keys():
                raise ValueError("not a Dramatiq message")
            return fields
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:300]
            redis_id = self._find_redis_id(data)
            log.error(
                "undecodable message moved to the dead-letter set: %s",
                reason,
                extra={"redis_message_id": redis_id, "reason": reason},
            )
            return {
                "queue_name": QUEUE_NAME,
                "actor_name": UNDECODABLE_ACTOR_NAME,
                "args": [],
                "kwargs": {},
                "options": {"redis_message_id": redis_id, "payq_undecodable": reason},
                "message_id": str(uuid.uuid4()),
                "message_timestamp": int(time.time() * 1000),
            }

    def _find_redis_id(self, data: bytes) -> str | None:
        layout = Layout(self.namespace)
        for queue in (QUEUE_NAME, layout.delayed(QUEUE_NAME)):
            for field, value in self.client.hscan_iter(layout.messages(queue), count=500):
                if value == data:
                    return field.decode() if isinstance(field, bytes) else str(field)
        return None


class ChargeBroker(RedisBroker):
    """Dramatiq's Redis broker, except that a charge message keeps one Redis id for life.

    Dramatiq gives every enqueue a fresh Redis id, including the move of a delayed
    message to its queue when it falls due. A charge row records the Redis id of its
    last message so the relay can tell a lost message from a queued one; with a fresh
    id at every move, every deferred or retried charge looked lost and was sent again
    (thousands of duplicate messages in a chaos run). Here a charge message's Redis id
    is its message id, on every path. payq itself never re-sends an id: a deferral
    takes a fresh one (``processing._defer`` says why).
    """

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> Any:
        """Send a message; a Redis that does not answer raises Dramatiq's ``ConnectionClosed``.

        Dramatiq's own consumer calls this to move a delayed message that fell due, and
        restarts itself on a broker connection error (dropping the delayed messages it
        holds, which the relay sends again). Any other error there ends its thread for
        good, since its cleanup needs Redis too: that process would move no delayed
        message again (a failover or a Redis restart did this to every worker process).
        """
        try:
            return self._enqueue(message, delay=delay)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ConnectionClosed(exc) from exc  # type: ignore[no-untyped-call]

    def _enqueue(self, message: dramatiq.Message[Any], *, delay: int | None) -> Any:
        if message.actor_name != ACTOR_NAME:
            return super().enqueue(message, delay=delay)
        queue_name = message.queue_name
        message = message.copy(options={"redis_message_id": message.message_id})
        if delay is not None:
            queue_name = Layout.delayed(queue_name)
            eta = int(time.time() * 1000) + delay
            message = message.copy(queue_name=queue_name, options={"eta": eta})
        self.emit_before("enqueue", message, delay)
        self.do_enqueue(queue_name, message.options["redis_message_id"], message.encode())
        self.emit_after("enqueue", message, delay)
        return message


def _middleware() -> list[Middleware]:
    """Dramatiq's default middleware, without its time limit.

    ``TimeLimit`` raises an exception asynchronously in a thread that runs too long: it
    lands wherever that thread is, inside httpx's connection pool, redis-py's reads or
    SQLAlchemy's pool, and leaves a lock held or a call unrecorded (a worker frozen past
    its lease and then thawed wedged every thread this way). payq bounds every step
    itself (``PAYMENT_TIMEOUT_MS`` with its own deadline, ``DB_TIMEOUT_MS``,
    ``DB_STATEMENT_TIMEOUT_MS``, Redis socket timeouts), and the worker's watchdog ends a
    process whose threads stop making progress (``workers.watchdog.Watchdog``).
    """
    return [m() for m in default_middleware if m is not TimeLimit]


def make_broker(settings: Settings) -> RedisBroker:
    return ChargeBroker(  # type: ignore[no-untyped-call]
        client=redis_client(settings), namespace=settings.payq_namespace, middleware=_middleware()
    )


def _installed_broker(rt: Runtime) -> RedisBroker:
    broker = make_broker(rt.settings)
    dramatiq.set_broker(broker)
    dramatiq.set_encoder(SafeJSONEncoder(broker.client, broker.namespace))
    return broker


#: This process's broker (``payq.runtime``), installed as Dramatiq's global broker. A
#: forked child keeps it: redis-py's pool opens new connections in a new process.
BROKER: Part[RedisBroker] = Part("broker", build=_installed_broker)


def get_broker() -> RedisBroker:
    """This process's broker, made once and installed as Dramatiq's global broker."""
    return runtime().get(BROKER)


def charge_message(charge_id: uuid.UUID | str) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=QUEUE_NAME, actor_name=ACTOR_NAME, args=(str(charge_id),), kwargs={}, options={}
    )


def new_message_id() -> str:
    return str(uuid.uuid4())


def publish(
    messages: Iterable[tuple[uuid.UUID | str, str]],
    *,
    delay_ms: int | None = None,
    broker: RedisBroker | None = None,
    front: bool = False,
) -> int:
    """Send one message per ``(charge_id, redis_message_id)``, in one Redis round trip.

    A delayed message goes to the queue's delay set with an ``eta``, as Dramatiq's
    own ``enqueue(delay=...)`` does; ``front`` puts the messages at the head of the
    queue instead of its tail (charges that have waited long enough already). Raises
    ``ServiceUnavailable`` if Redis does not answer (the relay publishes the charges
    later: nothing is lost).
    """
    broker = broker or get_broker()
    pairs = list(messages)
    if not pairs:
        return 0
    layout = Layout(broker.namespace)
    queue = QUEUE_NAME if delay_ms is None else layout.delayed(QUEUE_NAME)
    options: dict[str, Any] = {}
    if delay_ms is not None:
        options["eta"] = int(time.time() * 1000) + max(0, int(delay_ms))
    try:
        with broker.client.pipeline(transaction=True) as pipe:
            for charge_id, redis_id in pairs:
                # message_id = Redis id: the worker can tell the charge's current message
                # (the row keeps its id) from a stale duplicate.
                message = charge_message(charge_id).copy(
                    queue_name=queue,
                    message_id=redis_id,
                    options={**options, "redis_message_id": redis_id},
                )
                broker.emit_before("enqueue", message, delay_ms)
                pipe.hset(layout.messages(queue), redis_id, message.encode())
                push = pipe.lpush if front and delay_ms is None else pipe.rpush
                push(layout.queue(queue), redis_id)
            pipe.execute()
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"Redis did not answer ({type(exc).__name__}); check REDIS_URL (or REDIS_SENTINELS) "
            "and that Redis is running. The charges are saved and the relay will publish them."
        ) from exc
    return len(pairs)


def publish_or_leave_to_relay(
    messages: Iterable[tuple[uuid.UUID | str, str]],
    *,
    delay_ms: int | None = None,
    broker: RedisBroker | None = None,
) -> bool:
    """``publish`` for charges already committed: if Redis does not answer, say so and
    leave them to the relay (it publishes what the database says is due). False then."""
    pairs = list(messages)
    try:
        publish(pairs, delay_ms=delay_ms, broker=broker)
    except ServiceUnavailable as exc:
        log.warning(
            "charges saved but not published; the relay will publish them: %s",
            exc,
            extra={"charges": len(pairs), "charge_ids": [str(c) for c, _ in pairs[:20]]},
        )
        return False
    return True


def queued(
    message_ids: Iterable[str | None],
    *,
    overdue_after_s: float,
    broker: RedisBroker | None = None,
) -> list[bool]:
    """Whether each charge message is still in Redis: ready, delayed or being processed
    (its payload stays until the worker acknowledges it). One round trip.

    A delayed message whose ``eta`` passed more than ``overdue_after_s`` ago does not
    count (both callers pass ``RELAY_STALE_AFTER_S``). A running worker moves a due
    message to the queue within one poll; one still delayed is either waiting for a
    worker to start, or lost in a live worker's memory. Dramatiq's delay-queue consumer
    drops the messages it has fetched when Redis gives it a connection error, and
    leaves them in that worker's ack set, which only a restart of that worker puts
    back. Either way, a fresh message is due, and a stale duplicate costs nothing: the
    claim is guarded.
    """
    broker = broker or get_broker()
    ids = [m or "-" for m in message_ids]
    if not ids:
        return []
    layout = Layout(broker.namespace)
    with broker.client.pipeline(transaction=False) as pipe:
        for message_id in ids:
            pipe.hexists(layout.messages(QUEUE_NAME), message_id)
            pipe.hget(layout.messages(layout.delayed(QUEUE_NAME)), message_id)
        found = pipe.execute()
    cutoff_ms = (time.time() - overdue_after_s) * 1000
    return [
        bool(found[i]) or _delayed_in_time(found[i + 1], cutoff_ms) for i in range(0, len(found), 2)
    ]


def _delayed_in_time(payload: bytes | None, cutoff_ms: float) -> bool:
    """A delayed message exists and falls due after the cutoff."""
    if payload is None:
        return False
    try:
        eta = json.loads(payload)["options"]["eta"]
        return bool(float(eta) >= cutoff_ms)
    except (ValueError, TypeError, KeyError):
        return True  # not ours to judge: leave it be
