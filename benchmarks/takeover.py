"""How long a SIGKILLed worker's charges take to be final again, with default settings.

``python -m benchmarks.takeover [--kills N]``: a relay, a spare worker group and a
victim group (``payq worker``, one process each) against the simulator (2 s per call,
so that a kill catches calls in flight). Each round enqueues a few charges, waits until
the victim has claimed some, SIGKILLs its whole group, and times, from the kill, until
every charge it had claimed is final again; then it restarts the victim. Run twice:
with the lease alone (``TAKEOVER_AFTER_S=0``, the old behaviour) and with the takeover
of a process proven dead (the default). Every other setting is its default. A
benchmark, not a test: it prints figures and fails on nothing but a double charge.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

DATABASE = "payq_bench_takeover"
LATENCY_MS = 2000
CHARGES_PER_ROUND = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per mode (10)")
    parser.add_argument("--only", choices=("lease", "takeover"), help="run one mode")
    args = parser.parse_args()
    server = os.environ.get("PAYQ_BENCH_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432")
    os.environ.update(
        DATABASE_URL=f"{server}/{DATABASE}",
        REDIS_URL=os.environ.get("PAYQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        PAYQ_NAMESPACE=f"payq-bench-takeover-{uuid.uuid4().hex[:6]}",
        PAYMENT_PROVIDER_API_KEY="sk_test_" + uuid.uuid4().hex,
    )
    modes = [m for m in ("lease", "takeover") if args.only in (None, m)]
    try:
        results = {mode: _run(mode, args.kills) for mode in modes}
    finally:
        _forget_namespace()
    print(f"\nkill -> the killed group's claimed charges final again ({args.kills} kills each)")
    for mode, times in results.items():
        print(
            f"  {mode:9} median {statistics.median(times):5.1f} s   max {max(times):5.1f} s   "
            f"all: {' '.join(f'{t:.1f}' for t in times)}"
        )


def _run(mode: str, kills: int) -> list[float]:
    from devservices import ensure_database
    from payq.db import get_engine
    from payq.migrate import migrate
    from payq.ops.supervise import Supervised
    from provider_sim import SimulatorThread

    ensure_database(os.environ["DATABASE_URL"])
    migrate(get_engine())
    _empty()
    logs = Path(tempfile.mkdtemp(prefix="payq-bench-takeover-"))
    times = []
    with SimulatorThread(api_key=os.environ["PAYMENT_PROVIDER_API_KEY"]) as sim:
        httpx.post(f"{sim.url}/_faults", json={"latency_ms": LATENCY_MS}).raise_for_status()
        env = {**os.environ, "PAYMENT_PROVIDER_URL": sim.url}
        if mode == "lease":
            env["TAKEOVER_AFTER_S"] = "0"
        group = ["worker", "--processes", "1", "--threads", "4"]
        relay = Supervised("relay", ["relay"], env, logs / "relay.log").start()
        spare = Supervised("spare", group, env, logs / "spare.log").start()
        victim = Supervised("victim", group, env, logs / "victim.log")
        try:
            _ready(spare)
            for n in range(kills):
                victim.start()
                _ready(victim)
                assert victim.proc is not None
                claimed = _claimed_by(victim.proc.pid)
                os.killpg(victim.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                victim.proc.wait()
                _wait(lambda c=claimed: _all_final(c), 120)
                times.append(time.monotonic() - killed_at)
                print(f"{mode} kill {n + 1}: {len(claimed)} charges final {times[-1]:.1f} s after")
            stats = httpx.get(f"{sim.url}/_stats").json()
            if stats["duplicate_charges"]:
                raise SystemExit(f"{stats['duplicate_charges']} charges charged twice")
        finally:
            for child in (victim, spare, relay):
                child.stop(timeout_s=5)
    return times


def _claimed_by(pgid: int) -> list[uuid.UUID]:
    """Enqueue charges until the victim group holds some with their calls out."""
    from producers import enqueue_charges

    tag = uuid.uuid4().hex[:8]
    for batch in range(20):
        enqueue_charges(
            [
                {"amount": 100 + i, "currency": "usd", "source": "tok_visa",
                 "idempotency_key": f"bench-{tag}-{batch}-{i}"}
                for i in range(CHARGES_PER_ROUND)
            ]
        )  # fmt: skip
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            held = _held_by(pgid)
            if held:
                time.sleep(0.3)  # their requests are out
                return _held_by(pgid) or held
            time.sleep(0.05)
    raise SystemExit("the victim group claimed nothing")


def _held_by(pgid: int) -> list[uuid.UUID]:
    from sqlalchemy import text

    from payq.db import transaction

    with transaction() as conn:
        rows = conn.execute(
            text(
                "SELECT id, holder FROM charges WHERE status = 'processing' AND holder IS NOT NULL"
            )
        ).all()
    held = []
    for cid, holder in rows:
        try:
            if os.getpgid(int(holder.split(":")[-2])) == pgid:
                held.append(cid)
        except ProcessLookupError:
            continue
    return held


def _all_final(ids: list[uuid.UUID]) -> bool:
    from sqlalchemy import text

    from payq.db import transaction

    with transaction() as conn:
        left = conn.execute(
            text(
                "SELECT count(*) FROM charges WHERE id = ANY(:ids) "
                "AND status IN ('pending', 'processing', 'retrying')"
            ),
            {"ids": ids},
        ).scalar()
    return left == 0


def _ready(child: Any) -> None:
    _wait(lambda: "ready for action" in child.log_path.read_text(errors="replace"), 60)
    child.log_path.write_bytes(b"")  # the next start's readiness is its own


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {timeout_s} s")
        time.sleep(0.05)


def _empty() -> None:
    from sqlalchemy import text

    from payq.db import transaction

    with transaction() as conn:
        conn.execute(text("TRUNCATE charge_attempts, charges, operator_actions, dashboard_actions"))


def _forget_namespace() -> None:
    """The shared Redis keeps nothing of the run."""
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    keys = list(client.scan_iter(match=f"{os.environ['PAYQ_NAMESPACE']}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
