"""The breaker-state and fleet-slot gauges."""

from __future__ import annotations

import logging

import redis

from payq import metrics
from payq.gate import BreakerState
from payq.routing import get_gate

__all__ = ["BREAKER_GAUGE", "set_gate_gauges"]

log = logging.getLogger("payq.worker")

#: ``payq_breaker_state``'s values, as its help text says.
BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def set_gate_gauges() -> None:
    """Two short Redis scripts. Every process sets them (a gauge keeps the latest value), so
    they stay current while any worker lives. If Redis does not answer they keep their
    last value and the report goes on: the health checks say Redis is down."""
    gate = get_gate()
    try:
        state = gate.breaker.snapshot().state
        in_use = gate.fleet.in_use()
    except redis.RedisError as exc:
        log.warning("breaker and fleet gauges not updated (%s)", type(exc).__name__)
        return
    metrics.BREAKER_STATE.set(BREAKER_GAUGE[state])
    metrics.FLEET_SLOTS_IN_USE.set(in_use)
