"""The provider client against the simulator over HTTP: every row of provider-api.md."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import cast

import pytest
from pydantic import SecretStr

from payq import errors
from payq.deadline import SendWindowClosed
from payq.provider import ProviderClient, charge_body
from payq.settings import load_settings
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim

BODY = charge_body(
    charge_id="c1", amount=1999, currency="usd", source="tok_visa", description=None, metadata={}
)


@pytest.fixture
def sim() -> Iterator[Sim]:
    with SimulatorThread(api_key=API_KEY) as thread:
        yield Sim(thread.url)


_open: list[ProviderClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def client(sim: Sim, **overrides: object) -> ProviderClient:
    made = ProviderClient(load_settings(payment_provider_url=sim.url, **overrides))
    _open.append(made)
    return made


def test_200_is_a_charge(sim: Sim) -> None:
    charge = client(sim).create_charge("k-ok", BODY)
    assert charge.status == "succeeded" and charge.id.startswith("ch_")
    assert charge.amount == 1999


def test_same_key_same_body_is_replayed_not_charged_again(sim: Sim) -> None:
    c = client(sim)
    first, second = c.create_charge("k-replay", BODY), c.create_charge("k-replay", BODY)
    assert first.id == second.id
    assert sim.stats()["charges"] == 1


@pytest.mark.parametrize(
    ("step", "error", "status"),
    [
        ("decline", errors.CardDeclined, 402),
        ("invalid_request", errors.InvalidRequest, 400),
        ("auth", errors.AuthenticationFailed, 401),
        ("key_in_use", errors.IdempotencyKeyInUse, 409),
        ("key_reused", errors.IdempotencyKeyReused, 409),
        ("rate_limit", errors.ProviderRateLimited, 429),
        ("error", errors.ProviderUnavailable, 503),
        ("bad_body", errors.ProviderUnavailable, 200),
        ("unexpected_status", errors.ProviderUnavailable, 418),
    ],
)
def test_each_answer_maps_to_its_outcome(
    sim: Sim, step: str, error: type[errors.ProviderError], status: int
) -> None:
    sim.faults(script=[step])
    with pytest.raises(error) as caught:
        client(sim).create_charge(f"k-{step}", BODY)
    assert caught.value.status == status
    retryable = isinstance(caught.value, errors.RetryableProviderError)
    assert retryable == (
        step in {"key_in_use", "rate_limit", "error", "bad_body", "unexpected_status"}
    )


def test_decline_carries_code_and_provider_charge() -> None:
    with SimulatorThread(api_key=API_KEY) as thread:
        sim = Sim(thread.url)
        body = charge_body(
            charge_id="c2",
            amount=500,
            currency="eur",
            source="tok_chargeDeclinedInsufficientFunds",
            description="x",
            metadata={},
        )
        with pytest.raises(errors.CardDeclined) as caught:
            client(sim).create_charge("k-funds", body)
    assert caught.value.code == "insufficient_funds"
    assert caught.value.provider_charge_id and caught.value.provider_charge_id.startswith("ch_")


def test_429_carries_retry_after(sim: Sim) -> None:
    sim.faults(script=["rate_limit"], retry_after_s=7)
    with pytest.raises(errors.ProviderRateLimited) as caught:
        client(sim).create_charge("k-429", BODY)
    assert caught.value.retry_after_s == 7


def test_wrong_api_key_is_an_authentication_failure(sim: Sim) -> None:
    with pytest.raises(errors.AuthenticationFailed, match="PAYMENT_PROVIDER_API_KEY"):
        client(sim, payment_provider_api_key="sk_wrong_key").create_charge("k-auth", BODY)


def test_reset_is_a_connection_error(sim: Sim) -> None:
    sim.faults(script=["reset"])
    with pytest.raises(errors.ProviderConnectionError):
        client(sim).create_charge("k-reset", BODY)


def test_nobody_listening_is_a_connection_error() -> None:
    c = client(Sim("http://127.0.0.1:9"))
    with pytest.raises(errors.ProviderConnectionRefused) as charging:
        c.create_charge("k-refused", BODY)
    # No connection: not one byte of the request left, so it charged nothing.
    assert "nothing was sent" in str(charging.value)
    assert "may or may not" not in str(charging.value)
    assert charging.value.error_class == "connection_error"
    with pytest.raises(errors.ProviderConnectionError) as looking:
        c.find_charge("k-refused")  # a lookup charges nothing: it does not say it might have
    assert "may or may not" not in str(looking.value)


def test_timeout_after_charging_then_retry_is_one_charge(sim: Sim) -> None:
    sim.faults(script=["timeout"], timeout_delay_s=5)
    c = client(sim, payment_timeout_ms=500, payment_connect_timeout_ms=200)
    with pytest.raises(errors.ProviderTimeout):
        c.create_charge("k-timeout", BODY)
    again = c.create_charge("k-timeout", BODY)
    assert again.status == "succeeded"
    assert sim.stats()["charges"] == 1
    assert sim.stats()["duplicate_charges"] == 0


def test_trickling_response_ends_at_the_deadline(sim: Sim) -> None:
    # Each byte arrives well within a read timeout; only a deadline ends the call.
    sim.faults(script=["trickle"], trickle_duration_s=6)
    c = client(sim, payment_timeout_ms=800, payment_connect_timeout_ms=200)
    started = time.monotonic()
    with pytest.raises(errors.ProviderTimeout):
        c.create_charge("k-trickle", BODY)
    elapsed = time.monotonic() - started
    assert 0.7 < elapsed < 2.0, f"call took {elapsed:.2f} s; the deadline is 0.8 s, the body 6 s"


def test_find_charge_by_key(sim: Sim) -> None:
    c = client(sim)
    assert c.find_charge("k-none") is None
    made = c.create_charge("k-find", BODY)
    found = c.find_charge("k-find")
    assert found is not None and found.id == made.id


def test_malformed_answers_are_provider_errors_not_crashes() -> None:
    import httpx

    from payq.provider import classify

    cases = [
        httpx.Response(429, headers={"Retry-After": "soon"}),
        httpx.Response(429, headers={"Retry-After": "inf"}),
        httpx.Response(200, content=b"\xff\xfe not json"),
        httpx.Response(200, json={"object": "charge", "id": None, "status": "succeeded"}),
        httpx.Response(503, content=b"<html><body>Service Unavailable</body></html>"),
        httpx.Response(402, json={"error": "not an object"}),
        httpx.Response(409, json={"error": {"code": "something_new"}}),
    ]
    for response in cases:
        with pytest.raises(errors.ProviderError) as caught:
            classify(response)
        assert caught.value.status == response.status_code
        retryable = isinstance(caught.value, errors.RetryableProviderError)
        assert retryable or isinstance(caught.value, errors.CardDeclined)


def test_odd_but_whole_answers_are_normalized_to_what_payq_keeps() -> None:
    import httpx

    from payq.provider import CHARGE_ID_LIMIT, CODE_LIMIT, classify

    odd_amount = classify(
        httpx.Response(
            200, json={"object": "charge", "id": 4242, "status": "succeeded", "amount": "12.5"}
        )
    )
    assert (odd_amount.id, odd_amount.amount) == ("4242", 0)  # charged: a number id is an id
    long_id = classify(
        httpx.Response(
            200, json={"object": "charge", "id": "ch_" + "x" * 400, "status": "succeeded"}
        )
    )
    assert len(long_id.id) == CHARGE_ID_LIMIT
    with pytest.raises(errors.CardDeclined) as declined:
        classify(
            httpx.Response(
                402,
                json={"error": {"type": "card_error", "code": "do_not_honor_" + "z" * 100,
                                "charge": {"id": 1},
                                "message": "no\x00pe"}},
            )
        )  # fmt: skip
    assert len(declined.value.code) == CODE_LIMIT and declined.value.provider_charge_id is None
    assert "\x00" not in str(declined.value)
    # A 402 that is no card error (a middlebox's page) is not a decline: it says nothing.
    with pytest.raises(errors.ProviderUnavailable):
        classify(httpx.Response(402, content=b"<html>Payment Required</html>"))
    with pytest.raises(errors.ProviderUnavailable) as html:
        classify(httpx.Response(503, content=b"<html>\x00 down </html>" + b"y" * 5000))
    assert html.value.answer is not None and len(html.value.answer) <= 1024
    assert html.value.answer.startswith("<html>") and "\x00" not in html.value.answer


def test_an_api_key_that_cannot_be_sent_never_appears_in_the_error(sim: Sim) -> None:
    from payq.settings import Settings

    settings = load_settings(payment_provider_url=sim.url)
    bad = settings.model_copy(update={"payment_provider_api_key": SecretStr("sk_bad\nkey")})
    c = ProviderClient(cast(Settings, bad))
    _open.append(c)
    with pytest.raises(errors.ProviderConnectionError) as caught:
        c.create_charge("k-badkey", BODY)
    assert "sk_bad" not in str(caught.value) and caught.value.__cause__ is None


@pytest.mark.parametrize(
    "retry_after", ["soon", "inf", "nan", "-5", "Wed, 99 Foo 2026 00:00:00 GMT", "1e400"]
)
def test_a_malformed_retry_after_is_ignored_or_bounded(retry_after: str) -> None:
    from payq.provider import _retry_after_s

    seconds = _retry_after_s(retry_after)
    assert seconds is None or 0 <= seconds <= 3600


class _Recorded:
    """What a socket was asked to write, write by write (a pure unit test of the stream)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writes.append(buffer)

    def close(self) -> None:
        self.closed = True


