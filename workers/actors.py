"""The charge actor. Its body is the business rule; everything else is middleware."""

from __future__ import annotations

import logging
import os
import sys

import dramatiq
from dramatiq.middleware import CurrentMessage

from payq import processing
from payq.broker import get_broker
from payq.constants import ACTOR_NAME, QUEUE_NAME
from payq.errors import ConfigError
from payq.logs import configure_logging
from payq.sentry import init_sentry, tag_charge
from payq.settings import get_settings
from workers.middleware import Beating, BusyCount, DrainOnce, FleetMember, PoolGuard, Reporter
from workers.watchdog import Watchdog

__all__ = ["broker", "process_charge"]

log = logging.getLogger("payq.worker")

try:
    settings = get_settings()
    settings.require_provider_key("a worker")
except ConfigError as exc:  # one clear line, not a traceback, under `dramatiq workers` too
    print(f"payq: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

configure_logging(settings)
init_sentry(settings, component="worker")  # before the broker: it patches Broker.__init__
broker = get_broker()
broker.add_middleware(CurrentMessage())
broker.add_middleware(PoolGuard(settings))
broker.add_middleware(DrainOnce())
busy = BusyCount()
broker.add_middleware(busy)
broker.add_middleware(FleetMember())
broker.add_middleware(Beating(settings))
reporter = Reporter(settings, busy)
broker.add_middleware(reporter)
broker.add_middleware(
    Watchdog(
        settings.watchdog_s,
        tell=lambda wedged: reporter.report.publish(wedged_s=round(max(wedged.values()), 1)),
    )
)
if os.environ.get("dramatiq_prom_host"):  # noqa: SIM112 - Dramatiq reads this lower-case name
    # `payq worker` sets the address (METRICS_HOST, 127.0.0.1 unless told otherwise) and
    # a fresh multiprocess directory; Dramatiq's own default would listen on 0.0.0.0.
    from dramatiq.middleware.prometheus import Prometheus

    broker.add_middleware(Prometheus())


@dramatiq.actor(
    actor_name=ACTOR_NAME,
    queue_name=QUEUE_NAME,
    # Provider retries are payq's own (counted in the database, delayed messages).
    # Dramatiq's retries cover only the unexpected: the database or Redis blinking.
    max_retries=3,
    min_backoff=1000,
    max_backoff=30_000,
    throws=(processing.UnknownCharge,),
)
def process_charge(charge_id: str) -> None:
    tag_charge(charge_id, None)
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message else None
    try:
        processing.process_charge(charge_id, message_id=message_id)
    except processing.UnknownCharge as exc:
        log.error(
            "message moved to the dead-letter set: %s",
            exc,
            extra={"message_id": message_id, "reason": str(exc)},
        )
        raise
