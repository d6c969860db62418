"""payq's books agree with the provider's, on every charge: the reproduced scenarios.

Each test is one scenario where payq's record of a charge used to disagree with what the
provider did. They are asserted from the provider's side: its books (``/_charges``: which
keys it charged or declined), its counters (``/_stats``) and its request log
(``/_requests``), against real PostgreSQL, Redis and the simulator over HTTP.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import any_, select, text

from payq.db import transaction
from payq.gate import ProviderGate
from payq.models import operator_actions
from payq.processing import Result, process_charge
from payq.provider import ProviderClient
from payq.settings import Settings, load_settings
from payq.sweep import backlog, sweep_once
from producers import enqueue_charge
from provider_sim import SimulatorThread
from tests.conftest import API_KEY, REDIS_URL
from tests.helpers import Sim, attempts, charge, lease_passes, passed, unique_key, wait_until

pytestmark = pytest.mark.usefixtures("clean")


class Rig:
    """The simulator, and workers with a budget of ``attempts`` per charge."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self._providers: list[ProviderClient] = []

    def settings(self, attempts: int = 1, **more: Any) -> Settings:
        return load_settings(payment_provider_url=self.sim.url, retry_max_attempts=attempts, **more)

    def provider(self, **more: Any) -> ProviderClient:
        client = ProviderClient(self.settings(**more))
        self._providers.append(client)
        return client

    def enqueue(self, source: str = "tok_visa") -> uuid.UUID:
        return enqueue_charge(1999, "usd", source, unique_key("ledger")).id

    def run(
        self, cid: uuid.UUID, attempts: int = 1, provider: ProviderClient | None = None
    ) -> Result:
        return process_charge(
            str(cid), settings=self.settings(attempts), provider=provider or self.provider()
        )

    def books(self, cid: uuid.UUID) -> list[dict[str, Any]]:
        """What the provider's books hold for this charge's key."""
        key = charge(cid).idempotency_key
        return [
            b for b in httpx.get(f"{self.sim.url}/_charges").json() if b["idempotency_key"] == key
        ]

    def requests(self, cid: uuid.UUID) -> list[dict[str, Any]]:
        """Every charge request the provider saw with this charge's key."""
        return self.sim.requests(charge(cid).idempotency_key)

    def close(self) -> None:
        for client in self._providers:
            client.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    with SimulatorThread(api_key=API_KEY) as thread:
        r = Rig(Sim(thread.url))
        yield r
        r.close()


def make_due(cid: uuid.UUID) -> None:
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET next_attempt_at = now() WHERE id = :id"), {"id": cid})


def settle_audits(cid: uuid.UUID) -> list[dict[str, Any]]:
    with transaction() as conn:
        rows = conn.execute(
            select(operator_actions).where(
                operator_actions.c.action == "settle", cid == any_(operator_actions.c.charge_ids)
            )
        )
        return [dict(r) for r in rows.mappings()]


def stall_past_the_lease(
    rig: Rig, cid: uuid.UUID, attempts: int
) -> tuple[threading.Thread, list[Result]]:
    """Worker A claims the charge and calls; the provider holds the request (its key in
    use) for 2 s, and A's lease runs out meanwhile, as when its VM pauses."""
    rig.sim.faults(script=["slow"], timeout_delay_s=2.0)
    patient = rig.provider(payment_timeout_ms=5000, charge_lease_s=20)
    results: list[Result] = []
    worker_a = threading.Thread(target=lambda: results.append(rig.run(cid, attempts, patient)))
    worker_a.start()
    wait_until(lambda: len(rig.requests(cid)) == 1, 5, "worker A's request to reach the provider")
    with transaction() as conn:
        conn.execute(
            text("UPDATE charges SET lease_expires_at = now() - interval '1 s' WHERE id = :id"),
            {"id": cid},
        )
    return worker_a, results


# --- 1. a provider's answer is the truth, whoever asked --------------------------------


