"""The size, pace and settings of a chaos run: what ``make chaos`` runs by default."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ChaosPlan", "child_environment", "endpoints", "simulator_args"]


@dataclass(frozen=True, kw_only=True)
class ChaosPlan:
    """The size and pace of a run; the defaults are ``make chaos``.

    The producer spreads ``charges`` over ``enqueue_s``; the outage starts at a quarter
    of that, Redis restarts at 65 % and PostgreSQL at 85 %; SIGKILLs come every
    ``kill_every_s`` (jittered) until 5 s after the last charge was enqueued. After
    the outage, ``stalls`` times one worker group is frozen (SIGSTOP) for ``stall_s``,
    past its lease, with its calls in flight, then thawed (SIGCONT). The fleet
    (``groups`` x ``processes`` x ``threads``) has more threads than ``max_concurrency``
    so that the fleet-wide limit, not the thread count, holds it.

    Two providers, two ledger groups: ``a`` (the primary: endpoints ``a1`` and ``a2``,
    two addresses of one provider, each half of ``max_concurrency``) and ``b`` behind
    it. The outage is provider ``a``'s; at 75 % it charges then answers too late for
    ``late_s`` (most of its calls); at 52 % endpoint ``a2`` refuses connections for
    ``refuse_s`` (its open connections reset).
    """

    charges: int = 3000
    enqueue_s: float = 60.0
    outage_s: float = 15.0
    kill_every_s: float = 5.0
    groups: int = 3
    processes: int = 2
    threads: int = 3
    max_concurrency: int = 8
    db_pool: int = 4
    stalls: int = 3
    lease_s: int = 9
    retry_max_attempts: int = 3  # small: charges can run out of attempts during a stall
    deadline_s: float = 300.0  # from the first charge to every charge final
    late_s: float = 4.0
    refuse_s: float = 6.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.charges < 1 or self.enqueue_s <= 0 or self.kill_every_s <= 0:
            raise ValueError("charges, enqueue_s and kill_every_s must be positive")
        if self.threads > self.db_pool:
            raise ValueError(f"threads ({self.threads}) may not exceed db_pool ({self.db_pool})")
        if self.outage_end_s + 2 > self.redis_restart_at_s:
            raise ValueError(
                f"the outage ({self.outage_s:g} s from {self.outage_at_s:g} s) must end 2 s "
                f"before the Redis restart at {self.redis_restart_at_s:g} s: lengthen enqueue_s"
            )

    @property
    def outage_at_s(self) -> float:
        return 0.25 * self.enqueue_s

    @property
    def late_at_s(self) -> float:
        return 0.75 * self.enqueue_s

    @property
    def refuse_at_s(self) -> float:
        return 0.52 * self.enqueue_s

    @property
    def outage_end_s(self) -> float:
        return self.outage_at_s + self.outage_s

    @property
    def redis_restart_at_s(self) -> float:
        return 0.65 * self.enqueue_s

    @property
    def pg_restart_at_s(self) -> float:
        return 0.85 * self.enqueue_s

    @property
    def stall_s(self) -> float:
        """How long a group stays frozen: past its lease, so its charges are taken over."""
        return self.lease_s + 3.0

    def stall_at_s(self, index: int) -> float:
        """When stall ``index`` (from 0) begins: after the outage, one after the other."""
        return self.outage_end_s + 2.0 + index * (self.stall_s + 1.0)

    @property
    def kills_until_s(self) -> float:
        return self.enqueue_s + 5.0

    @property
    def fleet_threads(self) -> int:
        return self.groups * self.processes * self.threads


def child_environment(plan: ChaosPlan, database_url: str, redis_url: str) -> dict[str, str]:
    """Every setting the run depends on, so that the caller's environment cannot move it.

    One attempt's worst case is 1.5 + 2 x (1.5 + 2) = 8.5 s, so a 9 s lease; short
    backoffs and relay passes keep the tail of the run short. A third of the provider's
    lookups by key fail (``simulator_args``), so that some charges go dead of unknown
    outcome; the relay's sweep looks them up again every 2 s until they settle.

    The breaker is tuned for this provider, as its operator would tune it: about 29 %
    of its healthy calls fail (5xx, 429, late answers), so the default decision on 20
    calls at a 50 % threshold would trip on noise now and then (P(10 of 20) is about
    4 %, asked again at every call). 50 calls over 5 s (the fleet makes about 40 a
    second) decide on less noise and still see the outage within 2 s or so.
    """
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PAYQ_NAMESPACE": "payq-chaos",
        "PAYMENT_TIMEOUT_MS": "1500",
        "PAYMENT_CONNECT_TIMEOUT_MS": "500",
        "PAYMENT_POOL_MAX_CONNECTIONS": str(plan.db_pool),
        "PAYMENT_MAX_CONCURRENCY": str(plan.max_concurrency),
        "DATABASE_POOL_MAX_CONNECTIONS": str(plan.db_pool),
        "DB_TIMEOUT_MS": "1500",
        "DB_STATEMENT_TIMEOUT_MS": "2000",
        "CHARGE_LEASE_S": str(plan.lease_s),
        "RETRY_MAX_ATTEMPTS": str(plan.retry_max_attempts),
        "RETRY_BACKOFF_MIN_S": "0.5",
        "RETRY_BACKOFF_MAX_S": "5",
        "RELAY_INTERVAL_S": "0.5",
        "RELAY_STALE_AFTER_S": "3",
        "RELAY_DEAD_WORKER_S": "5",
        "SWEEP_EVERY_S": "2",
        "SWEEP_LOOKUPS_PER_S": "50",
        "BREAKER_WINDOW_S": "5",
        "BREAKER_MIN_CALLS": "50",
        "METRICS_PORT": "0",  # three groups cannot share one port, nor take a demo's
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "INFO",
    }


def endpoints(plan: ChaosPlan, urls: list[str], doorway_url: str) -> list[dict[str, object]]:
    """``PAYMENT_ENDPOINTS``: provider a at two addresses (its own and the doorway's, each
    with half the slots: together they never exceed ``max_concurrency`` at a), then b."""
    half = max(1, plan.max_concurrency // 2)
    return [
        {"name": "a1", "url": urls[0], "group": "a", "priority": 1, "max_concurrency": half},
        {
            "name": "a2",
            "url": doorway_url,
            "group": "a",
            "priority": 1,
            "max_concurrency": plan.max_concurrency - half,
        },
        {"name": "b", "url": urls[1], "group": "b", "priority": 2},
    ]


def simulator_args(plan: ChaosPlan) -> list[str]:
    """The provider's faults: 20 % 5xx, 5 % charged-then-late, 5 % 429 (Retry-After 2 s),
    a third of the lookups by key answered 503.

    The late answers come after 3 s, past the 1.5 s ``PAYMENT_TIMEOUT_MS``.
    """
    seed = plan.seed if plan.seed is not None else random.randrange(2**31)
    return [
        "--latency-ms", "15", "--latency-jitter-ms", "30",
        "--error-rate", "0.20",
        "--timeout-rate", "0.05", "--timeout-delay-s", "3",
        "--rate-limit-rate", "0.05", "--retry-after-s", "2",
        "--decline-rate", "0.03",
        "--lookup-error-rate", "0.3",
        "--seed", str(seed),
    ]  # fmt: skip
