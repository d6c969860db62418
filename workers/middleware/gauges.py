"""The breaker-state and fleet-slot gauges: each endpoint's, labelled by its name, and
the first-priority endpoint's again without a label (as before there were several)."""

from __future__ import annotations

import logging

import redis

from payq import metrics
from payq.gate import BreakerState
from payq.routing import Routes, get_routes

__all__ = ["BREAKER_GAUGE", "set_gate_gauges"]

log = logging.getLogger("payq.worker")

#: ``payq_breaker_state``'s values, as its help text says.
BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def set_gate_gauges(routes: Routes | None = None) -> None:
    """Two short Redis scripts per endpoint of ``routes`` (default: the process's). Every
    process sets them (a gauge keeps the latest value), so they stay current while any
    worker lives. If Redis does not answer they keep their last value and the report
    goes on: the health checks say Redis is down."""
    routes = routes or get_routes()
    try:
        read = [
            (r.name, r.gate.breaker.snapshot().state, r.gate.fleet.in_use()) for r in routes.all
        ]
    except redis.RedisError as exc:
        log.warning("breaker and fleet gauges not updated (%s)", type(exc).__name__)
        return
    for name, state, in_use in read:
        metrics.ENDPOINT_BREAKER_STATE.labels(name).set(BREAKER_GAUGE[state])
        metrics.ENDPOINT_SLOTS_IN_USE.labels(name).set(in_use)
    _, state, in_use = read[0]  # the first-priority endpoint's
    metrics.BREAKER_STATE.set(BREAKER_GAUGE[state])
    metrics.FLEET_SLOTS_IN_USE.set(in_use)