def test_a_stalled_workers_late_200_settles_the_charge_that_went_dead_meanwhile(rig: Rig) -> None:
    cid = rig.enqueue()
    worker_a, late = stall_past_the_lease(rig, cid, attempts=2)
    # Worker B takes it over: its request finds A's still in flight (409 in use), it was
    # the last attempt of the budget, and the lookup by key gets "in use" too.
    assert rig.run(cid, attempts=2) is Result.DEAD
    assert charge(cid).dead_outcome == "unknown"  # not "charged", not "not charged"
    worker_a.join()  # then A's request returns 200
    assert late == [Result.LEASE_LOST]

    [book] = rig.books(cid)
    assert book["status"] == "succeeded"
    c = charge(cid)
    assert (c.status, c.provider_charge_id, c.dead_reason, c.dead_outcome) == (
        "succeeded",
        book["id"],
        None,
        None,
    )
    [audit] = settle_audits(cid)
    assert audit["actor"] == "payq" and (audit["params"]["from"], audit["params"]["to"]) == (
        "dead",
        "succeeded",
    )
    # Nothing sent with another key or body: two requests, one key, one charge.
    assert len(rig.requests(cid)) == 2
    assert rig.sim.stats()["charges"] == 1 and rig.sim.stats()["duplicate_charges"] == 0
    # Every request has its row: A's call, B's call, B's lookup.
    calls = attempts(cid)
    assert sorted(a["outcome"] for a in calls) == ["succeeded", "unclear"]
    assert [a["outcome"] for a in attempts(cid, kind="lookup")] == ["unclear"]


def test_a_late_answer_settles_a_retrying_charge_and_the_retry_sends_nothing(rig: Rig) -> None:
    cid = rig.enqueue()
    worker_a, late = stall_past_the_lease(rig, cid, attempts=3)
    assert rig.run(cid, attempts=3) is Result.RETRYING  # B: 409 in use, budget left
    worker_a.join()
    assert late == [Result.LEASE_LOST]
    [book] = rig.books(cid)
    assert (charge(cid).status, charge(cid).provider_charge_id) == ("succeeded", book["id"])
    assert settle_audits(cid)[0]["params"]["from"] == "retrying"
    make_due(cid)
    assert rig.run(cid, attempts=3) is Result.SKIPPED  # the retry message finds it settled
    assert len(rig.requests(cid)) == 2 and rig.sim.stats()["charges"] == 1


def test_a_late_decline_settles_the_charge_as_failed(rig: Rig) -> None:
    cid = rig.enqueue(source="tok_chargeDeclined")
    worker_a, late = stall_past_the_lease(rig, cid, attempts=2)
    assert rig.run(cid, attempts=2) is Result.DEAD
    worker_a.join()
    assert late == [Result.LEASE_LOST]
    [book] = rig.books(cid)
    assert book["status"] == "failed"
    c = charge(cid)
    assert (c.status, c.decline_code, c.provider_charge_id) == (
        "failed",
        "card_declined",
        book["id"],
    )


def test_a_late_answer_that_agrees_with_the_charge_changes_nothing(rig: Rig) -> None:
    """The provider charged A's request at once, but A hears it late (its worker frozen
    with the answer on its way). B's call meanwhile gets the provider's replay of the
    same answer and settles the charge; A's answer then agrees and changes nothing."""
    rig.sim.faults(script=["timeout"], timeout_delay_s=2.0)
    cid = rig.enqueue()
    patient = rig.provider(payment_timeout_ms=5000, charge_lease_s=20)
    a: list[Result] = []
    worker_a = threading.Thread(target=lambda: a.append(rig.run(cid, 3, patient)))
    worker_a.start()
    wait_until(lambda: rig.books(cid), 5, "the provider to charge A's request")
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET lease_expires_at = now() - interval '1 s'"))
    assert rig.run(cid, attempts=3) is Result.SUCCEEDED  # B: the provider's replay
    worker_a.join()
    assert a == [Result.LEASE_LOST]
    [book] = rig.books(cid)
    assert (charge(cid).status, charge(cid).provider_charge_id) == ("succeeded", book["id"])
    assert settle_audits(cid) == []  # nothing to settle: B's own record did
    assert [r["replayed"] for r in rig.requests(cid)] == [False, True]
    assert rig.sim.stats()["charges"] == 1


# --- 2. no charge goes dead with an unknown outcome unlooked ---------------------------


def test_a_timeout_on_the_last_attempt_that_charged_is_succeeded_not_dead(rig: Rig) -> None:
    rig.sim.faults(script=["timeout"], timeout_delay_s=3)  # charged, answered too late
    cid = rig.enqueue()
    assert rig.run(cid) is Result.SUCCEEDED
    [book] = rig.books(cid)
    assert charge(cid).provider_charge_id == book["id"]
    assert [a["outcome"] for a in attempts(cid, kind=None)] == ["no_answer", "succeeded"]


