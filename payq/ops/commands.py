"""What ``payq dlq``, ``reconcile``, ``status`` and ``health`` do once parsed: call the ops
functions, print a table or JSON, return the exit code.

Loaded only when one of those commands runs (``payq/ops/cli.py`` builds the parser).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import getpass
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select

from payq.constants import DeadOutcome
from payq.db import transaction
from payq.errors import ConfigError
from payq.ledger import audit
from payq.models import charges
from payq.ops import broker_dlq
from payq.ops.dlq import (
    DeadCharge,
    DeadFilter,
    iter_dead_charges,
    purge,
    replay,
    show,
    totals,
)
from payq.ops.output import plural, spreadsheet_safe, terminal_safe
from payq.ops.reconcile import reconcile
from payq.reads import last_read_source

__all__ = ["format_amount"]

# ISO 4217 minor-unit exponents that are not 2.
_ZERO_DECIMALS = "bif clp djf gnf isk jpy kmf krw pyg rwf ugx uyi vnd vuv xaf xof xpf"
_THREE_DECIMALS = "bhd iqd jod kwd lyd omr tnd"
_EXPONENT = {
    **dict.fromkeys(_ZERO_DECIMALS.split(), 0),
    **dict.fromkeys(_THREE_DECIMALS.split(), 3),
}
MESSAGE_WIDTH = 120
#: ``payq health``'s exit code by the worst check: payq's own table (3: a service down).
HEALTH_EXIT = {0: 0, 1: 1, 2: 3}


def format_amount(amount: int, currency: str) -> str:
    exponent = _EXPONENT.get(currency.lower(), 2)
    value = f"{amount / 10**exponent:,.{exponent}f}" if exponent else f"{amount:,}"
    return f"{value} {currency.upper()}"


def _actor(args: argparse.Namespace) -> str:
    return str(args.actor or os.environ.get("PAYQ_ACTOR") or getpass.getuser())


def _filter(args: argparse.Namespace) -> DeadFilter:
    return DeadFilter(
        ids=tuple(getattr(args, "ids", ()) or ()),
        reason=args.reason,
        error_class=args.error_class,
        since=args.since,
        until=args.until,
        min_amount=args.min_amount,
        max_amount=args.max_amount,
        currency=args.currency,
        include_purged=args.include_purged,
        outcome=DeadOutcome(args.outcome) if getattr(args, "outcome", None) else None,
    )


def _chosen(args: argparse.Namespace) -> DeadFilter:
    """Changing commands act on IDs, a filter, or --all: never on nothing said."""
    flt = _filter(args)
    if flt.is_empty() and not args.all:
        raise ConfigError("say which charges: give IDs, a filter (see --help), or --all")
    return flt


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _report(fields: dict[str, Any]) -> dict[str, Any]:
    """A report's lists of charge ids and its {charge id: why} maps, as JSON-ready text."""
    return {
        name: {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        for name, value in fields.items()
    }


def _table(rows: list[list[str]], headers: list[str]) -> None:
    rows = [[terminal_safe(cell) for cell in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cut(text: str | None, width: int = 60) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_list(args: argparse.Namespace) -> int:
    flt = _filter(args)
    dead = list(_limited(iter_dead_charges(flt), args.limit))
    # The total is the view's: purged charges are listed when asked for, never counted.
    sums = totals(dataclasses.replace(flt, include_purged=False))
    purged = totals(flt) if flt.include_purged else {}
    purged_count = sum(n for n, _ in purged.values()) - sum(n for n, _ in sums.values())
    if args.json:
        _print_json(
            {
                "charges": [d.as_dict() for d in dead],
                "count": sum(n for n, _ in sums.values()),
                "totals": {cur: {"count": n, "amount": amt} for cur, (n, amt) in sums.items()},
                "purged": max(0, purged_count),
            }
        )
        return _said_where_read()
    _table(
        [
            [
                str(d.charge.id),
                d.charge.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
                format_amount(d.charge.amount, d.charge.currency),
                str(d.charge.attempts),
                d.charge.last_error_class or "",
                _outcome(d) + (" (purged)" if d.charge.purged_at else ""),
                _cut(d.charge.dead_reason),
            ]
            for d in dead
        ],
        ["ID", "DEAD AT (UTC)", "AMOUNT", "ATT", "LAST ERROR", "AT THE PROVIDER", "REASON"],
    )
    count = sum(n for n, _ in sums.values())
    shown = f" (showing {len(dead)})" if len(dead) < count + max(0, purged_count) else ""
    money = ", ".join(format_amount(amt, cur) for cur, (_, amt) in sums.items()) or "nothing"
    also = (
        f"; {plural(purged_count, 'purged charge')} listed, not counted" if purged_count > 0 else ""
    )
    print(f"\n{plural(count, 'dead charge')} in the view{shown}: {money}{also}")
    return _said_where_read()


def _said_where_read() -> int:
    """A read that was meant for the replica but went to the primary says why, on stderr
    (the output itself stays what it is: a table, JSON, CSV)."""
    source = last_read_source()
    if source is not None and source.warning is not None:
        print(f"payq: read {source.describe()}", file=sys.stderr)
    return 0


#: What ``payq dlq`` says a dead charge did at the provider.
OUTCOME_WORDS = {
    DeadOutcome.NOT_CHARGED: "not charged",
    DeadOutcome.VERIFIED_NOT_CHARGED: "verified not charged",
    DeadOutcome.UNKNOWN: "outcome unknown",
}


def _outcome(dead: DeadCharge) -> str:
    outcome = dead.charge.dead_outcome
    return OUTCOME_WORDS[outcome] if outcome is not None else ""


def _limited(items: Iterable[DeadCharge], limit: int | None) -> Iterable[DeadCharge]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def cmd_show(args: argparse.Namespace) -> int:
    dead, attempts = show(args.id)
    _said_where_read()
    if args.json:
        _print_json({**dead.as_dict(), "status": dead.charge.status.value, "attempts": attempts})
        return 0
    c = dead.charge
    outcome = f", {_outcome(dead)}" if c.dead_outcome else ""
    print(f"charge     {c.id}  ({c.status.value}{outcome})")
    print(f"key        {terminal_safe(c.idempotency_key)}")
    description = terminal_safe(c.description or "")
    print(f"amount     {format_amount(c.amount, c.currency)}   {description}")
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    print(f"created    {c.created_at.strftime(stamp)}, last change {c.updated_at.strftime(stamp)}")
    if c.dead_reason:
        print(f"reason     {terminal_safe(c.dead_reason)}")
    if c.provider_charge_id:
        at = f" (endpoint {c.charged_endpoint})" if c.charged_endpoint else ""
        print(f"provider   {terminal_safe(c.provider_charge_id)}{at}")
    if c.ledger_group and c.status.value not in ("succeeded", "failed"):
        print(
            f"pinned     to ledger group {c.ledger_group}: sent only there until proven not charged"
        )
    if c.purged_at:
        print(
            f"purged     {c.purged_at:%Y-%m-%d %H:%M:%S} UTC by {terminal_safe(c.purged_by or '')}"
        )
    if c.dead_outcome is DeadOutcome.UNKNOWN and c.next_lookup_at:
        print(f"lookup     the sweep asks the provider again at {c.next_lookup_at:%H:%M:%S} UTC")
    print()
    _table(
        [
            [
                str(a["number"]),
                a["kind"],
                a["endpoint"] or "-",
                a["started_at"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                "-" if a["latency_ms"] is None else f"{a['latency_ms']} ms",
                a["outcome"],
                str(a["http_status"] or "-"),
                a["error_class"] or "",
                _cut(a["error_message"] or a["answer"], MESSAGE_WIDTH),
            ]
            for a in attempts
        ],
        [
            "#",
            "REQUEST",
            "ENDPOINT",
            "STARTED (UTC)",
            "LATENCY",
            "OUTCOME",
            "HTTP",
            "ERROR CLASS",
            "MESSAGE",
        ],
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    flt = _chosen(args)
    if args.rate <= 0:
        raise ConfigError(f"--rate: must be above 0 charges/s, got {args.rate}")
    report = replay(
        flt,
        actor=_actor(args),
        dry_run=args.dry_run,
        rate_per_s=args.rate,
        progress=None
        if args.json
        else lambda r: print(f"  replayed {len(r.replayed)}…", file=sys.stderr),
    )
    acted = {*report.replayed, *report.planned, *report.skipped}
    report.skipped.update(_why_not_dead([cid for cid in flt.ids if cid not in acted]))
    if args.json:
        _print_json(_report(report.__dict__))
    elif args.dry_run:
        print(
            f"would replay {plural(len(report.planned), 'dead charge')} (dry run: nothing changed)"
        )
        _list_ids(report.planned)
    else:
        print(
            f"replayed {plural(len(report.replayed), 'dead charge')} with their own "
            f"idempotency keys (at most {args.rate:g}/s); they are pending again"
        )
    if not args.json:
        for cid, why in report.skipped.items():
            print(f"  skipped {cid}: {why}")
    return 1 if report.skipped else 0


def cmd_purge(args: argparse.Namespace) -> int:
    flt = _chosen(args)
    if not args.yes and not args.dry_run:
        raise ConfigError(
            "purge takes charges out of the dead-letter view: add --yes (or --dry-run)"
        )
    ids = purge(flt, actor=_actor(args), dry_run=args.dry_run)
    left = {
        str(cid): why for cid, why in _why_not_dead([c for c in flt.ids if c not in ids]).items()
    }
    if args.json:
        key = "would_purge" if args.dry_run else "purged"
        _print_json({key: [str(i) for i in ids], "left": left})
    else:
        verb = "would purge" if args.dry_run else "purged"
        print(
            f"{verb} {plural(len(ids), 'dead charge')} (kept in the database, out of the "
            "dead-letter view)"
        )
        if args.dry_run:
            _list_ids(ids)
        for cid, why in left.items():
            print(f"  left {cid}: {why}")
    return 1 if left else 0


def _list_ids(ids: Sequence[uuid.UUID]) -> None:
    """A dry run names what it would touch."""
    for cid in ids:
        print(f"  {cid}")


def _why_not_dead(ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """For charges named but not acted on: what each one is instead."""
    if not ids:
        return {}
    with transaction() as conn:
        found = {
            row.id: row
            for row in conn.execute(
                select(charges.c.id, charges.c.status, charges.c.purged_at).where(
                    charges.c.id.in_(list(ids))
                )
            )
        }
    why = {}
    for cid in ids:
        row = found.get(cid)
        if row is None:
            why[cid] = "no charge with this id"
        elif row.status == "dead" and row.purged_at is not None:
            why[cid] = "dead but purged: add --include-purged"
        elif row.status == "dead":
            why[cid] = "dead, but left out by the other filters given"
        else:
            why[cid] = f"not dead: it is {row.status}"
    return why


def cmd_export(args: argparse.Namespace) -> int:
    rows = (d.as_dict() for d in iter_dead_charges(_filter(args)))
    if args.format == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return _said_where_read()
    fields = [
        "id", "idempotency_key", "amount", "currency", "description", "attempts", "dead_reason",
        "last_error_class", "last_error", "dead_outcome", "created_at", "dead_at",
        "purged_at", "purged_by", "reconciled_at",
    ]  # fmt: skip
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:  # no cell a spreadsheet would run, no escape a terminal would obey
        writer.writerow(
            {k: spreadsheet_safe(terminal_safe(v) if isinstance(v, str) else v)
             for k, v in row.items()}
        )  # fmt: skip
    return _said_where_read()


def cmd_reconcile(args: argparse.Namespace) -> int:
    from payq.settings import get_settings

    if not args.dry_run:
        get_settings().require_provider_key("payq reconcile")
    report = reconcile(_filter(args), actor=_actor(args), dry_run=args.dry_run)
    if args.json:
        _print_json(_report(report.__dict__))
        return 1 if report.pending else 0
    if args.dry_run:
        print(
            f"would look up {plural(len(report.planned), 'dead charge')} whose outcome is "
            "unknown (dry run)"
        )
        _list_ids(report.planned)
        return 0
    looked = len(report.settled) + len(report.pending)
    print(
        f"looked up {plural(looked, 'charge')} at the provider: "
        f"{len(report.succeeded)} charged (now succeeded), {len(report.failed)} declined "
        f"(now failed), {len(report.not_charged)} not charged (stay dead)"
    )
    for cid, why in report.pending.items():
        print(f"  not settled {cid}: {why}")
    return 1 if report.pending else 0


def cmd_broker(args: argparse.Namespace) -> int:
    letters = broker_dlq.list_dead_letters()
    if args.action == "list":
        if args.json:
            _print_json([d.as_dict() for d in letters])
            return 0
        _table(
            [[d.redis_id, d.dead_at.strftime("%Y-%m-%d %H:%M:%S"), d.actor or "-",
              _cut(json.dumps(d.args) if d.args else "", 40), _cut(d.problem or d.raw, 50)]
             for d in letters],
            ["REDIS ID", "DEAD AT (UTC)", "ACTOR", "ARGS", "PROBLEM / PAYLOAD"],
        )  # fmt: skip
        print(f"\n{len(letters)} messages in Dramatiq's dead-letter set")
        return 0
    if not args.all and not args.ids:
        raise ConfigError("say which messages: give their Redis ids or --all")
    wanted = [d for d in letters if args.all or d.redis_id in set(args.ids)]
    missing = sorted(set(args.ids) - {d.redis_id for d in letters})
    left: dict[str, str] = {rid: "not in the dead-letter set" for rid in missing}
    if args.action == "requeue":
        left.update({d.redis_id: "undecodable: requeueing cannot help, drop it"
                     for d in wanted if not d.decodable})  # fmt: skip
        ids = [d.redis_id for d in wanted if d.decodable]
        done = ids if args.dry_run else broker_dlq.requeue(ids)
    else:
        if not args.yes and not args.dry_run:
            raise ConfigError("drop deletes these messages for good: add --yes (or --dry-run)")
        ids = [d.redis_id for d in wanted]
        done = ids if args.dry_run else broker_dlq.drop(ids)
    if done and not args.dry_run:
        with transaction() as conn:
            params = {"redis_ids": done, "set": "dramatiq"}
            audit(conn, actor=_actor(args), action=f"broker_{args.action}", params=params, ids=[])
    verb = {"requeue": "requeued", "drop": "dropped"}[args.action]
    if args.json:
        _print_json({("would_" + args.action) if args.dry_run else verb: done, "left": left})
    else:
        print(f"{'would ' + args.action if args.dry_run else verb} {len(done)} messages")
        for rid, why in left.items():
            print(f"  left {rid}: {why}")
    return 1 if left else 0


def cmd_status(args: argparse.Namespace) -> int:
    from payq.ops.status import render, snapshot

    while True:
        snap = snapshot()
        if args.json:
            _print_json(snap)
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render(snap), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 ok, 1 degraded, 3 down (payq's exit codes: 3 is a service down)."""
    from payq.health import run_checks, worst
    from payq.settings import get_settings

    checks = run_checks(get_settings(), provider=not args.no_provider)
    overall = worst(checks)
    if args.json:
        _print_json({"status": overall.name.lower(), "checks": [c.as_dict() for c in checks]})
    else:
        width = max(16, *(len(c.name) for c in checks))  # provider:<endpoint> may be longer
        for check in checks:
            detail = terminal_safe(check.detail)
            print(f"{check.level.name.lower():<9} {check.name:<{width}} {detail}")
        print(f"{overall.name.lower()}")
    return HEALTH_EXIT[overall]
