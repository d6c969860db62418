"""The fleet's circuit breaker, against real Redis, through the gate."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import pytest

from payq.constants import DeferralCause
from payq.errors import (
    AuthenticationFailed,
    CardDeclined,
    IdempotencyKeyInUse,
    InvalidRequest,
    ProviderConnectionError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from payq.gate import BreakerState, CallOutcome, ProviderGate, Wait, call_outcome
from payq.provider import ProviderCharge
from payq.settings import Settings, load_settings
from tests.conftest import NAMESPACE
from tests.gate.conftest import DECLINED
from tests.helpers import SUCCEEDED, TIMED_OUT, call, passed

FAIL, OK, NEUTRAL = CallOutcome.FAILURE, CallOutcome.SUCCESS, CallOutcome.NEUTRAL
Gates = Callable[[Settings], ProviderGate]


@pytest.fixture
def settings() -> Settings:
    return load_settings(
        payq_namespace=NAMESPACE,
        breaker_min_calls=6,
        breaker_window_s=10,
        breaker_failure_rate=0.5,
        breaker_slow_call_rate=0.8,
        breaker_slow_call_ms=500,
        breaker_open_s=1,
        breaker_half_open_probes=2,
    )


@pytest.fixture
def two(gates: Gates, settings: Settings) -> tuple[ProviderGate, ProviderGate]:
    return gates(settings), gates(settings)


def state(gate: ProviderGate) -> BreakerState:
    return gate.breaker.snapshot().state


def open_it(gate: ProviderGate) -> None:
    for _ in range(6):
        call(gate, TIMED_OUT)
    assert state(gate) is BreakerState.OPEN


def wait_out_the_open_time(gate: ProviderGate) -> None:
    time.sleep(gate.breaker.snapshot().open_for_ms / 1000 + 0.05)


@pytest.mark.parametrize(
    ("outcome", "counts_as"),
    [
        (ProviderCharge("ch_1", "succeeded", 1999, "usd"), OK),
        (ProviderTimeout("no answer within 5000 ms"), FAIL),
        (ProviderConnectionError("connection reset"), FAIL),
        (ProviderUnavailable("503 from the provider", status=503), FAIL),
        (ProviderRateLimited("429", status=429, retry_after_s=2), FAIL),
        (CardDeclined("declined", code="card_declined", provider_charge_id="ch_2"), NEUTRAL),
        (InvalidRequest("bad amount", status=400), NEUTRAL),
        (AuthenticationFailed("bad key", status=401), NEUTRAL),
        # Our own earlier call for this key is still running there: not a sick provider.
        (IdempotencyKeyInUse("in use", status=409), NEUTRAL),
    ],
)
def test_what_counts_as_a_failure(outcome: object, counts_as: CallOutcome) -> None:
    assert call_outcome(outcome) is counts_as  # type: ignore[arg-type]


def test_opens_on_the_failure_rate_only_after_the_minimum_calls(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    for _ in range(5):
        call(a, TIMED_OUT)  # 5 of 5 failed, but under 6 calls
    assert state(b) is BreakerState.CLOSED
    call(b, TIMED_OUT)  # the other process tips it
    snap = a.breaker.snapshot()
    assert snap.state is BreakerState.OPEN and "6 of 6 calls failed" in snap.reason
    assert 0 < snap.open_for_ms <= 1000 and snap.opened == 1
    refused = a.enter()
    assert isinstance(refused, Wait) and refused.cause is DeferralCause.BREAKER_OPEN


def test_stays_closed_below_the_rate_and_on_declines(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, _ = two
    answers = {FAIL: TIMED_OUT, OK: SUCCEEDED, NEUTRAL: DECLINED}
    for outcome in [FAIL, OK, FAIL, OK, NEUTRAL, NEUTRAL, OK, FAIL, NEUTRAL, NEUTRAL] * 3:
        call(a, answers[outcome])  # 30 % failed: under 50 %
        assert state(a) is BreakerState.CLOSED
    a.flush()  # the successes and declines this process kept count of
    snap = a.breaker.snapshot()
    assert snap.state is BreakerState.CLOSED
    assert (snap.window_calls, snap.window_failures) == (30, 9)


def test_opens_on_the_slow_call_rate(two: tuple[ProviderGate, ProviderGate]) -> None:
    a, _ = two
    for _ in range(5):
        call(a, SUCCEEDED, 600)  # all slow, all succeeded
    a.flush()
    assert state(a) is BreakerState.CLOSED  # under the minimum calls
    call(a, SUCCEEDED, 600)
    a.flush()
    assert "6 of 6 calls were slow" in a.breaker.snapshot().reason
    assert state(a) is BreakerState.OPEN


def test_open_refuses_then_half_opens_with_a_fleet_wide_number_of_probes(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    open_it(a)
    refused = b.enter()
    assert isinstance(refused, Wait) and refused.cause is DeferralCause.BREAKER_OPEN
    # Deferred past the open time, spread over a quarter of it so they do not all return.
    assert a.breaker.snapshot().open_for_ms <= refused.delay_ms <= 1000 + 250
    wait_out_the_open_time(a)
    first, second = passed(a.enter()), passed(b.enter())
    assert first.probe and second.probe
    third = a.enter()  # two probes across the fleet, however many processes ask
    assert isinstance(third, Wait) and third.cause is DeferralCause.BREAKER_HALF_OPEN
    a.leave(first, SUCCEEDED, 10)
    assert state(a) is BreakerState.HALF_OPEN
    b.leave(second, SUCCEEDED, 10)
    assert state(a) is BreakerState.CLOSED
    assert not call(a, None).probe  # closed: calls go through, none of them a probe
    # The outage's failures are forgotten: one failure after closing does not reopen it.
    call(a, TIMED_OUT)
    assert a.breaker.snapshot().window_calls == 1 and state(a) is BreakerState.CLOSED


def test_a_failed_probe_reopens_it(two: tuple[ProviderGate, ProviderGate]) -> None:
    a, b = two
    open_it(a)
    wait_out_the_open_time(a)
    assert call(a, TIMED_OUT).probe
    refused = b.enter()
    assert isinstance(refused, Wait) and refused.cause is DeferralCause.BREAKER_OPEN
    assert a.breaker.snapshot().opened == 2


def test_probes_lost_with_their_worker_are_replaced(
    two: tuple[ProviderGate, ProviderGate],
) -> None:
    a, b = two
    for gate in two:
        gate.breaker.rules = dataclasses.replace(gate.breaker.rules, probe_timeout_ms=300)
    open_it(a)
    wait_out_the_open_time(a)
    assert passed(a.enter()).probe and passed(a.enter()).probe  # their worker dies
    assert isinstance(b.enter(), Wait)
    time.sleep(0.35)
    assert passed(b.enter()).probe  # not stuck half-open for ever


def test_an_unused_probe_is_given_back(two: tuple[ProviderGate, ProviderGate]) -> None:
    a, b = two
    open_it(a)
    wait_out_the_open_time(a)
    first, second = passed(a.enter()), passed(a.enter())
    assert first.probe and second.probe and isinstance(b.enter(), Wait)
    a.leave(first, None)  # its charge was already final: no call was made
    assert passed(b.enter()).probe


def test_changes_of_state_are_logged_and_opening_alerts(
    two: tuple[ProviderGate, ProviderGate], caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = two
    with caplog.at_level(logging.INFO, logger="payq.breaker"):
        open_it(a)
        wait_out_the_open_time(a)
        call(a, SUCCEEDED)
        call(a, SUCCEEDED)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "payq.breaker"]
    assert lines[0][0] == logging.ERROR
    assert lines[0][1].startswith("ALERT circuit breaker opened: 6 of 6 calls failed")
    assert [m.split(":")[0] for _, m in lines[1:]] == [
        "circuit breaker half-open",
        "circuit breaker closed",
    ]


def test_probes_are_judged_by_the_failure_rate_not_by_one_unlucky_call(
    gates: Gates, settings: Settings
) -> None:
    a = gates(settings.model_copy(update={"breaker_half_open_probes": 3}))
    open_it(a)
    wait_out_the_open_time(a)
    probes = [passed(a.enter()) for _ in range(3)]
    assert all(p.probe for p in probes)
    a.leave(probes[0], TIMED_OUT, 10)
    assert state(a) is BreakerState.HALF_OPEN  # 1 of 3: under 50 %, keep probing
    a.leave(probes[1], SUCCEEDED, 10)
    assert state(a) is BreakerState.HALF_OPEN
    a.leave(probes[2], SUCCEEDED, 10)
    assert state(a) is BreakerState.CLOSED
    assert "2 of 3 half-open probes succeeded" in a.breaker.snapshot().reason
    open_it(a)
    wait_out_the_open_time(a)
    probes = [passed(a.enter()) for _ in range(3)]
    a.leave(probes[0], TIMED_OUT, 10)
    assert state(a) is BreakerState.HALF_OPEN
    a.leave(probes[1], TIMED_OUT, 10)
    assert state(a) is BreakerState.OPEN  # 2 of 3: at least 50 %
    assert "2 of 3 half-open probes failed" in a.breaker.snapshot().reason