def test_a_request_goes_out_whole_in_one_write_or_not_at_all() -> None:
    """A process frozen between a request's head and its body must not hold a half-sent
    request open at the provider past its fleet slot: the head waits for the body."""
    from payq.deadline import _DeadlineStream, deadline

    inner = _Recorded()
    stream = _DeadlineStream(inner)  # type: ignore[arg-type]
    head = b"POST /v1/charges HTTP/1.1\r\nHost: p\r\nContent-Length: 11\r\n\r\n"
    stream.write(head)
    assert inner.writes == []  # held: the body is not there yet
    stream.write(b'{"amount":1')
    assert inner.writes == [head + b'{"amount":1']
    lookup = b"GET /v1/charges?idempotency_key=k HTTP/1.1\r\nHost: p\r\n\r\n"
    stream.write(lookup)  # no body: out at once
    assert inner.writes[-1] == lookup
    chunked = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    stream.write(chunked)
    stream.write(b"5\r\nhello\r\n")
    stream.write(b"0\r\n\r\n")
    assert inner.writes[-3:] == [chunked, b"5\r\nhello\r\n", b"0\r\n\r\n"]
    # Frozen past the send window between head and body: nothing of it was sent.
    with deadline(5, send_by=time.monotonic() - 1), pytest.raises(SendWindowClosed):
        stream.write(head)
        stream.write(b'{"amount":1')
    assert inner.writes[-1] == b"0\r\n\r\n" and inner.closed


