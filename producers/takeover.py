"""Charges of a dead worker process: their leases end now, and the relay sends them again.

A claim names its worker process (``charges.holder``, while the process beats:
``payq.liveness``). Each relay pass first asks Redis which holders of charges still under
lease are proven dead, and ends those leases with one guarded ``UPDATE`` (still
``processing``, still held by that process); the same pass then publishes them again, at
the head of the queue. The next call carries the charge's own idempotency key, so the
provider replays or refuses (``409 in_use``) whatever the dead process had asked. Its
call's row, marked abandoned by the next claim, keeps its own bound: no lookup that finds
nothing proves "not charged" before its claim plus ``CHARGE_LEASE_S`` (``payq.ledger``).
The messages a dead process had fetched but not started go back on the queue in the
same pass, rather than after ``RELAY_DEAD_WORKER_S``. ``TAKEOVER_AFTER_S=0`` turns all
this off: the lease alone decides, as before.
"""

from __future__ import annotations

import logging

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select, update

from payq import liveness
from payq.constants import ChargeStatus
from payq.db import transaction
from payq.dramatiq_redis import requeue_worker
from payq.models import charges
from payq.settings import Settings

__all__ = ["requeue_fetched_of_dead", "take_over_dead"]

log = logging.getLogger("payq.relay")

_HELD = (charges.c.status == ChargeStatus.PROCESSING) & (charges.c.lease_expires_at > func.now())


def take_over_dead(settings: Settings, broker: RedisBroker) -> int:
    """End the leases of charges whose worker process is proven dead; how many.

    Raises ``redis.RedisError`` if Redis does not answer (then nobody is taken for dead)."""
    if not settings.takeover_after_s:
        return 0
    with transaction() as conn:
        holders = list(
            conn.execute(
                select(charges.c.holder).distinct().where(_HELD, charges.c.holder.is_not(None))
            ).scalars()
        )
    dead = liveness.known_dead(broker.client, broker.namespace, holders, settings)
    if not dead:
        return 0
    with transaction() as conn:
        taken = conn.execute(
            update(charges)
            .where(_HELD, charges.c.holder.in_(dead))
            # Not published since: the relay's pass sends it again (``producers.relay``).
            .values(lease_expires_at=func.now(), published_at=None)
            .returning(charges.c.id)
        ).all()
    if taken:
        log.warning(
            "worker process%s %s silent for over %g s: %d charges taken over before their "
            "lease ran out",
            "es" if len(dead) > 1 else "",
            ", ".join(dead),
            settings.takeover_after_s,
            len(taken),
            extra={"taken_over": len(taken), "dead_holders": dead},
        )
    return len(taken)


def requeue_fetched_of_dead(settings: Settings, broker: RedisBroker) -> int:
    """Put back the messages dead processes had fetched and not started; how many."""
    if not settings.takeover_after_s:
        return 0
    moved = 0
    for worker_id in liveness.dead_aliases(broker.client, broker.namespace, settings):
        moved += requeue_worker(broker.client, broker.namespace, worker_id)
        log.warning(
            "worker %s proven dead: its fetched messages are back on the queue",
            worker_id,
            extra={"worker_id": worker_id},
        )
    return moved
