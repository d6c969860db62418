"""The relay: whatever the database says should be queued, is queued.

Redis is transport, not truth. Each pass takes non-final, due charges under ``FOR UPDATE
SKIP LOCKED`` (relays can run side by side), stamps each ``published_at = now()`` (so
each is checked about once per ``RELAY_STALE_AFTER_S``) and publishes again:

- ``pending`` or overdue ``retrying`` charges whose last message is not in Redis (never
  published, lost with Redis's data, dead-lettered while the database blinked) or is a
  delayed message overdue by ``RELAY_STALE_AFTER_S`` (lost in a live worker's memory,
  see ``payq.broker.queued``);
- ``processing`` charges whose lease ran out: at once, then every ``RELAY_STALE_AFTER_S``
  while nobody takes them over. A pass first ends the leases of charges whose worker
  process is proven dead (``producers.takeover``), so those go out in the same pass.

A pass also puts back the ack sets of workers silent for ``RELAY_DEAD_WORKER_S``
(Dramatiq would only after a 60 s heartbeat timeout and a random, unbounded maintenance
pass); a worker wrongly thought dead costs at most a duplicate delivery, which the
guarded claim makes a no-op. A pass ends with the sweep (``payq.sweep``): dead charges
of unknown outcome looked up by key, at most ``SWEEP_LOOKUPS_PER_S`` a second.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass

import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from payq.broker import get_broker, new_message_id, publish, queued
from payq.constants import ChargeStatus
from payq.db import transaction
from payq.dramatiq_redis import Layout, requeue_worker
from payq.errors import ConfigError, ServiceUnavailable
from payq.liveness import Heartbeat
from payq.models import charges
from payq.settings import Settings, get_settings
from payq.sweep import sweep_once
from producers.takeover import requeue_fetched_of_dead, take_over_dead

__all__ = ["RelayPass", "relay_once", "run_relay"]

log = logging.getLogger("payq.relay")
S = ChargeStatus


@dataclass(frozen=True, slots=True)
class RelayPass:
    checked: int
    republished: int
    lease_expired: int
    recovered: int = 0
    taken_over: int = 0  # of lease_expired: leases ended early, their worker dead


def relay_once(settings: Settings | None = None, broker: RedisBroker | None = None) -> RelayPass:
    """One pass: publish again what should be queued and is not."""
    settings = settings or get_settings()
    broker = broker or get_broker()
    recovered = recover_dead_workers(broker, settings.relay_dead_worker_s)
    taken_over = take_over_dead(settings, broker)
    recovered += requeue_fetched_of_dead(settings, broker)
    now = func.now()
    stale = now - dt.timedelta(seconds=settings.relay_stale_after_s)
    last_seen = func.coalesce(charges.c.published_at, charges.c.created_at)
    due = or_(
        and_(charges.c.status == S.PENDING, last_seen < stale),
        and_(charges.c.status == S.RETRYING, charges.c.next_attempt_at < stale, last_seen < stale),
        and_(
            charges.c.status == S.PROCESSING,
            charges.c.lease_expires_at < now,
            or_(
                charges.c.published_at.is_(None),
                charges.c.published_at < charges.c.lease_expires_at,
                charges.c.published_at < stale,  # the takeover message was lost too
            ),
        ),
    )
    with transaction() as conn:
        rows = conn.execute(
            select(charges.c.id, charges.c.status, charges.c.message_id)
            .where(due)
            .order_by(charges.c.updated_at)
            .limit(settings.relay_batch_size)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return RelayPass(0, 0, 0, recovered, taken_over)
        expired = [r.id for r in rows if r.status == S.PROCESSING]
        waiting = [r for r in rows if r.status != S.PROCESSING]
        present = queued(
            [r.message_id for r in waiting],
            overdue_after_s=settings.relay_stale_after_s,
            broker=broker,
        )
        lost = [r.id for r, is_queued in zip(waiting, present, strict=True) if not is_queued]
        fresh = {cid: new_message_id() for cid in [*expired, *lost]}
        # A charge whose worker died has waited a lease already: to the head of the queue.
        publish([(cid, fresh[cid]) for cid in expired], broker=broker, front=True)
        publish([(cid, fresh[cid]) for cid in lost], broker=broker)
        conn.execute(
            update(charges)
            .where(charges.c.id.in_([r.id for r in rows]))
            .values(
                published_at=now,
                message_id=case(
                    *((charges.c.id == cid, mid) for cid, mid in fresh.items()),
                    else_=charges.c.message_id,
                )
                if fresh
                else charges.c.message_id,
            )
        )
    result = RelayPass(len(rows), len(lost), len(expired), recovered, taken_over)
    if fresh:
        log.warning(
            "relay published %d charges again (%d lost messages, %d expired leases)",
            len(fresh),
            len(lost),
            len(expired),
            extra={"republished": len(lost), "lease_expired": len(expired)},
        )
    return result


def recover_dead_workers(broker: RedisBroker, dead_after_s: float) -> int:
    """Requeue what workers silent for ``dead_after_s`` had fetched; return how many."""
    client, layout = broker.client, Layout(broker.namespace)
    cutoff_ms = int((time.time() - dead_after_s) * 1000)
    moved = 0
    for raw_id in client.zrangebyscore(layout.heartbeats, 0, cutoff_ms):
        worker_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        moved += requeue_worker(client, broker.namespace, worker_id)
        log.warning(
            "worker %s silent for over %g s: its fetched messages are back on the queue",
            worker_id,
            dead_after_s,
            extra={"worker_id": worker_id},
        )
    return moved


class _Pace:
    """At most ``per_s`` a second on average, never more than ``per_s`` (or 1) at once."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self.burst = max(1.0, per_s)
        self.allowance = self.burst
        self.at = time.monotonic()

    def take(self) -> int:
        now = time.monotonic()
        self.allowance = min(self.burst, self.allowance + (now - self.at) * self.per_s)
        self.at = now
        budget = int(self.allowance)
        self.allowance -= budget
        return budget


