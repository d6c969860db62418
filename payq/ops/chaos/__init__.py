"""``payq chaos`` (``make chaos``): every fault at once, then checks and one line of figures.

It runs against real worker processes and throwaway Redis and PostgreSQL servers of
its own (free ports, temporary directories), so that restarting them disturbs nothing
else on the machine. A producer process enqueues the charges at a steady pace while:

- the provider simulator answers 20 % of calls with a 5xx, 5 % after charging but too
  late (past the client's deadline), some with 429 and ``Retry-After``, and goes down
  for a window (every call 503);
- a random worker process (a dramatiq child) is SIGKILLed every few seconds; its
  master then stops the group and the supervisor starts it again;
- after the outage, a worker group is frozen (SIGSTOP) past its lease with its calls
  in flight, then thawed (SIGCONT), several times, with a small retry budget so that
  charges can run out of attempts meanwhile; a third of the lookups by key fail, so
  some charges go dead of unknown outcome until the relay's sweep settles them;
- Redis restarts once with its data gone (the relay republishes from PostgreSQL), and
  PostgreSQL restarts once.

Then it checks what payq promises and prints one line of figures; the run is ok only
if every check passed. How each figure is taken:

- *phantom*, *ledger_mismatch*, *unknown_dead*, *unrecorded_calls*: payq's books
  against the provider's (``/_charges``, its request log). A charge the provider
  charged must be ``succeeded`` with that charge's id (else *phantom*); one it declined,
  ``failed``; one it never charged, neither. No dead charge may be of unknown outcome
  once the sweep has run (the run waits for it), and every charge request the provider
  saw must have its row (the requests per key, against payq's calls per charge).
- *final*, *duplicate_charges*, *max_in_flight*: the database, and the simulator's
  ``/_stats``; ``max_in_flight`` (every /v1 request, also lookups) must stay within
  ``PAYMENT_MAX_CONCURRENCY``, which is set below the fleet's threads so that the
  fleet-wide limit is what holds it.
- *app connections*: ``pg_stat_activity`` sampled every 100 ms in a thread, counting
  connections named ``payq-worker-*`` (pools and the health check) and
  ``payq-relay-*``. Bound: worker processes x ``DATABASE_POOL_MAX_CONNECTIONS`` over
  all groups, plus the relay's pool (one process): the pool is the most a process may
  hold, so that is the most the app may ever open.
- *Retry-After*: from the simulator's log of every charge request (its own clock for
  both ends): after a 429, the next request for that key must arrive no earlier than
  ``Retry-After`` seconds after the 429 was written. Tolerance 0: one clock, and payq
  counts the wait from when it got the answer, which is later still.
- *breaker*: calls that reached the simulator during its outage, against what they
  would have been: the call rate over the 5 s before the outage times its length.
  Under ``BREAKER_MAX_FRACTION`` passes. No SIGKILL falls in the 8 s before the outage
  nor during it, so a group restarting does not distort either side of the ratio.
- *recovery from SIGKILL*: right after each kill, the charges in ``processing`` whose
  claim was at most one provider deadline (plus 1 s) before it; those whose attempt
  never got recorded were in flight in the killed group. For each, the seconds from
  the kill to its next attempt (*takeover*) and to its final state (*recovery*); and
  for each kill, the seconds until the whole group served again (*group_back*). No
  kill falls within 3 s of the PostgreSQL restart, whose failed recordings would look
  the same.

`plan` holds the size and settings of a run, `run` drives it, `measure` takes the
figures, `verdict` checks them and writes the line, `produce` is the producer process.
"""

from __future__ import annotations

from payq.ops.chaos.plan import ChaosPlan
from payq.ops.chaos.run import run_chaos
from payq.ops.chaos.verdict import BREAKER_MAX_FRACTION, ChaosResult

__all__ = ["BREAKER_MAX_FRACTION", "ChaosPlan", "ChaosResult", "run_chaos"]
