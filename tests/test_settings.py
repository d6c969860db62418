"""Unit tests for ``payq.settings`` and how the CLI reports a bad setting.

The suite's conftest puts its own values in the environment (PAYMENT_TIMEOUT_MS=1500 and
so on); ``clean_env`` removes every payq variable so each test sees only what it sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from payq.errors import ConfigError
from payq.settings import Settings
from tests.helpers import clear_payq_env, load_env


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return clear_payq_env(monkeypatch)


load = load_env


def env_id(value: object) -> str | None:
    if isinstance(value, dict):
        return ",".join(f"{name}={v}" for name, v in value.items())
    return None


def config_error(env: pytest.MonkeyPatch, **variables: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(env, **variables)
    message = str(info.value)
    assert "\n" not in message  # one line on stderr
    return message


# --- defaults ------------------------------------------------------------------------------


def test_defaults_match_design(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(clean_env)
    assert settings.payment_timeout_ms == 5000
    assert settings.payment_pool_max_connections == 5
    assert settings.db_timeout_ms == 3000
    assert settings.database_pool_max_connections == 10
    assert settings.health_check_interval_s == 30
    assert settings.provider_idempotency_ttl_s == 86_400  # the provider keeps keys 24 h
    assert settings.payment_timeout_s == 5.0


def test_defaults_pass_the_worker_pool_check(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(clean_env)
    settings.check_worker_pools(settings.worker_threads)


def test_environment_overrides_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(
        clean_env, PAYMENT_TIMEOUT_MS="2500", LOG_FORMAT="json", RETRY_BACKOFF_MAX_S="2.5"
    )
    assert settings.payment_timeout_ms == 2500
    assert settings.log_format == "json"
    assert settings.retry_backoff_max_s == 2.5


def test_settings_are_frozen(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(clean_env)
    with pytest.raises(ValueError, match="frozen"):
        settings.payment_timeout_ms = 1  # type: ignore[misc]


# --- bad values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "name", "allowed"),
    [
        ({"PAYMENT_TIMEOUT_MS": "abc"}, "PAYMENT_TIMEOUT_MS", "valid integer"),
        ({"PAYMENT_TIMEOUT_MS": "1.5"}, "PAYMENT_TIMEOUT_MS", "valid integer"),
        ({"PAYMENT_TIMEOUT_MS": ""}, "PAYMENT_TIMEOUT_MS", "valid integer"),
        ({"PAYMENT_TIMEOUT_MS": "99"}, "PAYMENT_TIMEOUT_MS", "greater than or equal to 100"),
        ({"PAYMENT_TIMEOUT_MS": "600001"}, "PAYMENT_TIMEOUT_MS", "less than or equal to 600000"),
        ({"DB_TIMEOUT_MS": "-1"}, "DB_TIMEOUT_MS", "greater than or equal to 100"),
        (
            {"DATABASE_POOL_MAX_CONNECTIONS": "0"},
            "DATABASE_POOL_MAX_CONNECTIONS",
            "greater than or equal to 1",
        ),
        (
            {"PAYMENT_POOL_MAX_CONNECTIONS": "1001"},
            "PAYMENT_POOL_MAX_CONNECTIONS",
            "less than or equal to 1000",
        ),
        ({"HEALTH_CHECK_INTERVAL_S": "0"}, "HEALTH_CHECK_INTERVAL_S", "greater than or equal to 1"),
        (
            {"PROVIDER_IDEMPOTENCY_TTL_S": "59"},
            "PROVIDER_IDEMPOTENCY_TTL_S",
            "greater than or equal to 60",
        ),
        ({"RETRY_BACKOFF_MIN_S": "0"}, "RETRY_BACKOFF_MIN_S", "greater than 0"),
        ({"RETRY_BACKOFF_MAX_S": "soon"}, "RETRY_BACKOFF_MAX_S", "valid number"),
        ({"BREAKER_FAILURE_RATE": "1.5"}, "BREAKER_FAILURE_RATE", "less than or equal to 1"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "'console' or 'json'"),
        (
            {"WORKER_HEARTBEAT_S": "2", "TAKEOVER_AFTER_S": "3"},
            "TAKEOVER_AFTER_S",
            "at least 2 x WORKER_HEARTBEAT_S",
        ),
        ({"WORKER_HEARTBEAT_S": "0"}, "WORKER_HEARTBEAT_S", "greater than or equal to 0.1"),
        ({"PAYQ_NAMESPACE": "has space"}, "PAYQ_NAMESPACE", "1-64 letters"),
        ({"LOG_LEVEL": "TRACE"}, "LOG_LEVEL", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ({"DATABASE_URL": "mysql://payq@127.0.0.1/payq"}, "DATABASE_URL", "postgresql"),
        ({"REDIS_URL": "http://127.0.0.1:6379/0"}, "REDIS_URL", "redis"),
        ({"PAYMENT_PROVIDER_URL": "ftp://provider.example"}, "PAYMENT_PROVIDER_URL", "http"),
        (
            {"PAYMENT_CONNECT_TIMEOUT_MS": "5001"},
            "PAYMENT_CONNECT_TIMEOUT_MS",
            "must not exceed PAYMENT_TIMEOUT_MS",
        ),
        (
            {"RETRY_BACKOFF_MIN_S": "10", "RETRY_BACKOFF_MAX_S": "5"},
            "RETRY_BACKOFF_MIN_S",
            "must not exceed RETRY_BACKOFF_MAX_S",
        ),
        # Default attempt: PAYMENT_TIMEOUT_MS 5 s + 2 x (DB_TIMEOUT_MS 3 s + statements 5 s).
        ({"CHARGE_LEASE_S": "21"}, "CHARGE_LEASE_S", "must exceed one attempt's worst case"),
        (
            {"PAYMENT_TIMEOUT_MS": "20000", "CHARGE_LEASE_S": "36"},
            "CHARGE_LEASE_S",
            "= 36 s",
        ),
        (
            {"PAYMENT_PROVIDER_API_KEY": "sk_live_abc\n"},
            "PAYMENT_PROVIDER_API_KEY",
            "set the bare key",
        ),
    ],
    ids=env_id,
)
def test_bad_value_names_the_variable_and_what_is_allowed(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str], name: str, allowed: str
) -> None:
    message = config_error(clean_env, **variables)
    assert message.startswith(f"{name}: ")
    assert allowed in message


@pytest.mark.parametrize(
    "variables",
    [
        {"PAYMENT_CONNECT_TIMEOUT_MS": "5000"},  # equal to the total: allowed
        {"RETRY_BACKOFF_MIN_S": "5", "RETRY_BACKOFF_MAX_S": "5"},
        {"CHARGE_LEASE_S": "22"},  # just above the 21 s worst case
        {"WORKER_HEARTBEAT_S": "2", "TAKEOVER_AFTER_S": "4"},
        {"WORKER_HEARTBEAT_S": "2", "TAKEOVER_AFTER_S": "0"},  # off: the lease decides
        {
            "PAYMENT_TIMEOUT_MS": "100",
            "PAYMENT_CONNECT_TIMEOUT_MS": "100",
            "DB_TIMEOUT_MS": "100",
            "DB_STATEMENT_TIMEOUT_MS": "100",
            "CHARGE_LEASE_S": "2",  # over 0.1 + 2 x (0.1 + 0.1) = 0.5 s
        },
    ],
    ids=env_id,
)
def test_values_at_the_cross_checks_boundary_are_accepted(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    settings = load(clean_env, **variables)
    for name, value in variables.items():
        assert getattr(settings, name.lower()) == float(value)


# --- secrets -------------------------------------------------------------------------------


def test_bad_database_url_does_not_echo_its_password(clean_env: pytest.MonkeyPatch) -> None:
    message = config_error(clean_env, DATABASE_URL="mysql://user:hunter2@h/db")
    assert message.startswith("DATABASE_URL: ")
    assert "hunter2" not in message


def test_secrets_are_not_shown_by_str_or_repr(clean_env: pytest.MonkeyPatch) -> None:
    api_key = "sk_live_7Hq2xZ9pLmN4"
    dsn = "https://f00dfacecafe@o1.ingest.sentry.io/42"
    settings = load(clean_env, PAYMENT_PROVIDER_API_KEY=api_key, SENTRY_DSN=dsn)
    assert settings.payment_provider_api_key is not None
    assert settings.payment_provider_api_key.get_secret_value() == api_key
    assert settings.sentry_dsn is not None
    assert settings.sentry_dsn.get_secret_value() == dsn
    for shown in (str(settings), repr(settings), str(settings.payment_provider_api_key)):
        assert api_key not in shown
        assert "f00dfacecafe" not in shown


# --- check_worker_pools --------------------------------------------------------------------


@pytest.fixture
def pools(clean_env: pytest.MonkeyPatch) -> Settings:
    return load(clean_env, PAYMENT_POOL_MAX_CONNECTIONS="5", DATABASE_POOL_MAX_CONNECTIONS="10")


@pytest.mark.parametrize("threads", [1, 4, 5])
def test_threads_within_both_pools_are_accepted(pools: Settings, threads: int) -> None:
    pools.check_worker_pools(threads)


def test_threads_above_the_payment_pool_are_refused(pools: Settings) -> None:
    with pytest.raises(ConfigError) as info:
        pools.check_worker_pools(6)
    message = str(info.value)
    assert "6 worker threads" in message
    assert "PAYMENT_POOL_MAX_CONNECTIONS=5" in message
    assert "DATABASE_POOL_MAX_CONNECTIONS" not in message


def test_threads_above_both_pools_name_each(pools: Settings) -> None:
    with pytest.raises(ConfigError) as info:
        pools.check_worker_pools(11)
    message = str(info.value)
    assert "PAYMENT_POOL_MAX_CONNECTIONS=5" in message
    assert "DATABASE_POOL_MAX_CONNECTIONS=10" in message
    assert "\n" not in message


def test_threads_above_only_the_database_pool_name_it(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(clean_env, PAYMENT_POOL_MAX_CONNECTIONS="20", DATABASE_POOL_MAX_CONNECTIONS="8")
    settings.check_worker_pools(8)
    with pytest.raises(ConfigError) as info:
        settings.check_worker_pools(9)
    message = str(info.value)
    assert "DATABASE_POOL_MAX_CONNECTIONS=8" in message
    assert "PAYMENT_POOL_MAX_CONNECTIONS" not in message


# --- the CLI stops on a bad setting --------------------------------------------------------


CLI_CASES = [
    ("migrate", "PAYMENT_TIMEOUT_MS", "abc"),
    ("worker", "DATABASE_POOL_MAX_CONNECTIONS", "0"),
    ("migrate", "DATABASE_URL", "mysql://user:hunter2@h/db"),  # the password is not echoed
]


@pytest.fixture(scope="module")
def cli_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[tuple[str, str, str], subprocess.Popen[str]]]:
    """Start every CLI case at once (each takes ~1 s to import); tests wait for their own."""
    cwd = tmp_path_factory.mktemp("cli")  # an empty directory: no .env file is read
    runs = {}
    for command, name, value in CLI_CASES:
        runs[(command, name, value)] = subprocess.Popen(
            [sys.executable, "-m", "payq_cli", command],
            env={**os.environ, name: value},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize(("command", "name", "value"), CLI_CASES)
def test_cli_bad_setting_exits_2_with_one_line(
    cli_runs: dict[tuple[str, str, str], subprocess.Popen[str]],
    command: str,
    name: str,
    value: str,
) -> None:
    process = cli_runs[(command, name, value)]
    stdout, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert "hunter2" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"payq: {name}: ")
    assert process.returncode == 2
    assert stdout == ""


def test_url_passwords_are_not_shown_by_str_or_repr(clean_env: pytest.MonkeyPatch) -> None:
    """Settings printed or logged by accident leak no password: REDIS_URL, DATABASE_URL
    and DATABASE_DIRECT_URL are plain strings, which repr used to show whole."""
    settings = load(
        clean_env,
        REDIS_URL="redis://:redisPw7q@cache:6379/0",
        DATABASE_URL="postgresql://app:dbPw7q%40x@db/payq?sslpassword=keyPw7q",
        DATABASE_DIRECT_URL="postgresql://app:directPw7q@pg/payq",
    )
    for shown in (str(settings), repr(settings)):
        for password in ("redisPw7q", "dbPw7q", "keyPw7q", "directPw7q"):
            assert password not in shown
        assert "redis_url='redis://:***@cache:6379/0'" in shown
        assert "database_url='postgresql://app:***@db/payq?sslpassword=***'" in shown
    assert settings.database_url == "postgresql://app:dbPw7q%40x@db/payq?sslpassword=keyPw7q"


def test_secret_values_hold_the_url_and_sentinel_passwords(clean_env: pytest.MonkeyPatch) -> None:
    """What logs and Sentry mask wherever it appears, even outside a URL."""
    settings = load(
        clean_env,
        REDIS_URL="redis://:redisPw7q@cache:6379/0",
        DATABASE_URL="postgresql://app:dbPw7q%40x@db/payq",
        DATABASE_READ_URL="postgresql://app:readPw7q@replica/payq",
        REDIS_SENTINEL_PASSWORD="sentinelPw7q",
    )
    secrets = settings.secret_values()
    for password in ("redisPw7q", "dbPw7q%40x", "dbPw7q@x", "readPw7q", "sentinelPw7q"):
        assert password in secrets


def test_an_empty_database_direct_url_means_database_url(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(clean_env, DATABASE_DIRECT_URL="")
    assert settings.migration_url == settings.database_url
