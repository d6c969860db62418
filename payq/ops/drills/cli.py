"""Incident drills: ``payq simulate payment_timeout | database_pool_exhaustion | connection_error``.

The command line over `run_drill`: ``payq simulate <drill> [--charges N]`` prints
the drill's lines as they come and exits 0 when nothing was lost, 1 when the drill
was not ok, 2 when it was refused. The first line above is the command's description.
"""

from __future__ import annotations

import argparse
import sys

from payq.ops.drills.names import DRILLS

__all__ = ["add_simulate_command"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected 1 to 10000, got {value}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    from payq.logs import configure_logging
    from payq.ops.drills.run import DrillRefused, run_drill
    from payq.settings import get_settings

    configure_logging(get_settings())
    try:
        result = run_drill(args.drill, charges=args.charges, out=lambda s: print(s, flush=True))
    except DrillRefused as exc:
        print(f"payq: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def add_simulate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``payq simulate <drill> [--charges N]``; its ``func`` returns the exit code."""
    p = sub.add_parser(
        "simulate",
        help="incident drills: reproduce one of the incident's errors and show nothing is lost",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("drill", choices=DRILLS, help="which of the incident's errors to reproduce")
    p.add_argument("--charges", type=_positive, default=20, help="charges to enqueue (default 20)")
    p.set_defaults(func=_cmd_simulate)
