"""Unit tests for ``payq.endpoints``: PAYMENT_ENDPOINTS read, defaulted and refused."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import SecretStr

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


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://[::1]:8311x", "url: is not a usable URL"),
        ("http://user:" + SECRET + "@127.0.0.1:8099", "url: must not hold credentials"),
        ("http://127.0.0.1:8099/?x=1", "url: must be a base URL, without ? or #"),
        ("http://127.0.0.1:8099#f", "url: must be a base URL, without ? or #"),
        ("http://127.0.0.1:99999", "url: has a port outside 1-65535"),
        ("http://h/" + "p" * 2100, "url: is longer than 2048 characters"),
    ],
)
def test_an_endpoint_url_payq_could_not_call_is_refused_at_start(url: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        endpoints([{"name": "eu", "url": url}])
    assert said in str(caught.value) and SECRET not in str(caught.value)
    with pytest.raises(ConfigError, match="PAYMENT_PROVIDER_URL: "):
        load_settings(_env_file=None, payment_provider_url=url)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ([{"name": "eu", "url": "http://e", "api_key": ""}], "entry 1: api_key:"),
        ([{"name": "eu", "url": "http://e", "priority": True}], "entry 1: priority:"),
        ([{"name": "eu", "url": "http://e", "weight": "3"}], "entry 1: weight:"),
        ('[{"name": "eu", "url": "http://e", "name": "us"}]', "a field is given twice"),
        ([{"name": f"e{i}", "url": "http://e"} for i in range(33)], "at most 32 endpoints"),
        ([{"name": "eu", "url": "http://e", "breaker_open_s": 10**9}], "breaker_open_s:"),
    ],
)
def test_an_endpoint_field_is_taken_as_written_or_refused(value: object, said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        endpoints(value)


def test_every_endpoint_needs_a_key_of_its_own_or_the_shared_one() -> None:
    keyed = load_settings(
        _env_file=None,
        payment_provider_api_key=None,
        payment_endpoints=json.dumps(
            [
                {"name": "eu", "url": "http://e", "api_key": SECRET},
                {"name": "us", "url": "http://u"},
            ]
        ),
    )
    with pytest.raises(ConfigError, match=r"is not set for endpoint us;.*api_key in PAYMENT_END"):
        keyed.require_provider_key("a worker")
    both = keyed.model_copy(update={"payment_provider_api_key": SecretStr("sk_shared_key")})
    both.require_provider_key("a worker")  # us takes the shared key
    assert SECRET in keyed.secret_values()  # masked in logs and Sentry events


def test_declines_never_worth_trying_elsewhere_cannot_be_made_soft() -> None:
    with pytest.raises(ConfigError, match="stolen_card may not move to another acquirer"):
        load_settings(_env_file=None, payment_soft_declines="try_again_later,stolen_card")
    assert load_settings(_env_file=None, payment_soft_declines="do-not-honor").soft_declines == {
        "do-not-honor"
    }
