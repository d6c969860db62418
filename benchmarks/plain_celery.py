"""The baseline: a plain Celery task doing only the provider call (no database, no gate).

Run as ``celery -A benchmarks.plain_celery worker --pool threads``; reads the same
``REDIS_URL``, ``PAYMENT_PROVIDER_URL``, ``PAYMENT_PROVIDER_API_KEY`` and
``PAYMENT_POOL_MAX_CONNECTIONS`` as payq. Results are ignored (no result backend).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import httpx
from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_ready  # type: ignore[import-untyped]

QUEUE = "bench_celery"
READY_LINE = "plain celery worker ready"
POOL = int(os.environ.get("PAYMENT_POOL_MAX_CONNECTIONS", "64"))

app = Celery("plain_celery", broker=os.environ["REDIS_URL"])
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_transport_options={"global_keyprefix": f"{QUEUE}:"},
    broker_connection_retry_on_startup=True,
)
client = httpx.Client(
    base_url=os.environ["PAYMENT_PROVIDER_URL"],
    headers={"Authorization": f"Bearer {os.environ['PAYMENT_PROVIDER_API_KEY']}"},
    limits=httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL),
    timeout=5.0,
)


@app.task(name="charge")  # type: ignore[untyped-decorator]
def charge(key: str, amount: int, currency: str, source: str) -> None:
    body = {"amount": amount, "currency": currency, "source": source, "metadata": {"key": key}}
    client.post("/v1/charges", json=body, headers={"Idempotency-Key": key}).raise_for_status()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _ready(**_: Any) -> None:  # the benchmark waits for this line (logs are at WARNING)
    print(READY_LINE, file=sys.stderr, flush=True)
