"""The process in the fleet's slot accounting, from boot to shutdown."""

from __future__ import annotations

import logging
from typing import Any

import redis
from dramatiq.middleware import Middleware

from payq.routing import get_routes

__all__ = ["FleetMember"]

log = logging.getLogger("payq.worker")


class FleetMember(Middleware):
    def after_process_boot(self, broker: Any) -> None:
        # Join at boot, not at the first charge: on a new (or emptied) Redis the short
        # grace for re-registering slots then passes while the process boots.
        for route in get_routes().all:
            fleet = route.gate.fleet
            try:
                fleet.renew()
            except redis.RedisError as exc:
                log.warning(
                    "fleet slots of endpoint %s not registered at start (%s); retried by the "
                    "renewer",
                    route.name,
                    exc,
                )
            fleet.start_renewing()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        # Every thread has finished its message: give back the slots this process kept
        # and send the calls it counted (their leases would free the slots in seconds).
        for route in get_routes().all:
            route.gate.flush()
