"""Where a payq worker's time goes: py-spy on every worker process during a throughput run.

``python -m benchmarks.profile`` sets up what ``benchmarks.run`` does, queues a backlog,
starts ``payq worker``, and records each worker process with py-spy twice: the
thread holding the GIL (``--gil``: the Python CPU time), then every thread, idle
ones included (``--idle``: where a charge's wall time goes). It prints the functions
with the most samples, inclusive and self. Needs ``py-spy`` (and ptrace: root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis

from benchmarks.harness import Simulator, wait_until
from benchmarks.run import _environment, _migrate, _services
from benchmarks.systems import PayqSystem, Setup

__all__ = ["main"]

#: Frames from these files are payq's own; the inclusive table lists those first.
OWN = ("payq/", "workers/", "producers/")
RATE_HZ = 200


def _record(pid: int, seconds: float, out: Path, *flags: str) -> subprocess.Popen[bytes]:
    """Start py-spy on one process; it writes collapsed stacks to ``out``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", str(RATE_HZ), "--format", "raw", "--nolineno", "--output", str(out), *flags]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _frame_name(frame: str) -> str:
    """``charge (benchmarks/x.py)`` -> ``x.py:charge`` with the path cut to the package."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{function}"


def summarize(files: list[Path], charges: int, top: int) -> list[str]:
    """The most sampled functions, in milliseconds per charge (one sample = 1/RATE_HZ s)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for file in files:
        for line in file.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            frames = [_frame_name(f) for f in stack.split(";")]
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    if not total or not charges:
        return ["  (no samples)"]
    per_charge = 1000 / RATE_HZ / charges
    lines = [f"  {total} samples, {total * per_charge:.2f} ms per charge; inclusive, payq's own:"]
    mine = [(n, c) for n, c in inclusive.most_common() if n.startswith(OWN)]
    lines += [f"    {c * per_charge:6.2f} ms  {n}" for n, c in mine[:top]]
    lines.append("  self (the frame on top of the stack):")
    lines += [f"    {c * per_charge:6.2f} ms  {n}" for n, c in own.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per recording")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="payq-profile-"))
    with _services(None, None) as services:
        from devservices import free_port

        port = free_port()
        env = _environment(services, f"http://127.0.0.1:{port}", "sk_bench_" + uuid.uuid4().hex)
        _migrate()
        sim = Simulator.start(port, env, logdir / "provider-sim.log")
        client = redis.Redis.from_url(services.redis_url)
        payq = PayqSystem(Setup(client, env, logdir))
        try:
            sim.set_latency(args.latency_ms)
            payq.purge()
            rate = args.processes * args.threads * 1000 / args.latency_ms
            count = int(min(rate, 600) * (2 * args.seconds + 15))
            payq.fill([f"profile-{i}" for i in range(count)])
            children = payq.start(args.processes, args.threads)
            try:
                wait_until(lambda: payq.ready(children, args.processes), 120, "workers", children)
                time.sleep(3)
                workers = children[0].tree()[1:]  # the master only waits on its children
                for mode, flags in (("gil", ("--gil",)), ("idle", ("--idle",))):
                    files = [logdir / f"{mode}-{p.pid}.txt" for p in workers]
                    before = sim.stats()["charge_requests"]
                    procs = [
                        _record(p.pid, args.seconds, f, *flags)
                        for p, f in zip(workers, files, strict=True)
                    ]
                    for proc in procs:
                        proc.wait()
                    charges = sim.stats()["charge_requests"] - before
                    print(f"{mode}: {charges / args.seconds:.0f} charges/s while recording")
                    found = [f for f in files if f.exists()]
                    print("\n".join(summarize(found, charges, args.top)))
            finally:
                for child in children:
                    child.stop()
            payq.purge()
        finally:
            client.close()
            sim.child.stop()
    print(f"raw stacks in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