def test_a_reset_on_the_last_attempt_is_verified_not_charged_once_it_cannot_arrive(
    rig: Rig,
) -> None:
    """No answer: the request may still be on its way (a queue, a proxy) until its claim
    plus the lease. A lookup that finds nothing before then proves nothing: dead of
    unknown outcome, looked up again once the request can no longer arrive."""
    rig.sim.faults(script=["reset"])
    cid = rig.enqueue()
    assert rig.run(cid) is Result.DEAD
    assert rig.books(cid) == []
    c = charge(cid)
    assert c.dead_outcome == "unknown" and "may still reach the provider" in (c.dead_reason or "")
    lease_s = rig.settings().charge_lease_s
    assert c.next_lookup_at is not None
    assert c.next_lookup_at <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lease_s)
    lease_passes(cid)
    assert sweep_once(rig.settings(), budget=5, provider=rig.provider()).verified == 1
    c = charge(cid)
    assert c.dead_outcome == "verified_not_charged" and "not charged at the provider" in (
        c.dead_reason or ""
    )


def test_a_final_error_after_an_earlier_unclear_attempt_is_looked_up_first(rig: Rig) -> None:
    rig.sim.faults(script=["timeout", "invalid_request"], timeout_delay_s=3)
    cid = rig.enqueue()
    assert rig.run(cid, attempts=3) is Result.RETRYING  # charged; the answer came too late
    make_due(cid)
    assert rig.run(cid, attempts=3) is Result.SUCCEEDED  # a 400 now, but it was charged
    [book] = rig.books(cid)
    assert charge(cid).provider_charge_id == book["id"]


def test_a_definite_refusal_goes_dead_without_a_lookup(rig: Rig) -> None:
    rig.sim.faults(script=["invalid_request"])
    cid = rig.enqueue()
    assert rig.run(cid) is Result.DEAD
    assert charge(cid).dead_outcome == "not_charged"
    assert attempts(cid, kind="lookup") == []


def test_an_unanswered_lookup_leaves_it_unknown_until_the_sweep_settles_it(rig: Rig) -> None:
    settings = rig.settings()
    rig.sim.faults(script=["timeout"], timeout_delay_s=3, lookup_error_rate=1.0)
    charged = rig.enqueue()
    assert rig.run(charged) is Result.DEAD
    rig.sim.faults(script=["reset"], lookup_error_rate=1.0)
    lost = rig.enqueue()
    assert rig.run(lost) is Result.DEAD
    assert {charge(charged).dead_outcome, charge(lost).dead_outcome} == {"unknown"}
    assert backlog(settings)["unknown"] == 2
    for cid in (charged, lost):  # their requests can no longer arrive: due for a lookup
        lease_passes(cid)

    # The sweep asks while the provider still cannot answer: nothing changes, it waits.
    first = sweep_once(settings, budget=10, provider=rig.provider())
    assert (first.looked_up, first.unknown) == (2, 2)
    assert sweep_once(settings, budget=10, provider=rig.provider()).looked_up == 0  # not due
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET next_lookup_at = now()"))

    rig.sim.faults(lookup_error_rate=0.0)
    second = sweep_once(settings, budget=10, provider=rig.provider())
    assert (second.settled, second.verified) == (1, 1)
    [book] = rig.books(charged)
    assert (charge(charged).status, charge(charged).provider_charge_id) == ("succeeded", book["id"])
    assert rig.books(lost) == [] and charge(lost).dead_outcome == "verified_not_charged"
    assert backlog(settings)["unknown"] == 0
    assert rig.sim.stats()["charges"] == 1  # looked up, never charged again


def test_the_sweep_waits_for_a_fleet_slot_like_any_provider_call(rig: Rig) -> None:
    settings = rig.settings(payment_max_concurrency=1)
    rig.sim.faults(script=["reset"], lookup_error_rate=1.0)
    cid = rig.enqueue()
    assert rig.run(cid) is Result.DEAD
    rig.sim.faults(lookup_error_rate=0.0)
    lease_passes(cid)
    client = redis.Redis.from_url(REDIS_URL)
    elsewhere = ProviderGate(client, settings)  # another process
    gate = ProviderGate(client, settings)
    try:
        passed(elsewhere.enter())  # the fleet's one slot is taken
        lookups = len(attempts(cid, kind="lookup"))
        swept = sweep_once(settings, budget=5, provider=rig.provider(), gate=gate)
        assert swept.looked_up == 0 and swept.waited
        assert len(attempts(cid, kind="lookup")) == lookups  # nothing was sent
        assert charge(cid).next_lookup_at is not None
        assert charge(cid).next_lookup_at <= dt.datetime.now(dt.UTC)  # due again at once
    finally:
        elsewhere.fleet.stop_renewing()
        gate.stop_keeping()
        gate.fleet.stop_renewing()
        client.close()


