"""Failover's edges: upgrades, configuration changes, late and lost requests.

Each scenario was found by trying to break the invariants ("never charged by two
groups", "never final while nobody asked", "never stuck") from the providers' side; each
test asserts the invariant on the providers' books. Same setup as tests/test_routing.py:
real PostgreSQL, Redis and two simulators over HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import pytest
from sqlalchemy import text

from payq.db import transaction
from payq.ops.dlq import DeadFilter, replay
from payq.processing import Result
from payq.sweep import sweep_once
from tests import test_routing
from tests.helpers import attempts, charge, lease_passes
from tests.test_routing import Providers, books, enqueue, open_breaker, sent, where

pytestmark = pytest.mark.usefixtures("clean")

#: The fixture: two simulators as providers a and b, and payq's routes to them.
providers = test_routing.providers


def charged_by_both(providers: Providers, cid: uuid.UUID) -> bool:
    ok = lambda bs: [x for x in bs if x["status"] == "succeeded"]  # noqa: E731
    return bool(ok(books(providers.a, cid)) and ok(books(providers.b, cid)))


def as_before_migration_0005(cid: uuid.UUID) -> None:
    """The charge's rows as a payq before migration 0005 left them: no group anywhere."""
    with transaction() as conn:
        conn.execute(
            text("UPDATE charges SET ledger_group = NULL, charged_endpoint = NULL WHERE id = :id"),
            {"id": cid},
        )
        conn.execute(
            text(
                "UPDATE charge_attempts SET ledger_group = NULL, endpoint = NULL "
                "WHERE charge_id = :id"
            ),
            {"id": cid},
        )


# --- 1. a charge in flight across the upgrade to several groups ------------------------


def test_legacy_retrying_charge_after_a_timeout_is_not_sent_to_another_group(
    providers: Providers,
) -> None:
    """A charge that timed out at the one provider payq had before migration 0005 (a
    charged it, then answered late) is retrying with no pin. payq is upgraded and gets a
    second group; a's breaker is open. The charge must not be sent to b."""
    single = providers.routes({"name": "a", "url": providers.a.url})
    providers.a.faults(script=["timeout"], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, single) is Result.RETRYING
    assert len(books(providers.a, cid)) == 1  # a charged it
    as_before_migration_0005(cid)

    routes = providers.routes()  # a, then b
    open_breaker(routes, "a")
    result = providers.run(cid, routes)
    assert not charged_by_both(providers, cid), (result, where(cid))


def test_a_dead_charge_from_before_several_endpoints_is_looked_up_in_the_first_group(
    providers: Providers,
) -> None:
    """Requests recorded without a group (before migration 0005) count as sent to the
    first endpoint's group: the README says to list the provider PAYMENT_PROVIDER_URL
    named first. A charge dead of unknown outcome there is settled by its books."""
    old = providers.routes({"name": "old", "url": providers.a.url}, attempts=1)
    providers.a.faults(script=["timeout"], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, old) is Result.DEAD
    assert charge(cid).dead_outcome == "unknown"
    as_before_migration_0005(cid)
    providers.a.faults(lookup_error_rate=0.0)
    lease_passes(cid)

    routes = providers.routes(
        {"name": "old", "url": providers.a.url},
        {"name": "new", "url": providers.b.url},
        attempts=1,
    )
    assert sweep_once(routes.settings, budget=5, routes=routes).settled == 1  # type: ignore[attr-defined]
    [book] = books(providers.a, cid)
    assert (charge(cid).status, charge(cid).provider_charge_id) == ("succeeded", book["id"])
    assert sent(providers.b, cid) == 0


# --- 2. a soft decline in one group, a charge in the other ----------------------------


