"""payq's Prometheus metrics, beside Dramatiq's own.

Worker processes write them in prometheus-client's multiprocess mode (``payq worker``
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory for its group); Dramatiq's
exposition server serves both sets on ``METRICS_HOST:METRICS_PORT``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ATTEMPTS",
    "BREAKER_STATE",
    "BREAKER_TRANSITIONS",
    "CHARGES",
    "DEAD_LETTERS",
    "DEFERRALS",
    "FLEET_SLOTS_IN_USE",
    "LOOKUPS",
    "POOL_EXHAUSTED",
    "POOL_IN_USE",
    "POOL_SIZE",
    "PROVIDER_LATENCY",
    "UNKNOWN_OUTCOMES",
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
POOL_EXHAUSTED = Counter(
    "payq_pool_exhausted", "Checkouts that found a pool exhausted, by pool", ["pool"]
)
BREAKER_TRANSITIONS = Counter(
    "payq_breaker_transitions", "Circuit breaker state changes, by new state", ["state"]
)
BREAKER_STATE = Gauge(
    "payq_breaker_state",
    "The fleet's circuit breaker: 0 closed, 1 half-open, 2 open",
    multiprocess_mode="mostrecent",
)
FLEET_SLOTS_IN_USE = Gauge(
    "payq_fleet_slots_in_use",
    "Provider calls in flight across the fleet (PAYMENT_MAX_CONCURRENCY slots)",
    multiprocess_mode="mostrecent",
)
LOOKUPS = Counter(
    "payq_lookups",
    "Dead charges of unknown outcome looked up by key (the sweep, reconcile), by result",
    ["result"],
)
UNKNOWN_OUTCOMES = Gauge(
    "payq_unknown_outcomes",
    "Dead charges whose outcome is unknown: the sweep's backlog (within the key's retention) "
    "and those past it, left to a person",
    ["retention"],
    multiprocess_mode="mostrecent",
)
