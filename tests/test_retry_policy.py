"""Unit tests for ``payq.retry_policy``: backoff with full jitter and a Retry-After floor."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payq.retry_policy import RetryPolicy
from payq.settings import load_settings


def expected_cap(policy: RetryPolicy, attempts_made: int) -> float:
    """The jitter ceiling: backoff_min_s doubled per attempt made, up to backoff_max_s."""
    return min(policy.backoff_max_s, policy.backoff_min_s * 2 ** (attempts_made - 1))


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    low = draw(st.floats(min_value=0.001, max_value=3600))
    high = draw(st.floats(min_value=low, max_value=86_400))
    return RetryPolicy(
        max_attempts=draw(st.integers(1, 100)), backoff_min_s=low, backoff_max_s=high
    )


@given(policy=policies(), attempts_made=st.integers(1, 50), seed=st.integers(0, 2**32))
def test_delay_stays_between_min_and_the_doubling_cap(
    policy: RetryPolicy, attempts_made: int, seed: int
) -> None:
    delay = policy.delay_s(attempts_made, rng=random.Random(seed))
    assert policy.backoff_min_s <= delay <= expected_cap(policy, attempts_made)


@given(
    policy=policies(),
    attempts_made=st.integers(1, 50),
    seed=st.integers(0, 2**32),
    retry_after_s=st.floats(min_value=0, max_value=200_000),
)
def test_retry_after_is_a_floor_never_shortened(
    policy: RetryPolicy, attempts_made: int, seed: int, retry_after_s: float
) -> None:
    delay = policy.delay_s(attempts_made, retry_after_s=retry_after_s, rng=random.Random(seed))
    assert delay >= retry_after_s
    assert delay >= policy.backoff_min_s
    # The floor only lifts the delay; it never adds more than the jittered backoff allows.
    assert delay <= max(retry_after_s, expected_cap(policy, attempts_made))


def test_retry_after_beyond_backoff_max_is_honoured() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_min_s=1, backoff_max_s=10)
    for attempts_made in (1, 2, 5, 40):
        assert policy.delay_s(attempts_made, retry_after_s=120.0) == 120.0


def test_first_retry_waits_exactly_backoff_min() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_min_s=0.5, backoff_max_s=60)
    assert {policy.delay_s(1) for _ in range(20)} == {0.5}


@pytest.mark.parametrize(
    ("attempts_made", "cap"), [(2, 2.0), (3, 4.0), (5, 16.0), (9, 256.0), (10, 300.0), (50, 300.0)]
)
def test_cap_doubles_per_attempt_up_to_backoff_max(attempts_made: int, cap: float) -> None:
    """Full jitter: many seeded draws cover most of [min, cap] and never leave it."""
    policy = RetryPolicy(max_attempts=100, backoff_min_s=1, backoff_max_s=300)
    rng = random.Random(1234)
    draws = [policy.delay_s(attempts_made, rng=rng) for _ in range(500)]
    assert min(draws) >= 1
    assert max(draws) <= cap
    span = cap - 1
    assert max(draws) > 1 + 0.95 * span
    assert min(draws) < 1 + 0.05 * span


def test_jitter_varies_between_calls() -> None:
    policy = RetryPolicy(max_attempts=8, backoff_min_s=1, backoff_max_s=300)
    delays = [policy.delay_s(6) for _ in range(50)]  # the module's own random source
    assert len(set(delays)) > 40


def test_same_seed_gives_same_delay() -> None:
    policy = RetryPolicy(max_attempts=8, backoff_min_s=1, backoff_max_s=300)
    first = [policy.delay_s(n, rng=random.Random(7)) for n in range(1, 10)]
    again = [policy.delay_s(n, rng=random.Random(7)) for n in range(1, 10)]
    assert first == again


@pytest.mark.parametrize(
    ("max_attempts", "attempts_made", "exhausted"),
    [(3, 0, False), (3, 2, False), (3, 3, True), (3, 4, True), (1, 0, False), (1, 1, True)],
)
def test_exhausted_boundary(max_attempts: int, attempts_made: int, exhausted: bool) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, backoff_min_s=1, backoff_max_s=2)
    assert policy.exhausted(attempts_made) is exhausted


def test_from_settings_maps_the_retry_settings() -> None:
    settings = load_settings(
        _env_file=None, retry_max_attempts=7, retry_backoff_min_s=0.25, retry_backoff_max_s=42.5
    )
    assert RetryPolicy.from_settings(settings) == RetryPolicy(
        max_attempts=7, backoff_min_s=0.25, backoff_max_s=42.5
    )


def test_policy_is_keyword_only_and_frozen() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_min_s=1, backoff_max_s=2)
    with pytest.raises(TypeError):
        RetryPolicy(3, 1, 2)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        policy.max_attempts = 4  # type: ignore[misc]
