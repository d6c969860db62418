"""The throwaway Sentinel setup fails over, and payq's client follows it."""

from __future__ import annotations

import redis

from devservices.sentinel import ThrowawaySentinels
from payq.redis_client import redis_client
from payq.settings import load_settings
from tests.helpers import wait_until


def test_a_client_through_sentinel_follows_a_failover() -> None:
    with ThrowawaySentinels("payq-devtest") as setup:
        settings = load_settings(
            redis_url="redis://ignored:1/0",
            redis_sentinels=setup.sentinel_list,
            redis_sentinel_master="payq-devtest",
        )
        client = redis_client(settings, socket_timeout_s=1, connect_timeout_s=1)
        client.set("before", "kept")
        assert client.wait(1, 2000) == 1  # the replica has it
        first = setup.primary_port()
        assert client.connection_pool.connection_kwargs.get("port") is None

        old = setup.kill_primary()
        assert old == first
        new = setup.wait_for_promotion(old)
        assert new != old

        def answers() -> bool:
            try:
                return client.get("before") == b"kept" and bool(client.set("after", "1"))
            except redis.ConnectionError:
                return False

        wait_until(answers, 10, "the client to reach the promoted replica")
        assert client.info("server")["tcp_port"] == new
        client.close()
