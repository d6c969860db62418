"""Which provider endpoint a call goes to: one gate and one client per endpoint.

Each endpoint (``Settings.endpoints``) is a ``Route``: its own HTTP client (pool,
timeouts, key) and its own gate (breaker and fleet slots in Redis, shared by the fleet),
so one endpoint's trouble never blocks another's calls.

``Routes.enter(group)`` asks the endpoints' gates in order, highest priority first
(weights shuffle endpoints of equal priority), and returns the first that admits the
call, or the shortest wait if none does. ``group``: the ledger group the charge is
pinned to (``charges.ledger_group``): endpoints of one group share its books, so a
charge may go to any of them with its key; it may go to another group only once the
group it was sent to is proven not to have charged it (``payq.processing`` clears the
pin on that proof), so while pinned it is offered its group's endpoints only.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from payq.broker import BROKER
from payq.constants import DeferralCause
from payq.endpoints import DEFAULT_ENDPOINT
from payq.gate import Pass, ProviderGate, Wait, jitter_ms
from payq.provider import ProviderClient
from payq.runtime import Part, Runtime, runtime
from payq.settings import Endpoint, Settings

log = logging.getLogger("payq.routing")

#: A route that refused for one of these is sick, not busy: taking the next is a failover.
_SICK = frozenset({DeferralCause.BREAKER_OPEN, DeferralCause.BREAKER_HALF_OPEN})

__all__ = [
    "ROUTES",
    "Route",
    "Routed",
    "Routes",
    "get_gate",
    "get_provider",
    "get_routes",
    "routes_for",
    "unserved",
]


class Route:
    """One endpoint, the client that calls it (made on first use: it needs the endpoint's
    API key, which a process that only reads the gates may not have) and its gate."""

    def __init__(
        self, endpoint: Endpoint, gate: ProviderGate, provider: ProviderClient | None = None
    ) -> None:
        self.endpoint = endpoint
        self.gate = gate
        self._provider = provider
        #: A charge pinned to this group name may be claimed here too (set by ``Routes``:
        #: ``default`` for the first group, when no group of that name is configured).
        self.default_as = ""
        self._lock = threading.Lock()

    @property
    def provider(self) -> ProviderClient:
        if self._provider is None:
            with self._lock:
                if self._provider is None:
                    self._provider = ProviderClient(self.endpoint.settings)
        return self._provider

    def close(self) -> None:
        self.gate.close()
        if self._provider is not None:
            self._provider.close()

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def group(self) -> str:
        return self.endpoint.group


@dataclass(frozen=True, slots=True)
class Routed:
    """A call may go ahead on ``route``, with the slot ``entry`` its gate gave."""

    route: Route
    entry: Pass


class Routes:
    """Every endpoint of this process, highest priority first."""

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("no provider endpoint")
        self.all = tuple(sorted(routes, key=lambda r: r.endpoint.priority))
        self.groups = tuple(dict.fromkeys(r.group for r in self.all))
        self._failing_over = False  # this process's calls go past the primary's breaker
        stands_for_default = DEFAULT_ENDPOINT not in self.groups  # ``served``
        for route in self.all:
            first = route.group == self.primary.group
            route.default_as = DEFAULT_ENDPOINT if first and stands_for_default else ""

    @classmethod
    def build(cls, settings: Settings, client: redis.Redis) -> Routes:
        """A route per endpoint of ``settings``, its gate over this Redis client."""
        return cls(
            [
                Route(ep, ProviderGate(client, ep.settings, ep.key_scope))
                for ep in settings.endpoints
            ]
        )

    @property
    def primary(self) -> Route:
        return self.all[0]

    @property
    def several_groups(self) -> bool:
        return len(self.groups) > 1

    def served(self, group: str | None) -> str | None:
        """The configured group a recorded one stands for: itself; for requests from
        before several endpoints (no group, or the single endpoint's ``default`` when no
        group of that name is configured), the first endpoint's group (README: list the
        provider ``PAYMENT_PROVIDER_URL`` named first); ``None`` if no endpoint serves it."""
        if group in self.groups:
            return group
        if group is None or group == DEFAULT_ENDPOINT:
            return self.primary.group
        return None

    def named(self, name: str | None) -> Route | None:
        return next((r for r in self.all if r.name == name), None)

    def order(self, group: str | None = None, avoid: frozenset[str] = frozenset()) -> list[Route]:
        """The routes a call may take, in the order to try them: ``group``'s only, if
        given, else none of the groups to ``avoid`` (unless that leaves none); by
        priority, and among equal priorities a weighted random order."""
        routes = [r for r in self.all if group is None or r.group == group]
        if group is None and avoid:
            routes = [r for r in routes if r.group not in avoid] or routes
        # Efraimidis-Spirakis: a random key u^(1/w) per route, larger first.
        keyed = [
            (r.endpoint.priority, random.random() ** (1 / r.endpoint.weight), r) for r in routes
        ]
        keyed.sort(key=lambda k: (k[0], -k[1]))
        return [r for _, _, r in keyed]

    def enter(self, group: str | None = None, avoid: frozenset[str] = frozenset()) -> Routed | Wait:
        """The first route whose gate admits a call now (``group``, a configured one: only
        its routes), or the shortest wait. Never blocks. A lower priority is tried only
        when every route of the priority above refused as sick (its breaker): a route that
        is merely busy (its fleet slots all in use) is waited for, not spilled over."""
        waits: list[Wait] = []
        order = self.order(group, avoid)
        for i, route in enumerate(order):
            if waits and route.endpoint.priority != order[i - 1].endpoint.priority:
                busy = [w for w in waits if w.cause not in _SICK]
                if busy:
                    return min(busy, key=lambda w: w.delay_ms)
            entry = route.gate.enter()
            if isinstance(entry, Pass):
                self._watch(order[0], route, waits)
                return Routed(route, entry)
            waits.append(entry)
        return min(waits, key=lambda w: w.delay_ms)

    def _watch(self, first: Route, taken: Route, refused: list[Wait]) -> None:
        """Count a failover (the routes before ``taken`` refused: a breaker, not a full
        fleet), and alert when this process's traffic starts failing over from the
        first-priority endpoint and when it comes back to it."""
        # Imported here: metrics and alerts are the worker's concern, and the routes are
        # also read by `payq status`, which should not load Sentry.
        from payq import metrics
        from payq.sentry import alert

        over = any(w.cause in _SICK for w in refused)
        if over:
            metrics.FAILOVERS.labels(first.name, taken.name).inc()
        if taken is self.primary and self._failing_over:
            self._failing_over = False
            alert(log, f"provider traffic back on endpoint {taken.name}", endpoint=taken.name)
        elif over and first is self.primary and not self._failing_over:
            self._failing_over = True
            alert(
                log,
                f"provider traffic failing over from endpoint {first.name} to {taken.name}: "
                f"{first.name}'s circuit breaker refuses calls",
                logging.ERROR,
                endpoint=first.name,
                to_endpoint=taken.name,
            )

    def close(self) -> None:
        for route in self.all:
            route.close()


def unserved(group: str) -> Wait:
    """A charge pinned to a ledger group no endpoint serves now (the configuration
    changed): sent nowhere else, since that group may have charged it."""
    detail = (
        f"pinned to ledger group {group}, which no endpoint in PAYMENT_ENDPOINTS serves: "
        "configure one of its endpoints again, or reconcile the charge by hand"
    )
    log.error("charge waits: %s", detail, extra={"ledger_group": group})
    return Wait(DeferralCause.PINNED, jitter_ms(30_000, 60_000), detail)


def _build(rt: Runtime) -> Routes:
    return Routes.build(rt.settings, rt.get(BROKER).client)


#: This process's routes (``payq.runtime``). A forked child drops its parent's: their
#: clients' sockets are the parent's, their gates hold none of the child's slots.
ROUTES: Part[Routes] = Part(
    "routes", build=_build, after_fork=lambda routes: None, close=lambda routes: routes.close()
)


def get_routes() -> Routes:
    """This process's routes to the provider, one per endpoint."""
    return runtime().get(ROUTES)


def routes_for(
    settings: Settings, provider: ProviderClient | None = None, gate: ProviderGate | None = None
) -> Routes:
    """The process's routes; or, given a client or a gate (tests, a command with a client
    of its own), one route of the first endpoint made of them."""
    if provider is None and gate is None:
        return get_routes()
    return Routes([Route(settings.endpoints[0], gate or get_gate(), provider)])


def get_gate() -> ProviderGate:
    """The highest-priority endpoint's gate (callers that know one endpoint only)."""
    return get_routes().primary.gate


def get_provider() -> ProviderClient:
    """The highest-priority endpoint's client (callers that know one endpoint only)."""
    return get_routes().primary.provider
