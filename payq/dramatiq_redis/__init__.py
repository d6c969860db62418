"""Dramatiq's Redis broker as payq reads and writes it: every key and structure, here only.

payq publishes charge messages itself (one pipelined round trip per batch), tells a
queued message from a lost one, puts back what a dead worker had fetched, drains the
dead-letter set and counts the queues; each needs Dramatiq's private layout. Dramatiq 2.2
keeps, in namespace ``ns``, for queue ``q`` (its ``brokers/redis/dispatch.lua``):

- ``ns:q``: a list of ready message ids; ``ns:q.msgs``: a hash, message id → payload;
- ``ns:q.DQ`` and ``ns:q.DQ.msgs``: the same for delayed messages (due at the payload's
  ``options.eta``), moved to ``ns:q`` by a worker when due;
- ``ns:q.XQ`` (a sorted set, id by dead-letter time) and ``ns:q.XQ.msgs``: dead letters,
  delayed ones included under the queue's own name;
- ``ns:__heartbeats__``: a sorted set, worker id by its last command's time (ms);
- ``ns:__acks__.<worker id>.<queue>``: a set of ids a worker fetched and has not acked.

The two scripts that move messages between these are in ``lua/``.
``tests/test_dramatiq_redis.py`` pins all of it against the installed Dramatiq: an upgrade
that changes it fails there, and this package is the one place to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import redis
from dramatiq.common import dq_name

from payq.redis_scripts import KEY, ScriptArgs, Scripts

__all__ = ["Layout", "RequeueAcks", "RequeueDead", "dramatiq_scripts", "requeue_worker"]


@dataclass(frozen=True, slots=True)
class Layout:
    """The keys of Dramatiq's Redis broker in one namespace."""

    namespace: str

    def queue(self, name: str) -> str:
        """The list of ready message ids of queue ``name`` (or of a delay queue's name)."""
        return f"{self.namespace}:{name}"

    def messages(self, name: str) -> str:
        """The hash of the payloads of queue ``name``'s messages, by id."""
        return f"{self.queue(name)}.msgs"

    @staticmethod
    def delayed(name: str) -> str:
        """The name of queue ``name``'s delay queue."""
        return dq_name(name)

    def dead(self, name: str) -> str:
        """The sorted set of queue ``name``'s dead-lettered ids, by dead-letter time (ms)."""
        return f"{self.queue(name)}.XQ"

    def dead_messages(self, name: str) -> str:
        """The payloads of queue ``name``'s dead letters, by id."""
        return f"{self.dead(name)}.msgs"

    @property
    def heartbeats(self) -> str:
        """The sorted set of worker ids by the time of their last command (ms)."""
        return f"{self.namespace}:__heartbeats__"

    def acks_prefix(self, worker_id: str) -> str:
        """What every ack set of one worker starts with (the queue's name follows)."""
        return f"{self.namespace}:__acks__.{worker_id}."

    def acks(self, worker_id: str, name: str) -> str:
        """The set of ids worker ``worker_id`` fetched from queue ``name``, not yet acked."""
        return self.acks_prefix(worker_id) + name


class _DramatiqScript(ScriptArgs):
    package: ClassVar[str] = "payq.dramatiq_redis"


@dataclass(frozen=True, slots=True)
class RequeueAcks(_DramatiqScript):
    """A dead worker's fetched, unacknowledged messages of one queue, back on it."""

    script: ClassVar[str] = "requeue_acks"

    acks: str = field(metadata=KEY)
    queue: str = field(metadata=KEY)
    messages: str = field(metadata=KEY)

    @classmethod
    def of(cls, layout: Layout, acks: str, queue: str) -> RequeueAcks:
        return cls(acks=acks, queue=layout.queue(queue), messages=layout.messages(queue))


@dataclass(frozen=True, slots=True)
class RequeueDead(_DramatiqScript):
    """One dead letter of a queue moved back onto it."""

    script: ClassVar[str] = "requeue_dead"

    dead: str = field(metadata=KEY)
    dead_messages: str = field(metadata=KEY)
    queue: str = field(metadata=KEY)
    messages: str = field(metadata=KEY)
    message_id: str

    @classmethod
    def of(cls, layout: Layout, queue: str, message_id: str) -> RequeueDead:
        return cls(
            dead=layout.dead(queue),
            dead_messages=layout.dead_messages(queue),
            queue=layout.queue(queue),
            messages=layout.messages(queue),
            message_id=message_id,
        )


def dramatiq_scripts(client: redis.Redis) -> Scripts:
    """The scripts that move Dramatiq's messages, registered on this client."""
    return Scripts(client, (RequeueAcks, RequeueDead))


def requeue_worker(client: redis.Redis, namespace: str, worker_id: str) -> int:
    """Put back on their queues the messages worker ``worker_id`` had fetched and not
    acknowledged, and forget its heartbeat; return how many."""
    layout, scripts = Layout(namespace), dramatiq_scripts(client)
    prefix = layout.acks_prefix(worker_id)
    moved = 0
    for raw_key in client.scan_iter(match=f"{prefix}*", count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        moved += int(scripts.run(RequeueAcks.of(layout, key, key[len(prefix) :])))
    client.zrem(layout.heartbeats, worker_id)
    return moved
