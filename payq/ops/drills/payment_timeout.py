"""``payq simulate payment_timeout``: the provider charges, then holds its answer.

The incident's slow provider answered after 8 s. Here every first attempt is held
that long (longer if ``PAYMENT_TIMEOUT_MS`` is); the client cuts the call at
``PAYMENT_TIMEOUT_MS``, the charge is retried with the same idempotency key, and
the provider replays the charge it already made instead of charging again.
"""

from __future__ import annotations

from payq.ops.drills.orchestration import (
    Drill,
    attempts_of,
    faulty_until_all_tried,
    gaps_after,
    provider_line,
    span,
    threads_for,
)

__all__ = ["INCIDENT_PROVIDER_DELAY_S", "drill_payment_timeout"]

#: The incident's slow provider answered after 8 s.
INCIDENT_PROVIDER_DELAY_S = 8.0


def drill_payment_timeout(drill: Drill) -> None:
    """Run the drill, then tell what happened; its problems go to ``drill.problems``."""
    s = drill.settings
    delay_s = max(INCIDENT_PROVIDER_DELAY_S, s.payment_timeout_s + 3)
    threads = threads_for(s, 4)
    drill.story.say(
        f"payq simulate payment_timeout (run {drill.run}): {drill.total} charges; the provider "
        f"answers after {delay_s:.1f} s, PAYMENT_TIMEOUT_MS={s.payment_timeout_ms}"
    )
    run = faulty_until_all_tried(
        drill,
        threads=threads,
        sim_args=["--timeout-rate", "1.0", "--timeout-delay-s", str(delay_s)],
        heal={"timeout_rate": 0.0},
        faulty="every first attempt will be held",
        healed="every charge has had one attempt: the provider is fast again",
    )
    requests = run.requests

    attempts = attempts_of(drill)
    cut = [a for a in attempts if a["error_class"] == "timeout"]
    cut_ms = [float(a["latency_ms"]) for a in cut]
    held = sum(1 for recs in requests.values() if recs and recs[0]["fault"] == "timeout")
    retried = sum(1 for recs in requests.values() if len(recs) >= 2)
    replayed = sum(
        1 for recs in requests.values() if any(r["replayed"] and r["status"] == 200 for r in recs)
    )
    gaps = gaps_after(attempts, "timeout")
    drill.figures.update(
        timeout_ms=s.payment_timeout_ms,
        provider_delay_s=delay_s,
        held=held,
        timeouts=len(cut),
        timed_out_charges=len({a["idempotency_key"] for a in cut}),
        cut_ms_min=min(cut_ms, default=0),
        cut_ms_max=max(cut_ms, default=0),
        keys_retried=retried,
        keys_replayed=replayed,
        retry_gap_s_min=round(min(gaps, default=0), 3),
        retry_gap_s_max=round(max(gaps, default=0), 3),
    )
    drill.require(len(cut) > 0, "no call was cut at the deadline: the timeout did not happen")
    over = [ms for ms in cut_ms if ms > s.payment_timeout_ms + 1000]
    drill.require(not over, f"{len(over)} timed-out calls ran over a second past the deadline")

    step = drill.story.step
    step(
        f"The provider held {held} of {drill.total} first attempts: it charged, then kept the "
        f"answer back, to send it only after {delay_s:.1f} s (the incident's slow provider)."
    )
    step(
        f"The client cut each call at the deadline: {len(cut)} attempts ended "
        f"error_class=timeout at PAYMENT_TIMEOUT_MS={s.payment_timeout_ms} (measured "
        f"{span(cut_ms, '.0f', ' ms')}); no thread waited the {delay_s:.1f} s out, and each "
        "charge went to retrying, its outcome unknown."
    )
    step(
        f"Each was tried again {span(gaps, '.1f', ' s')} later (a delayed message: a backoff "
        f"of RETRY_BACKOFF_MIN_S={s.retry_backoff_min_s:g} s or more, then the next free thread) "
        "with the same Idempotency-Key: "
        f"{retried} of {drill.total} keys reached the provider twice or more, and {replayed} "
        "were answered with an idempotent replay (Idempotent-Replayed: true) of the charge "
        "already made, not with a new charge."
    )
    step(provider_line(drill))
