"""Unit tests for the Redis settings and ``payq.redis_client``: which server a client
goes to, directly or through Sentinel. Building a client opens no connection."""

from __future__ import annotations

import pytest
import redis
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from payq.errors import ConfigError
from payq.redis_client import redis_client
from payq.settings import load_settings
from tests.helpers import clear_payq_env, load_env


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return clear_payq_env(monkeypatch)


load = load_env


def test_no_sentinels_by_default(env: pytest.MonkeyPatch) -> None:
    settings = load(env)
    assert settings.sentinels == ()
    assert settings.redis_sentinel_master == "mymaster"
    assert settings.redis_sentinel_password is None


def test_sentinels_are_host_port_pairs(env: pytest.MonkeyPatch) -> None:
    settings = load(env, REDIS_SENTINELS=" 10.0.0.1:26379, sentinel-b.internal:26380,[::1]:26381, ")
    assert settings.sentinels == (
        ("10.0.0.1", 26379),
        ("sentinel-b.internal", 26380),
        ("::1", 26381),
    )


@pytest.mark.parametrize(
    "value", ["10.0.0.1", "10.0.0.1:", "host:0", "host:65536", "host:port", "a b:1", "h:1;h:2"]
)
def test_a_bad_sentinel_is_refused_in_one_line(env: pytest.MonkeyPatch, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(env, REDIS_SENTINELS=value)
    message = str(refused.value)
    assert message.startswith("REDIS_SENTINELS: ") and "\n" not in message
    assert "host:port" in message


def test_a_bad_master_name_is_refused(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as refused:
        load(env, REDIS_SENTINEL_MASTER="my master")
    assert str(refused.value).startswith("REDIS_SENTINEL_MASTER: must be the name the sentinels")


def test_redis_url_alone_names_the_server(env: pytest.MonkeyPatch) -> None:
    client = redis_client(load(env, REDIS_URL="redis://:pw@10.1.2.3:6390/4"))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "10.1.2.3",
        6390,
        4,
        "pw",
    )
    assert not isinstance(client.connection_pool, SentinelConnectionPool)


def test_with_sentinels_the_primary_comes_from_them(env: pytest.MonkeyPatch) -> None:
    settings = load(
        env,
        REDIS_URL="redis://app:primary-pw@ignored.example:1/3",
        REDIS_SENTINELS="10.0.0.1:26379,10.0.0.2:26379",
        REDIS_SENTINEL_MASTER="payq-main",
        REDIS_SENTINEL_PASSWORD="sentinel-pw",
    )
    client = redis_client(settings, socket_timeout_s=1.5)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "payq-main"
    kwargs = pool.connection_kwargs
    assert "host" not in kwargs and "port" not in kwargs  # the sentinels say where
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", "primary-pw", 3)
    assert kwargs["socket_timeout"] == 1.5
    sentinels = pool.sentinel_manager.sentinels
    addresses = [s.connection_pool.connection_kwargs for s in sentinels]
    assert [(a["host"], a["port"]) for a in addresses] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    sentinel_kwargs = addresses[0]
    assert sentinel_kwargs["password"] == "sentinel-pw"
    assert sentinel_kwargs["socket_timeout"] == 1.5


def test_rediss_with_sentinels_speaks_tls_to_the_primary(env: pytest.MonkeyPatch) -> None:
    settings = load(env, REDIS_URL="rediss://127.0.0.1:6379/0", REDIS_SENTINELS="127.0.0.1:1")
    pool = redis_client(settings).connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection


def test_secrets_stay_out_of_the_client_repr(env: pytest.MonkeyPatch) -> None:
    settings = load(
        env,
        REDIS_URL="redis://:primary-secret@h:1/0",
        REDIS_SENTINELS="127.0.0.1:1",
        REDIS_SENTINEL_PASSWORD="sentinel-secret",
    )
    client = redis_client(settings)
    shown = repr(client) + repr(client.connection_pool)
    assert "primary-secret" not in shown and "sentinel-secret" not in shown


def test_an_unreachable_sentinel_is_a_connection_error(env: pytest.MonkeyPatch) -> None:
    """What every caller already handles as "Redis does not answer"."""
    settings = load(env, REDIS_SENTINELS="127.0.0.1:1")
    with pytest.raises(redis.ConnectionError):
        redis_client(settings, socket_timeout_s=0.5, connect_timeout_s=0.5).ping()


def test_the_cli_names_the_sentinel_settings_when_no_sentinel_names_a_primary(
    env: pytest.MonkeyPatch,
) -> None:
    """Reproduced before: `payq: Redis did not answer (MasterNotFoundError); check Redis and
    REDIS_URL`, though REDIS_URL's host is not used and the fault was the sentinels or
    the primary's name (REDIS_SENTINEL_MASTER's default, mymaster, is a common mismatch)."""
    from devservices import free_port
    from payq.settings import get_settings
    from payq_cli import _unavailable_service

    settings = load(env, REDIS_SENTINELS=f"127.0.0.1:{free_port()}", REDIS_SENTINEL_MASTER="pq")
    client = redis_client(settings, connect_timeout_s=0.5)
    with pytest.raises(redis.ConnectionError) as info:  # nothing listens there: a real refusal
        client.ping()
    client.close()
    get_settings.cache_clear()
    try:
        problem = _unavailable_service(info.value)
    finally:
        get_settings.cache_clear()
    assert problem is not None
    code, line = problem
    assert code == 3
    assert "REDIS_SENTINELS" in line and "REDIS_SENTINEL_MASTER" in line and "'pq'" in line
    assert "check Redis and REDIS_URL" not in line


@pytest.mark.parametrize("password", ["s3ntinelPw\n", "s3ntinelPw\r\n", "s3ntinel\tPw"])
def test_a_sentinel_password_with_a_control_character_is_refused_without_echo(
    env: pytest.MonkeyPatch, password: str
) -> None:
    """A secret file's trailing newline would fail every AUTH to the sentinels with no hint."""
    with pytest.raises(ConfigError) as info:
        load(env, REDIS_SENTINEL_PASSWORD=password)
    message = str(info.value)
    assert message.startswith("REDIS_SENTINEL_PASSWORD: ") and "\n" not in message
    assert "s3ntinel" not in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (" , ,", "names no sentinel"),
        ("10.0.0.1:26379,10.0.0.1:26379", "listed twice"),
        (",".join(f"10.0.0.{n}:26379" for n in range(1, 11)), "at most 9"),
    ],
)
def test_a_sentinel_list_that_cannot_be_meant_is_refused(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_SENTINELS") as refused:
        load_settings(redis_sentinels=value)
    assert expected in str(refused.value)