def _sweeping(settings: Settings) -> bool:
    """The sweep needs the provider's API key; without it the relay only relays."""
    try:
        from payq.routing import get_provider

        get_provider()
    except ConfigError as exc:
        log.error(
            "the sweep of dead charges of unknown outcome is off (%s): they are not looked "
            "up until an operator runs payq reconcile",
            exc,
        )
        return False
    return True


def _sweep(settings: Settings, budget: int) -> None:
    """The sweep's pass: whatever goes wrong in it, the relay relays on."""
    try:
        sweep_once(settings, budget=budget)
    except Exception:
        log.exception("sweep pass failed; the relay goes on, the sweep tries again next pass")


def run_relay(stop: threading.Event | None = None, settings: Settings | None = None) -> None:
    """Relay until ``stop`` is set, one pass every ``RELAY_INTERVAL_S``, each followed by
    the sweep."""
    settings = settings or get_settings()
    stop = stop or threading.Event()
    pace = _Pace(settings.sweep_lookups_per_s) if _sweeping(settings) else None
    # The relay hears Redis beside the workers: one dead worker's silence proves its death
    # even when no other worker beats (``payq.liveness``).
    broker = get_broker()
    witness = Heartbeat(broker.client, broker.namespace, settings, witness=True)
    witness.start()
    log.info(
        "relay started",
        extra={
            "interval_s": settings.relay_interval_s,
            "stale_after_s": settings.relay_stale_after_s,
            "sweep": pace is not None,
        },
    )
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = relay_once(settings, broker)
            busy = result.checked >= settings.relay_batch_size
            if pace is not None and (budget := pace.take()):
                _sweep(settings, budget)
        except (ServiceUnavailable, redis.RedisError, OperationalError, PoolTimeout) as exc:
            log.warning(
                "relay pass failed (%s: %s); check that PostgreSQL (DATABASE_URL) and Redis "
                "(REDIS_URL or REDIS_SENTINELS) answer. Trying again.",
                type(exc).__name__,
                str(exc).splitlines()[0][:300] if str(exc) else "",
            )
            busy = False
        if not busy:
            stop.wait(max(0.0, settings.relay_interval_s - (time.monotonic() - started)))
    witness.stop()
    log.info("relay stopped")