def test_sweep_does_not_settle_failed_on_a_soft_decline_when_another_group_charged(
    providers: Providers,
) -> None:
    routes = providers.routes(attempts=2, payment_soft_declines="card_declined")
    providers.a.faults(script=["decline"])  # soft: moves on to b
    providers.b.faults(script=["timeout"], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert providers.run(cid, routes) is Result.DEAD  # b charged it, could not be asked
    assert charge(cid).dead_outcome == "unknown"
    assert len(books(providers.b, cid)) == 1
    providers.b.faults(lookup_error_rate=0.0)
    with transaction() as conn:  # due now (b's request may still arrive: it waits a lease)
        conn.execute(text("UPDATE charges SET next_lookup_at = now() WHERE id = :id"), {"id": cid})

    sweep_once(routes.settings, budget=5, routes=routes)  # type: ignore[attr-defined]
    [book] = books(providers.b, cid)
    c = charge(cid)
    assert (c.status, c.provider_charge_id) == ("succeeded", book["id"]), (
        c.status,
        c.decline_code,
        [(a["endpoint"], a["outcome"]) for a in attempts(cid, kind="lookup")],
    )


# --- 3. a request still on its way to the provider when the lookup says 404 -----------


class DelayingProxy:
    """A TCP proxy in front of a provider that holds each POST for ``delay_s`` before
    passing it on (a load balancer's queue): the client gives up first, the provider
    still gets the request, and charges it, after the client stopped waiting."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.delay_s = delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = self._read_request(conn)
            if not request:
                return
            if request.startswith(b"POST"):
                time.sleep(self.delay_s)
            request = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            with socket.create_connection(self.upstream) as up:
                up.sendall(request)
                answer = b""
                while chunk := up.recv(65536):
                    answer += chunk
            with contextlib.suppress(OSError):  # the client gave up long ago
                conn.sendall(answer)

    def close(self) -> None:
        self.stopped = True
        self.server.close()
        for t in self.threads:
            t.join(10)


def test_a_404_while_a_timed_out_request_is_still_on_its_way_does_not_free_the_charge(
    providers: Providers,
) -> None:
    """a1 and a2 are one account (group acme); a1 is behind a queue that holds POSTs 3 s
    (the client times out at 1.5 s; the lease is 9 s, so by payq's own rule the request may
    still arrive). acme's breakers open; the lookup by key finds nothing *yet*, the pin
    is cleared, b charges; then the queued request reaches acme and charges too."""
    proxy = DelayingProxy(providers.a.url, delay_s=3.0)
    try:
        routes = providers.routes(
            {"name": "a1", "url": proxy.url, "group": "acme"},
            {"name": "a2", "url": providers.a.url, "group": "acme"},
            {"name": "b", "url": providers.b.url},
        )
        cid = enqueue()
        assert providers.run(cid, routes) is Result.RETRYING
        assert where(cid) == [("a1", "acme", "no_answer")]
        open_breaker(routes, "a1")
        open_breaker(routes, "a2")
        result = providers.run(cid, routes)
        time.sleep(3.5)  # the queued request reaches acme
    finally:
        proxy.close()
    assert not charged_by_both(providers, cid), (result, where(cid))


# --- 4. an endpoint renamed or removed from PAYMENT_ENDPOINTS ------------------------


def test_a_charge_pinned_to_a_group_no_longer_configured_does_not_crash_the_worker(
    providers: Providers,
) -> None:
    """An operator renames endpoint a to a-eu (its group defaults to its name) or removes
    it; charges pinned to 'a' meet Routes.enter('a') with no route: min() of nothing."""
    routes = providers.routes()
    providers.a.faults(script=["error"])
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    assert charge(cid).ledger_group == "a"
    renamed = providers.routes(
        {"name": "a-eu", "url": providers.a.url}, {"name": "b", "url": providers.b.url}
    )
    try:
        result = providers.run(cid, renamed)
    except ValueError as exc:
        pytest.fail(f"process_charge raised {exc!r}: the charge can never be processed")
    assert isinstance(result, Result)


def test_moving_from_one_endpoint_to_payment_endpoints_does_not_strand_charges(
    providers: Providers,
) -> None:
    """Before: PAYMENT_PROVIDER_URL (one endpoint, named and grouped 'default'). After:
    PAYMENT_ENDPOINTS with the same provider named 'main'. A charge retrying from before
    is pinned to 'default'; every claim at 'main' is refused, deferred 50-250 ms, forever."""
    before = providers.routes({"name": "default", "url": providers.a.url})
    providers.a.faults(script=["error"])
    cid = enqueue()
    assert providers.run(cid, before) is Result.RETRYING
    assert charge(cid).ledger_group == "default"
    after = providers.routes({"name": "main", "url": providers.a.url})
    results = [providers.run(cid, after) for _ in range(5)]
    assert Result.SUCCEEDED in results, (results, charge(cid).status, charge(cid).ledger_group)


def test_the_sweep_does_not_ask_the_primary_for_a_group_that_was_removed(
    providers: Providers,
) -> None:
    """A charge dead of unknown outcome after b charged it (b could not be asked). b is
    then removed from the config. The sweep asks the primary (a) in b's place: 404,
    'verified not charged', the pin cleared; a replay then charges it at a as well."""
    routes = providers.routes(attempts=2)
    providers.a.faults(script=["rate_limit"], retry_after_s=0)
    providers.b.faults(script=["timeout"], timeout_delay_s=2.5, lookup_error_rate=1.0)
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    open_breaker(routes, "a")
    assert providers.run(cid, routes) is Result.DEAD
    assert charge(cid).dead_outcome == "unknown"
    assert len(books(providers.b, cid)) == 1
    providers.client.delete(routes.all[0].gate.breaker.state_key)

    only_a = providers.routes({"name": "a", "url": providers.a.url}, attempts=2)
    sweep_once(only_a.settings, budget=5, routes=only_a)  # type: ignore[attr-defined]
    if charge(cid).dead_outcome == "verified_not_charged":
        replay(DeadFilter(ids=[cid]), actor="test")
        providers.run(cid, only_a)
    assert not charged_by_both(providers, cid), (charge(cid).status, where(cid))


# --- 5. a charge whose worker died mid-claim, its group down ---------------------------


def test_a_crashed_claim_pinned_to_a_down_group_moves_on_a_404(providers: Providers) -> None:
    """README: 'while the group's breakers are open the charge is looked up there first
    and moves only on no such charge'. A charge whose worker died after its claim (status
    processing, lease over, its request never sent) is looked up, a says 404, and the
    pin stays anyway: _UNPIN wants pending or retrying."""
    routes = providers.routes()
    providers.a.faults(script=["error"])
    cid = enqueue()
    assert providers.run(cid, routes) is Result.RETRYING
    # A worker claimed it at a, wrote its call's row, and died before sending (its lease,
    # and the time its request could still have arrived, are long over).
    call_id = uuid.uuid4()
    with transaction() as conn:
        conn.execute(
            text(
                "UPDATE charges SET status = 'processing', attempts = attempts + 1, "
                "call_id = :call, lease_expires_at = now() - interval '60 s' WHERE id = :id"
            ),
            {"id": cid, "call": call_id},
        )
        conn.execute(
            text(
                "INSERT INTO charge_attempts (charge_id, number, call_id, kind, started_at, "
                "outcome, endpoint, ledger_group) SELECT id, attempts, call_id, 'charge', "
                "now() - interval '70 s', 'in_flight', 'a', 'a' FROM charges WHERE id = :id"
            ),
            {"id": cid},
        )
    open_breaker(routes, "a")
    results = [providers.run(cid, routes) for _ in range(3)]
    assert Result.SUCCEEDED in results, (results, charge(cid).status, charge(cid).ledger_group)
    assert sent(providers.b, cid) == 1