# --- 3. every answer is stored, whatever its shape; no call unrecorded -----------------


class OddProvider:
    """A provider that answers every charge request with one fixed, odd answer, and
    lookups with ``lookup`` (404 unless changed): a real HTTP server on loopback."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        answer = (status, body, content_type)
        self.requests = 0
        self.lookup = (404, b'{"error": {"type": "invalid_request_error"}}', "application/json")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer(*answer)

            def do_GET(self) -> None:
                self._answer(*outer.lookup)

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OddProvider:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_against(odd: OddProvider, attempts: int = 1) -> tuple[uuid.UUID, Result]:
    settings = load_settings(payment_provider_url=odd.url, retry_max_attempts=attempts)
    cid = enqueue_charge(1999, "usd", "tok_visa", unique_key("odd")).id
    with ProviderClient(settings) as provider:
        return cid, process_charge(str(cid), settings=settings, provider=provider)


def test_a_decline_code_longer_than_its_column_is_recorded_not_looped() -> None:
    code = "do_not_honor_" + "x" * 100
    body = json.dumps({"error": {"type": "card_error", "code": code, "charge": "ch_odd"}})
    with OddProvider(402, body.encode()) as odd:
        cid, result = run_against(odd)
    assert result is Result.FAILED
    c = charge(cid)
    assert (c.status, c.decline_code, c.provider_charge_id) == ("failed", code[:64], "ch_odd")
    [call] = attempts(cid)
    assert (call["outcome"], call["http_status"]) == ("declined", 402)
    assert odd.requests == 1


@pytest.mark.parametrize(
    ("status", "body", "content_type", "outcome"),
    [
        (200, b'{"object": "charge", "id": 4242, "status": "succeeded"}', "application/json",
         "succeeded"),
        (200, b'{"hello": "world"}', "application/json", "unclear"),
        (503, b"<html><body>Service Unavailable</body></html>", "text/html", "unclear"),
        (200, b'{"object": "charge", "id": "ch_' + b"9" * 400 + b'", "status": "succeeded"}',
         "application/json", "succeeded"),
        (502, b"\x00\xffbinary junk", "application/octet-stream", "unclear"),
        (200, b'{"object": "charge", "id": "ch_\\ud800x", "status": "succeeded"}',
         "application/json", "succeeded"),  # a lone surrogate: UTF-8 cannot hold it
        (503, b"y" * (2 * 1024 * 1024), "text/plain", "unclear"),  # read no further than 64 KiB
    ],
)  # fmt: skip
def test_odd_answers_are_recorded_and_classified(
    status: int, body: bytes, content_type: str, outcome: str
) -> None:
    with OddProvider(status, body, content_type) as odd:
        cid, result = run_against(odd)
    [call] = attempts(cid)
    assert (call["outcome"], call["http_status"]) == (outcome, status)
    c = charge(cid)
    if outcome == "succeeded":
        assert result is Result.SUCCEEDED and c.provider_charge_id
        assert len(c.provider_charge_id) <= 255
    else:
        # A 200 that is not a charge, or a 5xx: it may have charged. The last attempt's
        # lookup answered 404: dead, verified not charged, the raw answer kept.
        assert result is Result.DEAD and c.dead_outcome == "verified_not_charged"
        assert call["answer"] and len(call["answer"]) <= 1024 and "\x00" not in call["answer"]


@pytest.mark.parametrize(
    "lookup_body", [b"[" * 100_000 + b"]" * 100_000, b'{"object": "charge", "id": "\\ud800"}']
)
def test_an_odd_lookup_answer_leaves_the_charge_unknown_and_the_sweep_going(
    lookup_body: bytes,
) -> None:
    """Deeply nested JSON, an id UTF-8 cannot hold: the sweep goes on to the next one."""
    with OddProvider(503, b"down", "text/plain") as odd:
        odd.lookup = (200, lookup_body, "application/json")
        cid, result = run_against(odd)
        assert result is Result.DEAD and charge(cid).dead_outcome == "unknown"
        settings = load_settings(payment_provider_url=odd.url)
        with ProviderClient(settings) as provider:
            swept = sweep_once(settings, budget=5, provider=provider)
    assert swept.unknown == 1 and charge(cid).dead_outcome == "unknown"


def test_a_record_the_database_refuses_ends_the_charge_dead_not_in_a_loop(rig: Rig) -> None:
    """Not for being down: the database refuses the row itself (a trigger here)."""
    with transaction() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.answer LIKE '%refuse-me%' THEN RAISE check_violation USING "
                "MESSAGE = 'refused by a test trigger'; END IF; RETURN NEW; END $$; "
                "CREATE TRIGGER refuse_marked BEFORE INSERT OR UPDATE ON charge_attempts "
                "FOR EACH ROW EXECUTE FUNCTION refuse_marked()"
            )
        )
    try:
        with OddProvider(503, b"refuse-me", "text/plain") as odd:
            cid, result = run_against(odd, attempts=3)
    finally:
        with transaction() as conn:
            conn.execute(text("DROP TRIGGER refuse_marked ON charge_attempts"))
            conn.execute(text("DROP FUNCTION refuse_marked()"))
    assert result is Result.DEAD
    c = charge(cid)
    assert c.status == "dead" and "could not be recorded" in (c.dead_reason or "")
    assert c.dead_outcome == "verified_not_charged"  # its lookup answered 404
    [call] = attempts(cid)
    assert call["outcome"] == "unrecorded" and "refused" not in (call["answer"] or "")
    assert odd.requests == 1  # one call, one row; never round again


def test_a_charge_whose_calls_were_never_recorded_goes_dead_without_another(rig: Rig) -> None:
    """Workers that keep dying mid-call, or a record that keeps failing: each claim used
    an attempt. Once they are used, the charge is looked up and ends; nothing is sent."""
    rig.sim.faults(script=["timeout"], timeout_delay_s=3)  # charged, answered too late
    cid = rig.enqueue()
    assert rig.run(cid, attempts=5) is Result.RETRYING
    with transaction() as conn:  # as after three more claims whose workers died mid-call
        conn.execute(
            text(
                "UPDATE charges SET status = 'processing', attempts = 4, "
                "lease_expires_at = now() - interval '1 s' WHERE id = :id"
            ),
            {"id": cid},
        )
    sent = len(rig.requests(cid))
    assert rig.run(cid, attempts=3) is Result.SUCCEEDED  # the lookup found the charge
    assert len(rig.requests(cid)) == sent  # no call: the attempts were used
    [book] = rig.books(cid)
    assert charge(cid).provider_charge_id == book["id"]


class FrozenBeforeSending:
    """A worker frozen (a VM pause) after its claim, before its request leaves."""

    def __init__(self, inner: ProviderClient, frozen_s: float) -> None:
        self.inner = inner
        self.frozen_s = frozen_s

    def create_charge(self, key: str, body: bytes, **send: Any) -> Any:
        time.sleep(self.frozen_s)  # the whole process stands still
        return self.inner.create_charge(key, body, **send)

    def find_charge(self, key: str) -> Any:
        return self.inner.find_charge(key)


def test_a_request_not_sent_by_its_send_by_time_is_not_sent_at_all(rig: Rig) -> None:
    from payq.errors import RequestNotSent

    with pytest.raises(RequestNotSent):
        rig.provider().create_charge("k-late", b"{}", send_by=time.monotonic() - 0.1)
    assert rig.sim.stats()["requests"] == 0  # not a byte reached the provider


def test_a_worker_frozen_between_claim_and_call_past_its_lease_sends_nothing(rig: Rig) -> None:
    """Its lease ran out while frozen: another worker may hold the charge, and the key's
    retention margin counted on the request leaving within the lease."""
    settings = rig.settings(3)
    cid = rig.enqueue()
    frozen_s = settings.charge_lease_s - settings.payment_timeout_s + 0.2
    late = FrozenBeforeSending(rig.provider(), frozen_s)
    result = process_charge(str(cid), settings=settings, provider=late)  # type: ignore[arg-type]
    assert result is Result.NOT_SENT
    assert rig.sim.stats()["requests"] == 0 and rig.books(cid) == []
    [call] = attempts(cid)
    assert call["outcome"] == "not_sent"
    assert charge(cid).status == "processing"  # left to the relay, after its lease
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET lease_expires_at = now() - interval '1 s'"))
    assert rig.run(cid, attempts=3) is Result.SUCCEEDED  # taken up again: sent once
    assert len(rig.requests(cid)) == 1


def test_a_lookup_proves_nothing_while_an_earlier_call_may_still_arrive(rig: Rig) -> None:
    """A (frozen) may still send within its lease; B's reset and 404 prove nothing yet."""
    rig.sim.faults(script=["reset"])
    cid = rig.enqueue()
    with transaction() as conn:  # A's claim: attempt 1, its call in flight, lease expired
        conn.execute(
            text(
                "UPDATE charges SET status = 'processing', attempts = 1, "
                "call_id = gen_random_uuid(), lease_expires_at = now() - interval '1 s' "
                "WHERE id = :id; INSERT INTO charge_attempts (charge_id, number, call_id, "
                "started_at, outcome) SELECT id, 1, call_id, now(), 'in_flight' FROM charges "
                "WHERE id = :id"
            ),
            {"id": cid},
        )
    assert rig.run(cid, attempts=2) is Result.DEAD  # B: reset on the last attempt
    c = charge(cid)
    assert c.dead_outcome == "unknown" and "may still reach the provider" in (c.dead_reason or "")
    assert c.next_lookup_at is not None  # when A's lease has run out
    settings = rig.settings()
    assert sweep_once(settings, budget=5, provider=rig.provider()).looked_up == 0  # not yet
    with transaction() as conn:  # A's lease is long over: its call can no longer arrive
        conn.execute(
            text(
                "UPDATE charge_attempts SET started_at = now() - interval '1 hour'; "
                "UPDATE charges SET next_lookup_at = now()"
            )
        )
    assert sweep_once(settings, budget=5, provider=rig.provider()).verified == 1
    assert charge(cid).dead_outcome == "verified_not_charged"


