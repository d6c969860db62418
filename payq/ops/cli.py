"""The parser of ``payq dlq ...``, ``reconcile``, ``status`` and ``health``.

Everything that prints takes ``--json``; everything that changes takes ``--dry-run``.
Exit codes: 0 done, 1 some items could not be handled, 2 bad usage or setting, 3 a
service did not answer. The commands themselves live in ``payq.ops.commands`` and load
only when one runs, so ``payq --help`` and a health probe start quickly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from payq.constants import DeadOutcome

__all__ = ["add_ops_commands"]


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from payq.ops import commands

        result: int = getattr(commands, name)(args)
        return result

    return run


def parse_when(text: str) -> dt.datetime:
    """An ISO 8601 time, or an age like 30m, 6h, 2d (that long ago)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time (2026-11-30T08:00) or an age (30m, 6h, 2d), got {text!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _charge_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a charge id: {text!r}") from None


def _add_filters(p: argparse.ArgumentParser, *, ids: bool = True) -> None:
    if ids:
        p.add_argument("ids", nargs="*", type=_charge_id, metavar="ID", help="charge ids")
    g = p.add_argument_group("filters")
    g.add_argument("--reason", help="a piece of the dead reason (any case)")
    g.add_argument("--error-class", help="e.g. timeout, provider_unavailable, invalid_request")
    g.add_argument("--since", type=parse_when, help="dead at or after (ISO time or age: 6h)")
    g.add_argument("--until", type=parse_when, help="dead before (ISO time or age)")
    g.add_argument("--min-amount", type=int, metavar="MINOR_UNITS")
    g.add_argument("--max-amount", type=int, metavar="MINOR_UNITS")
    g.add_argument("--currency")
    g.add_argument("--include-purged", action="store_true", help="show purged charges too")
    g.add_argument(
        "--outcome",
        choices=[o.value for o in DeadOutcome],
        help="what the provider is known to have done: not_charged (by its answers), "
        "verified_not_charged (looked up by key), unknown (the sweep asks again)",
    )


JSON_HELP = "print JSON instead of a table (for scripts)"
DRY_RUN_HELP = "list what would be done, and change nothing"


def add_ops_commands(sub: Any) -> None:
    p = sub.add_parser("status", help="queues, charges, provider figures, live workers")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.set_defaults(func=_command("cmd_status"))

    p = sub.add_parser("health", help="check every part; exit 0 healthy, 1 degraded, 3 down")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--no-provider", action="store_true", help="skip the provider lookup")
    p.set_defaults(func=_command("cmd_health"))

    dlq = sub.add_parser("dlq", help="dead charges: list, show, replay, purge, export")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="VERB")

    p = dsub.add_parser("list", help="dead charges, oldest first, with totals by currency")
    _add_filters(p)
    p.add_argument("--limit", type=int, default=200, help="rows to show (default 200)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_command("cmd_list"))

    p = dsub.add_parser("show", help="one charge with every attempt")
    p.add_argument("id", type=_charge_id)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_command("cmd_show"))

    for name, func, text in (
        (
            "replay",
            _command("cmd_replay"),
            "put dead charges back to pending, same idempotency key",
        ),
        ("purge", _command("cmd_purge"), "take dead charges out of the view (never deleted)"),
    ):
        p = dsub.add_parser(name, help=text)
        _add_filters(p)
        p.add_argument("--all", action="store_true", help="every dead charge in the view")
        p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
        p.add_argument("--actor", help="who is acting (default: PAYQ_ACTOR or the OS user)")
        p.add_argument("--json", action="store_true", help=JSON_HELP)
        p.set_defaults(func=func)
        if name == "replay":
            p.add_argument("--rate", type=float, default=50.0, metavar="N", help="charges/s (50)")
        else:
            p.add_argument("--yes", action="store_true", help="yes, purge them")

    p = dsub.add_parser("export", help="dead charges as CSV or JSON lines, for finance and support")
    _add_filters(p)
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p.set_defaults(func=_command("cmd_export"))

    p = dsub.add_parser("broker", help="Dramatiq's own dead-letter set (messages, not charges)")
    p.add_argument("action", choices=("list", "requeue", "drop"))
    p.add_argument("ids", nargs="*", metavar="REDIS_ID")
    p.add_argument("--all", action="store_true")
    p.add_argument("--yes", action="store_true", help="yes, drop them")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    p.add_argument("--actor", help="who is acting (default: PAYQ_ACTOR or the OS user)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_command("cmd_broker"))

    p = sub.add_parser("reconcile", help="look dead charges of unknown outcome up at the provider")
    _add_filters(p)
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    p.add_argument("--actor", help="who is acting (default: PAYQ_ACTOR or the OS user)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_command("cmd_reconcile"))
