"""The baseline: a plain Dramatiq actor doing only the provider call (no database, no gate).

Run as ``dramatiq benchmarks.plain_dramatiq``; reads the same ``REDIS_URL``,
``PAYMENT_PROVIDER_URL``, ``PAYMENT_PROVIDER_API_KEY`` and
``PAYMENT_POOL_MAX_CONNECTIONS`` as payq. Dramatiq's default middleware, nothing else.
"""

from __future__ import annotations

import os

import dramatiq
import httpx
from dramatiq.brokers.redis import RedisBroker

NAMESPACE = "bench_dramatiq"
POOL = int(os.environ.get("PAYMENT_POOL_MAX_CONNECTIONS", "64"))

broker = RedisBroker(url=os.environ["REDIS_URL"], namespace=NAMESPACE)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)
client = httpx.Client(
    base_url=os.environ["PAYMENT_PROVIDER_URL"],
    headers={"Authorization": f"Bearer {os.environ['PAYMENT_PROVIDER_API_KEY']}"},
    limits=httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL),
    timeout=5.0,
)


@dramatiq.actor(queue_name="charges", max_retries=0)
def charge(key: str, amount: int, currency: str, source: str) -> None:
    body = {"amount": amount, "currency": currency, "source": source, "metadata": {"key": key}}
    client.post("/v1/charges", json=body, headers={"Idempotency-Key": key}).raise_for_status()