def test_unknown_outcomes_left_without_a_lookup_time_are_swept(rig: Rig) -> None:
    """Charges made dead of unknown outcome by the migration have no lookup time yet."""
    rig.sim.faults(script=["reset"], lookup_error_rate=1.0)
    cid = rig.enqueue()
    assert rig.run(cid) is Result.DEAD
    lease_passes(cid)
    with transaction() as conn:
        conn.execute(text("UPDATE charges SET next_lookup_at = NULL"))
    rig.sim.faults(lookup_error_rate=0.0)
    settings = rig.settings()
    assert backlog(settings)["overdue"] == 1  # no time at all counts as overdue
    assert sweep_once(settings, budget=5, provider=rig.provider()).verified == 1


# --- 4. key retention with a margin ----------------------------------------------------


def test_no_request_is_sent_inside_the_retention_margin(rig: Rig) -> None:
    settings = rig.settings(3)
    rig.sim.faults(script=["error"])
    cid = rig.enqueue()
    assert rig.run(cid, attempts=3) is Result.RETRYING
    # Due again a few seconds before the key's retention ends: an attempt could still be
    # in flight (its lease, its timeout) when the provider forgets the key.
    almost = settings.provider_idempotency_ttl_s - settings.charge_lease_s / 2
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET created_at = now() - make_interval(secs => :s), "
                "next_attempt_at = now() WHERE id = :id"
            ),
            {"s": almost, "id": cid},
        )
    assert rig.run(cid, attempts=3) is Result.DEAD
    assert len(rig.requests(cid)) == 1  # not sent again
    c = charge(cid)
    assert "key retention" in (c.dead_reason or "") and c.attempts == 1
    # Its 503 did not say; the key is still kept, so the lookup proves it was not charged.
    assert c.dead_outcome == "verified_not_charged"


