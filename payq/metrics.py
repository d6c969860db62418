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
    "ENDPOINT_BREAKER_STATE",
    "ENDPOINT_CALLS",
    "ENDPOINT_LATENCY",
    "ENDPOINT_SLOTS_IN_USE",
    "FAILOVERS",
    "FLEET_SLOTS_IN_USE",
    "LOOKUPS",
    "MOVED",
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

# Several endpoints (payq.routing): each endpoint's own figures.
ENDPOINT_CALLS = Counter(
    "payq_endpoint_calls",
    "Charge requests, by endpoint, its ledger group and how they ended (AttemptOutcome)",
    ["endpoint", "group", "outcome"],
)
ENDPOINT_LATENCY = Histogram(
    "payq_endpoint_latency_seconds",
    "Charge request latency by endpoint, deadline included",
    ["endpoint"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13),
)
FAILOVERS = Counter(
    "payq_failovers",
    "Calls that went to a later endpoint because the ones before it refused (their breaker "
    "open or half-open), by the first endpoint in order and the one taken",
    ["from_endpoint", "to_endpoint"],
)
MOVED = Counter(
    "payq_moved",
    "Charges freed from their ledger group by a lookup there that found no charge, by group",
    ["group"],
)
ENDPOINT_BREAKER_STATE = Gauge(
    "payq_endpoint_breaker_state",
    "Each endpoint's circuit breaker: 0 closed, 1 half-open, 2 open",
    ["endpoint"],
    multiprocess_mode="mostrecent",
)
ENDPOINT_SLOTS_IN_USE = Gauge(
    "payq_endpoint_slots_in_use",
    "Each endpoint's calls in flight across the fleet (its max_concurrency slots)",
    ["endpoint"],
    multiprocess_mode="mostrecent",
)
