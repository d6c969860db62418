"""The chaos run's producer: a web app's stand-in, in a process of its own.

``python -m payq.ops.chaos.produce --run ID --charges N --seconds S`` enqueues N
charges evenly over S seconds with `producers.enqueue_charges`, 25 per transaction,
as traffic arrives. A batch refused because PostgreSQL is restarting is sent again
with the same keys (the same key and parameters return the charge already made), for
up to 60 s. Its own process, because payq's settings, engine and broker are
per-process, and the run's are not those of whoever calls `run_chaos`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from sqlalchemy.exc import SQLAlchemyError

__all__ = ["produce"]

BATCH = 25


def produce(argv: list[str]) -> int:
    """Enqueue the charges; exit 0 once all are in (raise if PostgreSQL stays away)."""
    from payq import db
    from payq.errors import ServiceUnavailable
    from producers import enqueue_charges

    parser = argparse.ArgumentParser(prog="python -m payq.ops.chaos.produce")
    parser.add_argument("--run", required=True)
    parser.add_argument("--charges", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    db.set_role("chaos-producer")  # the web app's connections, not the workers'
    started = time.monotonic()
    for first in range(0, args.charges, BATCH):
        due = started + args.seconds * first / args.charges
        time.sleep(max(0.0, due - time.monotonic()))  # pacing: traffic arrives over time
        requests = [
            {
                "amount": 500 + (i * 37) % 20_000,
                "currency": "usd" if i % 4 else "eur",
                "source": "tok_chargeDeclined" if i % 50 == 7 else "tok_visa",
                "idempotency_key": f"chaos-{args.run}-{i}",
                "description": f"chaos order {i}",
                "metadata": {"chaos_run": args.run},
            }
            for i in range(first, min(first + BATCH, args.charges))
        ]
        give_up = time.monotonic() + 60
        while True:
            try:
                enqueue_charges(requests)
                break
            except (ServiceUnavailable, SQLAlchemyError) as exc:
                if time.monotonic() > give_up:
                    raise
                print(f"enqueue failed ({type(exc).__name__}); sending the batch again", flush=True)
                time.sleep(0.2)
    print(f"enqueued {args.charges} charges", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(produce(sys.argv[1:]))
