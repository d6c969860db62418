"""The Redis client from the settings: the one way every payq process reaches Redis.

With ``REDIS_SENTINELS`` unset, ``REDIS_URL`` names the server. Set, the primary's
address comes from Redis Sentinel (redis-py's ``redis.sentinel``): the client asks the
sentinels for the primary of ``REDIS_SENTINEL_MASTER`` before each new connection, drops
its pooled connections when the answer changes, and treats a ``READONLY`` reply (a
demoted primary) as a lost connection, so a failover reads as a short Redis outage,
which every caller already survives. ``REDIS_URL`` then gives the rest: the primary's
user, password, database number and TLS (``rediss://``); its host and port are not used.
``REDIS_SENTINEL_PASSWORD`` is the sentinels' own password, if they have one.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.connection import parse_url
from redis.sentinel import Sentinel, SentinelManagedSSLConnection

from payq.settings import Settings

__all__ = ["redis_client"]

SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30


def redis_client(
    settings: Settings,
    *,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> redis.Redis:
    """A client of the Redis primary the settings name, directly or through Sentinel."""
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
    }
    if not settings.sentinels:
        return redis.Redis.from_url(
            settings.redis_url, health_check_interval=HEALTH_CHECK_INTERVAL_S, **timeouts
        )
    primary: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    for unused in ("host", "port"):
        primary.pop(unused, None)
    if primary.pop("connection_class", None) is not None:  # rediss://: TLS to the primary
        primary["connection_class"] = SentinelManagedSSLConnection
    sentinel_password = settings.redis_sentinel_password
    sentinels = Sentinel(
        list(settings.sentinels),
        sentinel_kwargs={
            **timeouts,
            "password": None if sentinel_password is None else sentinel_password.get_secret_value(),
        },
    )
    client: redis.Redis = sentinels.master_for(
        settings.redis_sentinel_master,
        redis_class=_PrimaryClient,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        **{**timeouts, **primary},
    )
    return client


class _PrimaryClient(redis.Redis):
    """The primary's client, which closes its connections to the sentinels too."""

    def close(self) -> None:
        super().close()
        self.connection_pool.sentinel_manager.close()  # type: ignore[attr-defined]
