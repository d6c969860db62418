"""payq's Prometheus metrics, beside Dramatiq's own.

Worker processes write them in prometheus-client's multiprocess mode (``payq worker``
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory for its group); Dramatiq's
exposition server serves both sets on ``METRICS_HOST:METRICS_PORT``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ATTEMPTS",
    "CHARGES",
    "DEAD_LETTERS",
    "DEFERRALS",
    "POOL_IN_USE",
    "POOL_SIZE",
    "PROVIDER_LATENCY",
]

CHARGES = Counter("payq_charges", "Charges that reached a state after an attempt", ["outcome"])
ATTEMPTS = Counter(
    "payq_provider_attempts", "Provider calls, by error class (none when charged)", ["error_class"]
)
PROVIDER_LATENCY = Histogram(
    "payq_provider_latency_seconds",
    "Provider call latency, deadline included",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13),
)
DEFERRALS = Counter("payq_deferrals", "Messages sent again for later, by cause", ["cause"])
POOL_IN_USE = Gauge(
    "payq_pool_in_use", "Connections in use, by pool", ["pool"], multiprocess_mode="livesum"
)
POOL_SIZE = Gauge("payq_pool_size", "Pool sizes, by pool", ["pool"], multiprocess_mode="livesum")
DEAD_LETTERS = Gauge(
    "payq_dead_letters",
    "Dead charges in the dead-letter view",
    multiprocess_mode="mostrecent",
)