def test_a_retry_after_beyond_the_send_window_goes_to_the_lookup_not_a_shorter_wait(
    rig: Rig,
) -> None:
    settings = rig.settings(3)
    rig.sim.faults(script=["reset", "rate_limit"], retry_after_s=60)
    cid = rig.enqueue()
    assert rig.run(cid, attempts=3) is Result.RETRYING
    left_s = 20  # the send window closes in 20 s; the provider will ask for 60
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET created_at = now() - make_interval(secs => :s), "
                "next_attempt_at = now() WHERE id = :id"
            ),
            {"s": settings.key_send_window_s - left_s, "id": cid},
        )
    lease_passes(cid)  # the first request (reset) can no longer arrive
    assert rig.run(cid, attempts=3) is Result.DEAD
    c = charge(cid)
    assert "send window" in (c.dead_reason or "") and c.dead_outcome == "verified_not_charged"
    assert len(rig.requests(cid)) == 2


def test_the_retention_margin_is_a_setting_checked_at_start() -> None:
    from payq.errors import ConfigError

    with pytest.raises(ConfigError, match="PROVIDER_IDEMPOTENCY_TTL_S: must exceed"):
        load_settings(provider_idempotency_ttl_s=60, charge_lease_s=59)
    time.sleep(0)  # nothing to wait for: a setting is refused at once
