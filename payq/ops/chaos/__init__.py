"""``payq chaos`` (``make chaos``): every fault at once, then checks and one line of figures.

Real worker processes run against throwaway Redis and PostgreSQL servers of the run's own
(free ports, temporary directories), so restarts disturb nothing else on the machine. A
producer process enqueues at a steady pace while:

- the simulator answers 20 % of calls with a 5xx, 5 % after charging but past the
  client's deadline, some with 429 and ``Retry-After``, and has an outage (charges 503,
  lookups by key answered);
- a random worker process (a dramatiq child) is SIGKILLed every few seconds; its master
  stops the group and the supervisor starts it again;
- after the outage, a worker group is frozen (SIGSTOP) past its lease with calls in
  flight, then thawed, several times, with a small retry budget; a third of lookups by
  key fail, so some charges go dead of unknown outcome until the relay's sweep;
- Redis restarts once with its data gone (the relay republishes), PostgreSQL once.

The run is ok only if every check passed. How each figure is taken, and why it is fair:

- *phantom*, *ledger_mismatch*, *unknown_dead*, *unrecorded_calls*: payq's books against
  the provider's (``/_charges``, its request log). Charged there: ``succeeded`` with that
  charge's id (else *phantom*); declined: ``failed``; never charged: neither. No dead
  charge of unknown outcome once the sweep ran (the run waits); every charge request the
  provider saw has its row.
- *final*, *duplicate_charges*, *max_in_flight*: the database and the simulator's
  ``/_stats``. ``max_in_flight`` (every /v1 request) stays within
  ``PAYMENT_MAX_CONCURRENCY``, set below the fleet's threads so the fleet-wide limit holds it.
- *app connections*: ``pg_stat_activity`` every 100 ms, ``payq-worker-*`` and
  ``payq-relay-*``; bound: worker processes x ``DATABASE_POOL_MAX_CONNECTIONS`` over all
  groups, plus the relay's pool (one process).
- *Retry-After*: the simulator's request log. After a 429, the key's next request comes
  no earlier than ``Retry-After`` seconds after the 429 was written. Tolerance 0: both
  ends are the simulator's clock, and payq counts from when it got the answer, later.
- *breaker*: calls reaching the simulator during the outage, over the call rate in the
  5 s before it times its length; under ``BREAKER_MAX_FRACTION`` passes. No SIGKILL in
  the 8 s before the outage nor during it, so a restarting group skews neither side.
- *recovery from SIGKILL*: charges in ``processing``, claimed at most one provider
  deadline (+1 s) before the kill, with no recorded attempt were in flight in the killed
  group: seconds from the kill to their next attempt (*takeover*) and final state
  (*recovery*); per kill, until the group serves again (*group_back*). No kill within
  3 s of the PostgreSQL restart, whose failed recordings would look the same.

`plan` holds a run's size and settings, `run` drives it, `measure` takes the figures,
`verdict` checks them and writes the line, `produce` is the producer process.
"""

from __future__ import annotations

from payq.ops.chaos.plan import ChaosPlan
from payq.ops.chaos.run import run_chaos
from payq.ops.chaos.verdict import BREAKER_MAX_FRACTION, ChaosResult

__all__ = ["BREAKER_MAX_FRACTION", "ChaosPlan", "ChaosResult", "run_chaos"]
