"""Health checks: the same checks for ``payq health`` (a probe) and for every worker.

Each check says ``ok``, ``degraded`` or ``down`` with a line of detail; the worst
one decides the exit code of ``payq health`` (0, 1, 2).

Each provider endpoint gets a provider and a breaker check, named ``provider`` and
``breaker`` when there is one endpoint, ``provider:<name>`` and ``breaker:<name>`` when
there are several. Their breakers and fleet limits come from the process's routes
(``get_routes()``), the same gates its charge threads use: in a worker the health
lookup's slot is renewed by the thread that renews theirs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum

import redis
from sqlalchemy import Engine, text

from payq.broker import get_broker
from payq.constants import DeferralCause
from payq.db import transaction
from payq.errors import AuthenticationFailed, ConfigError, ProviderError, RetryableProviderError
from payq.figures import (
    attempt_stats,
    breaker_figures,
    dead_count,
    describe_breaker,
    worker_reports,
)
from payq.gate import BreakerState, ProviderGate, Wait
from payq.provider import ProviderClient
from payq.routing import Route, Routes, get_gate, get_provider, get_routes
from payq.settings import Settings
from payq.sweep import backlog

__all__ = ["Check", "Level", "run_checks", "worst"]


class Level(IntEnum):
    OK = 0
    DEGRADED = 1
    DOWN = 2


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level.name.lower(), "detail": self.detail}


def worst(checks: list[Check]) -> Level:
    return max((c.level for c in checks), default=Level.OK)


def _timed(name: str, probe: Callable[[], str]) -> Check:
    started = time.monotonic()
    try:
        detail = probe()
    except Exception as exc:  # a check reports what broke; it never raises
        return Check(name, Level.DOWN, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return Check(name, Level.OK, f"{detail} in {(time.monotonic() - started) * 1000:.0f} ms")


def check_redis() -> Check:
    return _timed("redis", lambda: "PING answered" if get_broker().client.ping() else "no PONG")


def check_postgres(engine: Engine | None = None) -> Check:
    def probe() -> str:
        with transaction(engine) as conn:
            conn.execute(text("SELECT 1"))
        return "SELECT 1 answered"

    return _timed("postgres", probe)


def check_provider(
    client: ProviderClient | None = None,
    gate: ProviderGate | None = None,
    *,
    route: Route | None = None,
    name: str = "provider",
) -> Check:
    """Look a random key up at the provider: it answers and accepts our API key; no charge.
    ``route``: the endpoint to check (its gate and client, unless given); none: the
    first-priority endpoint's.

    The lookup is a provider call, so it goes through the gate and holds a fleet slot
    while it runs (else every worker's check and every ``payq health`` would call on top
    of a fleet already at ``PAYMENT_MAX_CONCURRENCY``), given back at once after. It
    tells the breaker nothing: the breaker judges charges, and a check every 30 s
    would only tip it one way. When the gate says wait, the provider is not probed:

    - the fleet is full, or its slots are being registered (a new, emptied or promoted Redis): OK.
      Calls are in flight or about to be; the breaker and error_rate checks judge them.
    - the breaker is open, or half-open (its probes are for charges): DEGRADED, as the
      breaker check says; calling past it is what it exists to stop.
    - Redis does not answer: DEGRADED. A call without a slot could be the one over the
      limit; the redis check already says DOWN, this one says why the provider is unknown.
    """
    gate = gate or (route.gate if route else get_gate())
    entry = gate.enter()
    if isinstance(entry, Wait):
        level = Level.OK if entry.cause in _FLEET_BUSY else Level.DEGRADED
        return Check(name, level, f"not probed: {entry.detail}")
    if entry.probe:
        gate.leave(entry, None, keep=False)  # the probe goes back to the charges
        return Check(name, Level.DEGRADED, "not probed: the circuit breaker is half-open")
    try:
        return _lookup(client, route, name)
    finally:
        gate.leave(entry, None, keep=False)


#: A wait for these is the fleet at work, not trouble (``check_provider``).
_FLEET_BUSY = frozenset({DeferralCause.FLEET_FULL, DeferralCause.FLEET_STARTING})


def _lookup(client: ProviderClient | None, route: Route | None, name: str) -> Check:
    started = time.monotonic()
    try:
        client = client or (route.provider if route else get_provider())
        found = client.find_charge(f"payq-health-{uuid.uuid4().hex}")
    except ConfigError as exc:
        return Check(name, Level.DEGRADED, str(exc))
    except AuthenticationFailed:
        return Check(name, Level.DOWN, _refused_key(route))
    except RetryableProviderError as exc:
        if exc.status is not None and exc.status < 500:  # it answered: busy, not down
            return Check(name, Level.DEGRADED, f"{exc.error_class}: {str(exc)[:160]}")
        return Check(name, Level.DOWN, f"{exc.error_class}: {str(exc)[:160]}")
    except ProviderError as exc:
        return Check(name, Level.DOWN, f"{exc.error_class}: {str(exc)[:160]}")
    ms = (time.monotonic() - started) * 1000
    detail = "answered a lookup" if found is None else "answered (unexpected charge found)"
    return Check(name, Level.OK, f"{detail} in {ms:.0f} ms")


def _refused_key(route: Route | None) -> str:
    if route is None or route.endpoint.key_scope is None:  # the one endpoint of old
        return "the provider refused PAYMENT_PROVIDER_API_KEY"
    return (
        f"endpoint {route.name} refused its API key (its api_key in PAYMENT_ENDPOINTS, "
        "else PAYMENT_PROVIDER_API_KEY)"
    )


def check_breaker(gate: ProviderGate | None = None, *, name: str = "breaker") -> Check:
    """OK while closed; DEGRADED while open or half-open, saying until when and why.
    ``gate``: the endpoint's (none: the first-priority endpoint's).

    Never DOWN: an open breaker is the system protecting itself and the provider.
    Charges wait as delayed messages using no attempt, and nothing is lost; a probe
    that restarted or removed workers for it would only add to the trouble. The
    breaker alerts on its own when it opens; this check is what a probe and the
    workers' health snapshot see while it stays open.
    """
    try:
        figures = breaker_figures((gate or get_gate()).breaker)
    except redis.RedisError as exc:
        return Check(
            name,
            Level.DEGRADED,
            f"state unknown: Redis did not answer ({type(exc).__name__}); charges wait for it",
        )
    detail = describe_breaker(figures)
    if figures["state"] == BreakerState.OPEN:
        return Check(name, Level.DEGRADED, f"{detail}; charges are deferred, using no attempt")
    if figures["state"] == BreakerState.HALF_OPEN:
        return Check(name, Level.DEGRADED, f"{detail}; charges beyond its probes are deferred")
    return Check(name, Level.OK, detail)


def check_endpoints(
    *,
    provider: bool = True,
    routes: Routes | None = None,
    clients: Mapping[str, ProviderClient] | None = None,
) -> list[Check]:
    """A provider check (``provider``: with it) then a breaker check for each endpoint,
    highest priority first: ``provider:<name>`` and ``breaker:<name>``, or ``provider``
    and ``breaker`` when there is only one. ``clients``: the endpoints' clients by name
    (default: each route's own)."""
    routes = routes or get_routes()
    several = len(routes.all) > 1
    clients = clients or {}
    checks = []
    if provider:
        found = [
            check_provider(
                clients.get(r.name),
                r.gate,
                route=r,
                name=f"provider:{r.name}" if several else "provider",
            )
            for r in routes.all
        ]
        checks += _down_only_if_all(found)
    for r in routes.all:
        checks.append(check_breaker(r.gate, name=f"breaker:{r.name}" if several else "breaker"))
    return checks


def _down_only_if_all(found: list[Check]) -> list[Check]:
    """With several endpoints, one that is down while another answers is a degraded
    system (charges go to the others), not a down one: down only when none answers."""
    if len(found) < 2 or all(c.level is Level.DOWN for c in found):
        return found
    return [
        Check(c.name, Level.DEGRADED, f"{c.detail} (other endpoints answer)")
        if c.level is Level.DOWN
        else c
        for c in found
    ]


def check_error_rate(settings: Settings, engine: Engine | None = None) -> Check:
    stats = attempt_stats(5, engine)
    if stats.attempts < settings.health_min_attempts:
        return Check(
            "error_rate", Level.OK, f"{_n(stats.attempts, 'attempt')} in 5 min: too few to judge"
        )
    rate = stats.errors / stats.attempts
    level = Level.DEGRADED if rate > settings.health_error_rate else Level.OK
    return Check(
        "error_rate",
        level,
        f"{rate:.0%} of {stats.attempts} provider attempts failed in 5 min "
        f"(threshold {settings.health_error_rate:.0%})",
    )


def check_dead_letters(settings: Settings, engine: Engine | None = None) -> Check:
    """Degraded when charges went dead within the last check interval."""
    window_s = settings.health_check_interval_s
    new = dead_count(engine, within_s=window_s)
    total = dead_count(engine)
    if new:
        return Check(
            "dead_letters",
            Level.DEGRADED,
            f"{_n(new, 'charge')} went dead in the last {window_s} s ({total} in the view): "
            "see `payq dlq list`",
        )
    return Check("dead_letters", Level.OK, f"{_n(total, 'dead charge')}, none new in {window_s} s")


def check_unknown_outcomes(settings: Settings, engine: Engine | None = None) -> Check:
    """Dead charges nobody could yet say the provider did or did not charge.

    OK while the relay's sweep looks them up; DEGRADED when lookups are long overdue
    (no sweep runs) or when some passed the key's retention (a person must check them).
    """
    figures = backlog(settings, engine)
    unknown, overdue, old = (
        figures["unknown"],
        figures["overdue"],
        figures["unknown_past_retention"],
    )
    if old:
        return Check(
            "unknown_outcomes",
            Level.DEGRADED,
            f"{_n(old, 'dead charge')} of unknown outcome past the provider's key retention: "
            "check them at the provider by hand (payq dlq list --outcome unknown)",
        )
    if overdue:
        return Check(
            "unknown_outcomes",
            Level.DEGRADED,
            f"{_n(overdue, 'dead charge')} of unknown outcome not looked up for over "
            f"{2 * settings.sweep_every_s:g} s: is payq relay running, with "
            "PAYMENT_PROVIDER_API_KEY? (payq reconcile looks them up now)",
        )
    return Check(
        "unknown_outcomes",
        Level.OK,
        f"{_n(unknown, 'dead charge')} of unknown outcome, looked up by the relay's sweep",
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check_pools(settings: Settings) -> Check:
    reports = worker_reports()
    if not reports:
        return Check("pools", Level.OK, "no live worker reports")
    wedged = [r for r in reports if r.get("wedged_s")]
    if wedged:
        return Check(
            "pools",
            Level.DOWN,
            "wedged: "
            + ", ".join(f"{r['host']}:{r['pid']} ({r['wedged_s']:.0f} s on one message)"
                        for r in wedged)
            + "; the watchdog ends such a process for its supervisor to restart",
        )  # fmt: skip
    worst_use = 0.0
    where = ""
    for r in reports:
        for pool in ("http", "db"):
            use = r[f"{pool}_in_use"] / max(1, r[f"{pool}_size"])
            if use > worst_use:
                worst_use, where = use, f"{pool} pool of {r['host']}:{r['pid']}"
    threshold = settings.health_pool_utilization
    level = Level.DEGRADED if worst_use > threshold else Level.OK
    detail = f"busiest: {where} at {worst_use:.0%}" if where else "all pools idle"
    return Check(
        "pools", level, f"{detail} (threshold {threshold:.0%}, {_n(len(reports), 'worker')})"
    )


def run_checks(
    settings: Settings,
    *,
    provider: bool = True,
    engine: Engine | None = None,
    client: ProviderClient | None = None,
    gate: ProviderGate | None = None,
    routes: Routes | None = None,
    clients: Mapping[str, ProviderClient] | None = None,
) -> list[Check]:
    """Every check; ``engine`` and ``clients`` (by endpoint name) let a worker check with
    connections of its own rather than borrow from the pools its charge threads need.
    Each endpoint of ``routes`` (default: the process's, ``get_routes()``) is checked;
    given ``gate`` (and ``client``), that one endpoint only."""
    checks = [check_redis(), check_postgres(engine)]
    if gate is not None:  # the caller's own gate: one endpoint, as the caller sees it
        if provider:
            checks.append(check_provider(client, gate))
        checks.append(check_breaker(gate))
    else:
        routes = routes or get_routes()
        own = dict(clients or {})
        if client is not None:  # the first-priority endpoint's
            own.setdefault(routes.primary.name, client)
        checks.extend(check_endpoints(provider=provider, routes=routes, clients=own))
    fleet_checks: list[tuple[str, Callable[[], Check]]] = [
        ("error_rate", lambda: check_error_rate(settings, engine)),
        ("dead_letters", lambda: check_dead_letters(settings, engine)),
        ("unknown_outcomes", lambda: check_unknown_outcomes(settings, engine)),
        ("pools", lambda: check_pools(settings)),
    ]
    down = [c.name for c in checks[:2] if c.level is not Level.OK]
    for name, fleet_check in fleet_checks:
        if down:  # said, not dropped: a probe sees what it could not judge
            why = f"not checked: {' and '.join(down)} did not answer"
            checks.append(Check(name, Level.DEGRADED, why))
            continue
        try:
            checks.append(fleet_check())
        except Exception as exc:  # the service checks above already say what is down
            checks.append(Check(name, Level.DEGRADED, f"not checked: {type(exc).__name__}"))
    return checks
