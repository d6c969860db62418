"""Names defined once: queue and actor names, Redis key prefixes, charge states."""

from enum import StrEnum

__all__ = [
    "ACTOR_NAME",
    "FINAL_STATUSES",
    "QUEUE_NAME",
    "UNDECODABLE_ACTOR_NAME",
    "ChargeStatus",
    "redis_key",
]

#: The Dramatiq queue charges travel on. Producers send to it by name.
QUEUE_NAME = "charges"
#: The actor that processes one charge; producers address it by this name only.
ACTOR_NAME = "process_charge"
#: Messages that cannot be decoded are addressed to this (never registered) actor
#: so that Dramatiq moves them to its dead-letter set instead of losing them.
UNDECODABLE_ACTOR_NAME = "payq_undecodable_message"


class ChargeStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


FINAL_STATUSES = frozenset({ChargeStatus.SUCCEEDED, ChargeStatus.FAILED, ChargeStatus.DEAD})


def redis_key(namespace: str, *parts: str) -> str:
    """payq's own Redis keys live beside Dramatiq's, under ``<namespace>:payq:``."""
    return ":".join((namespace, "payq", *parts))


#: The start of payq's Lua scripts: ``now`` in milliseconds by the Redis server's clock,
#: so that hosts whose clocks differ agree on leases and on when a breaker may half-open.
LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
