"""Unit tests for ``payq.endpoints``: PAYMENT_ENDPOINTS read, defaulted and refused."""

from __future__ import annotations

import json

import pytest

from payq.endpoints import DEFAULT_ENDPOINT
from payq.errors import ConfigError
from payq.settings import load_settings

SECRET = "sk_live_do_not_print_me"


def endpoints(value: object, **settings: object) -> tuple:
    raw = value if isinstance(value, str) else json.dumps(value)
    return load_settings(_env_file=None, payment_endpoints=raw, **settings).endpoints


def test_without_payment_endpoints_the_provider_settings_make_one_endpoint() -> None:
    settings = load_settings(
        _env_file=None, payment_provider_url="http://127.0.0.1:9", payment_provider_api_key="k"
    )
    (only,) = settings.endpoints
    assert (only.name, only.group, only.url) == (
        DEFAULT_ENDPOINT,
        DEFAULT_ENDPOINT,
        "http://127.0.0.1:9",
    )
    assert only.settings is settings
    assert only.key_scope is None  # the gate's Redis keys stay where they always were


def test_each_endpoint_takes_the_settings_it_does_not_override() -> None:
    eu, us, backup = endpoints(
        [
            {"name": "backup", "url": "http://b", "api_key": SECRET, "priority": 3},
            {"name": "us", "url": "http://u", "group": "acme", "timeout_ms": 1500},
            {"name": "eu", "url": "http://e", "group": "acme", "priority": 1, "weight": 3},
        ],
        payment_provider_api_key="shared",
        payment_connect_timeout_ms=1000,
        breaker_open_s=7,
    )
    assert [e.name for e in (eu, us, backup)] == ["eu", "us", "backup"]  # by priority
    assert (eu.group, us.group, backup.group) == ("acme", "acme", "backup")
    assert (eu.priority, us.priority, eu.weight) == (1, 2, 3)  # us: its place in the list
    assert us.settings.payment_timeout_ms == 1500
    assert eu.settings.payment_timeout_ms == load_settings(_env_file=None).payment_timeout_ms
    assert eu.settings.breaker_open_s == 7
    assert eu.settings.payment_provider_api_key.get_secret_value() == "shared"
    assert backup.settings.payment_provider_api_key.get_secret_value() == SECRET
    assert {e.key_scope for e in (eu, us, backup)} == {"ep:eu", "ep:us", "ep:backup"}


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("not json", "PAYMENT_ENDPOINTS: not valid JSON"),
        ([], "must be a non-empty JSON list"),
        ([3], "entry 1: must be a JSON object"),
        ([{"name": "eu"}], "entry 1: url: Field required"),
        ([{"name": "EU!", "url": "http://e"}], "entry 1: name: must be 1-32 lower-case"),
        ([{"name": "eu", "url": "ftp://e"}], "entry 1: url: must be an http:// or https:// URL"),
        ([{"name": "eu", "url": "http://e", "timout_ms": 9}], "entry 1: timout_ms: unknown field"),
        ([{"name": "eu", "url": "http://e", "weight": 0}], "entry 1: weight: Input should be"),
        (
            [{"name": "eu", "url": "http://e"}, {"name": "eu", "url": "http://f"}],
            "endpoint names must differ (eu twice)",
        ),
        (
            [{"name": "eu", "url": "http://e", "timeout_ms": 90000}],
            "entry 1 (eu): CHARGE_LEASE_S: must exceed one attempt's worst case",
        ),
        (
            [{"name": "eu", "url": "http://e", "api_key": SECRET + " \n"}],
            "entry 1 (eu): PAYMENT_PROVIDER_API_KEY: contains a space",
        ),
    ],
)
def test_a_wrong_payment_endpoints_stops_with_one_line_that_shows_no_key(
    value: object, said: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        endpoints(value)
    message = str(caught.value)
    assert said in message
    assert "\n" not in message
    assert SECRET not in message


def test_soft_declines_are_off_unless_listed() -> None:
    assert load_settings(_env_file=None).soft_declines == frozenset()
    listed = load_settings(
        _env_file=None, payment_soft_declines="insufficient_funds, card_declined"
    )
    assert listed.soft_declines == {"insufficient_funds", "card_declined"}
    with pytest.raises(ConfigError, match="PAYMENT_SOFT_DECLINES: must be decline codes"):
        load_settings(_env_file=None, payment_soft_declines="Card Declined!")