def test_a_404_that_is_not_the_providers_own_proves_nothing(sim: Sim) -> None:
    """A wrong base URL or a proxy's 404 page must not read as "no such charge": that is
    the proof that lets a charge go to another ledger group."""
    from tests.test_ledger_truth import OddProvider

    with OddProvider(503, b"{}") as odd:  # an ingress's default backend, say
        odd.lookup = (404, b"<html>404 page not found</html>", "text/html")
        with pytest.raises(errors.ProviderUnavailable, match="404 without the provider's error"):
            client(Sim(odd.url)).find_charge("k-proxy-404")
    assert client(sim).find_charge("k-never-sent") is None  # the provider's own 404


def test_an_answer_that_echoes_the_api_key_is_stored_without_it() -> None:
    """A proxy that echoes the request's headers back must not put the key in a log line,
    an error or a dead-letter record."""
    from tests.test_ledger_truth import OddProvider

    echo = f'{{"error": {{"type": "api_error", "auth": "Bearer {API_KEY}"}}}}'.encode()
    with OddProvider(503, echo) as odd:
        c = client(Sim(odd.url))
        with pytest.raises(errors.ProviderUnavailable) as caught:
            c.create_charge("k-echo", BODY)
    assert API_KEY not in str(caught.value) and API_KEY not in (caught.value.answer or "")
    assert "Bearer ***" in (caught.value.answer or "")
