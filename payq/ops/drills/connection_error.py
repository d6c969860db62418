"""``payq simulate connection_error``: the provider resets every connection, then recovers.

Every connection is reset until each charge has been tried once. A reset stores
nothing, so the provider charged nothing for those attempts; they end
``connection_error`` and are retried after a backoff with the same idempotency
key, and charged afresh.
"""

from __future__ import annotations

from collections import Counter

from payq.ops.drills.orchestration import (
    Drill,
    attempts_of,
    faulty_until_all_tried,
    gaps_after,
    provider_line,
    span,
    threads_for,
)

__all__ = ["drill_connection_error"]


def drill_connection_error(drill: Drill) -> None:
    """Run the drill, then tell what happened; its problems go to ``drill.problems``."""
    s = drill.settings
    threads = threads_for(s, 4)
    drill.story.say(
        f"payq simulate connection_error (run {drill.run}): {drill.total} charges; the provider "
        "resets every connection until each charge has been tried once"
    )
    run = faulty_until_all_tried(
        drill,
        threads=threads,
        sim_args=["--reset-rate", "1.0"],
        heal={"reset_rate": 0.0},
        faulty="every connection is being reset",
        healed="every charge has been tried once: the provider recovered",
    )
    stats, requests = run.stats, run.requests

    attempts = attempts_of(drill)
    errors = [a for a in attempts if a["error_class"] == "connection_error"]
    message = Counter(str(a["error_message"]) for a in errors).most_common(1)
    seen = message[0][0].split("; the charge")[0] if message else "n/a"
    gaps = gaps_after(attempts, "connection_error")
    no_answer = int(stats.get("by_status", {}).get("no_answer", 0))
    fresh = sum(
        1
        for recs in requests.values()
        if recs and recs[-1]["status"] == 200 and not recs[-1]["replayed"]
    )
    window_s = run.healed_after_s or 0.0
    drill.figures.update(
        reset_window_s=round(window_s, 3),
        connection_errors=len(errors),
        charges_hit=len({a["idempotency_key"] for a in errors}),
        no_answer=no_answer,
        retry_gap_s_min=round(min(gaps, default=0), 3),
        retry_gap_s_max=round(max(gaps, default=0), 3),
        charged_afresh=fresh,
    )
    drill.require(len(errors) > 0, "no attempt ended connection_error: the fault did not happen")
    last = {a["idempotency_key"]: a for a in attempts}  # ordered by key, then number
    unretried = sum(1 for a in last.values() if a["error_class"] == "connection_error")
    drill.require(unretried == 0, f"{unretried} charges ended on a connection_error, unretried")

    step = drill.story.step
    step(
        f"The provider reset every connection (reset_rate 1.0) for {window_s:.1f} s, until each "
        f"of the {drill.total} charges had been tried once; then it recovered."
    )
    step(
        f"{len(errors)} attempts on {drill.figures['charges_hit']} charges ended "
        f'connection_error ("{seen}"); the provider answered none of them ({no_answer} '
        "requests without an answer) and, as a reset stores nothing, charged nothing for them."
    )
    step(
        f"Each was tried again {span(gaps, '.1f', ' s')} later (a delayed message: a backoff "
        f"of RETRY_BACKOFF_MIN_S={s.retry_backoff_min_s:g} s or more; no thread slept) with the "
        f"same Idempotency-Key; {fresh} of {drill.total} keys then got one 200, a charge made "
        "afresh."
    )
    step(provider_line(drill))
