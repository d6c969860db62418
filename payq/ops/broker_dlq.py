"""Dramatiq's own dead-letter set: messages that never became a charge's outcome.

These are messages that could not be processed at all (undecodable, naming no
charge, or failing past Dramatiq's retries while the database was down). Dramatiq
has no API to list or requeue them and deletes them after 7 days; here operators
can list, requeue and drop them (``payq dlq broker ...``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dramatiq.brokers.redis import RedisBroker

from payq.broker import get_broker
from payq.constants import QUEUE_NAME
from payq.dramatiq_redis import Layout, RequeueDead, dramatiq_scripts

__all__ = ["BrokerDeadLetter", "drop", "list_dead_letters", "requeue"]


@dataclass(frozen=True)
class BrokerDeadLetter:
    redis_id: str
    dead_at: dt.datetime
    actor: str | None
    args: list[Any] | None
    problem: str | None  # why it could not be processed, when known
    raw: str  # the payload, cut to 300 characters

    @property
    def decodable(self) -> bool:
        return self.actor is not None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "dead_at": self.dead_at.isoformat()}


def _keys(broker: RedisBroker) -> tuple[str, str]:
    layout = Layout(broker.namespace)
    return layout.dead(QUEUE_NAME), layout.dead_messages(QUEUE_NAME)


def list_dead_letters(broker: RedisBroker | None = None) -> list[BrokerDeadLetter]:
    broker = broker or get_broker()
    xq, xq_msgs = _keys(broker)
    entries: list[tuple[bytes, float]] = list(broker.client.zrange(xq, 0, -1, withscores=True))  # type: ignore[arg-type]
    payloads = broker.client.hmget(xq_msgs, [rid for rid, _ in entries]) if entries else []
    out = []
    for (rid, score), payload in zip(entries, payloads, strict=True):
        raw = (payload or b"").decode("utf-8", "replace")
        actor: str | None = None
        args: list[Any] | None = None
        problem: str | None = None
        try:
            data = json.loads(raw)
            actor, args = data["actor_name"], list(data["args"])
            problem = data.get("options", {}).get("payq_undecodable")
        except (ValueError, KeyError, TypeError):
            problem = "undecodable payload"
        out.append(
            BrokerDeadLetter(
                redis_id=rid.decode() if isinstance(rid, bytes) else str(rid),
                dead_at=dt.datetime.fromtimestamp(score / 1000, dt.UTC),
                actor=actor,
                args=args,
                problem=problem,
                raw=raw[:300],
            )
        )
    return out


def requeue(ids: Sequence[str], broker: RedisBroker | None = None) -> list[str]:
    """Put these dead letters back on the charge queue; return the ids moved."""
    broker = broker or get_broker()
    scripts, layout = dramatiq_scripts(broker.client), Layout(broker.namespace)
    return [rid for rid in ids if scripts.run(RequeueDead.of(layout, QUEUE_NAME, rid))]


def drop(ids: Sequence[str], broker: RedisBroker | None = None) -> list[str]:
    """Delete these dead letters for good; return the ids dropped."""
    broker = broker or get_broker()
    xq, xq_msgs = _keys(broker)
    dropped = []
    for rid in ids:
        with broker.client.pipeline(transaction=True) as pipe:
            pipe.zrem(xq, rid)
            pipe.hdel(xq_msgs, rid)
            removed, _ = pipe.execute()
        if removed:
            dropped.append(rid)
    return dropped
