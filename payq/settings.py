"""Every setting, read once from the environment (and ``.env``), validated at start.

A bad value stops the program with one line naming the variable and what is
allowed; ``.env.example`` lists every variable with its default.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from payq.endpoints import DEFAULT_ENDPOINT, EndpointSpec, base_url_problem, parse_endpoints
from payq.errors import ConfigError

__all__ = ["DEFAULT_APP", "Endpoint", "Settings", "get_settings", "load_settings"]

# Values of these variables never appear in an error message: they may hold secrets.
_SECRET_FIELDS = frozenset(
    {
        "payment_provider_api_key",
        "sentry_dsn",
        "database_url",
        "database_direct_url",
        "database_read_url",
        "redis_url",
        "redis_sentinel_password",
        "payq_api_tokens",
        "payq_operator_tokens",
        "payment_endpoints",
    }
)
# A bearer token of the HTTP intake: long enough that guessing is hopeless, and no
# character that a header, a comma-separated list or a shell would mangle.
_API_TOKEN = re.compile(r"[\x21-\x2b\x2d-\x7e]{16,512}")
# ``app=token`` in PAYQ_API_TOKENS: the web app a token belongs to.
_APP_TOKEN = re.compile(r"([a-z0-9_-]{1,32})=([\x21-\x2b\x2d-\x7e]{16,512})")
# One entry of REDIS_SENTINELS: a host name, IPv4 or [IPv6] address, and a port.
_SENTINEL = re.compile(r"([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
# A control character: no password holds one, a secret file's trailing newline does.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Settings that are URLs which may carry a password: repr shows them with it masked.
_URL_FIELDS = frozenset({"redis_url", "database_url", "database_direct_url"})
# A URL's password: in its user part (up to the last "@" before the path), or a query
# parameter (libpq's password and sslpassword, redis-py's password).
_URL_USER_PASSWORD = re.compile(r"^([A-Za-z0-9+.-]+://[^:/?#@]*):[^/?#]*@")
_URL_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)
#: Declines that must never be tried at another acquirer (PAYMENT_SOFT_DECLINES).
_NEVER_SOFT = frozenset(
    {
        "fraudulent",
        "stolen_card",
        "lost_card",
        "pickup_card",
        "restricted_card",
        "security_violation",
        "merchant_blacklist",
    }
)
#: The app of an intake token given without a name.
DEFAULT_APP = "default"


#: More sentinels than this are a mistake: each one that does not answer costs a connect
#: timeout before the next is asked.
MAX_SENTINELS = 9


class Settings(BaseSettings):
    """payq's configuration. Field names are the environment variables, lower-cased."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # Services.
    redis_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    # Redis Sentinel (payq.redis_client): host:port of each sentinel, comma-separated;
    # set, the primary's address comes from them and REDIS_URL gives the rest.
    redis_sentinels: str = Field("", max_length=2000)
    redis_sentinel_master: str = Field("mymaster", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_sentinel_password: SecretStr | None = None
    database_url: str = Field(
        "postgresql+psycopg2://postgres@127.0.0.1:5432/payq", pattern=r"^postgresql(\+psycopg2)?://"
    )
    payq_namespace: str = Field("payq", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # The host a process reports as (worker reports, the heartbeat's holder on a charge).
    # Empty: the machine's host name. For several "hosts" on one machine (make scale).
    payq_host: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,100}$")

    # The payment provider.
    payment_provider_url: str = Field("http://127.0.0.1:8099", pattern=r"^https?://[^\s]+$")
    payment_provider_api_key: SecretStr | None = None
    payment_timeout_ms: int = Field(5000, ge=100, le=600_000)
    payment_connect_timeout_ms: int = Field(2000, ge=10, le=600_000)
    payment_pool_max_connections: int = Field(5, ge=1, le=1000)
    payment_max_concurrency: int = Field(20, ge=1, le=100_000)
    fleet_slot_lease_s: float = Field(5.0, ge=0.5, le=300)
    provider_idempotency_ttl_s: int = Field(86_400, ge=60)
    # Several endpoints (payq.endpoints): a JSON list; unset, the two above make one.
    payment_endpoints: SecretStr | None = None
    # Decline codes after which a charge may move to another ledger group (off: none).
    payment_soft_declines: str = Field("", pattern=r"^[a-z0-9_, -]*$", max_length=1000)

    # PostgreSQL.
    db_timeout_ms: int = Field(3000, ge=100, le=600_000)
    db_statement_timeout_ms: int = Field(5000, ge=100, le=3_600_000)
    database_pool_max_connections: int = Field(10, ge=1, le=1000)
    # What stands between payq and PostgreSQL at DATABASE_URL (payq.db): "none", or
    # "transaction" for a pooler in transaction mode (PgBouncer's pool_mode = transaction).
    database_pooler: Literal["none", "transaction"] = "none"
    # PostgreSQL itself, not through the pooler: `payq migrate` (unset or empty, as
    # .env.example has it: DATABASE_URL).
    database_direct_url: str | None = Field(None, pattern=r"^(postgresql(\+psycopg2)?://|$)")
    # Behind a pooler: the server connections it may open for payq's database, for the
    # worker's start-time check (0: read from the pooler's admin console).
    database_pooler_server_connections: int = Field(0, ge=0, le=100_000)
    # Reads from a streaming replica (payq.reads): unset or empty, every read is the primary's.
    database_read_url: SecretStr | None = None
    database_read_max_lag_s: float = Field(5.0, gt=0, le=3600)

    # Workers.
    worker_processes: int = Field(2, ge=1, le=256)
    worker_threads: int = Field(4, ge=1, le=1000)
    charge_lease_s: int = Field(30, ge=2, le=3600)
    worker_poll_ms: int = Field(200, ge=10, le=10_000)
    # 0: three leases. A message in progress longer than this (time the process was
    # frozen does not count) means a wedged thread: the process ends to be restarted.
    worker_watchdog_s: float = Field(0.0, ge=0, le=86_400)
    # Each worker process's heartbeat in Redis (payq.liveness), and how long a silent one
    # waits before the relay takes its charges over (0: not before their lease runs out).
    worker_heartbeat_s: float = Field(1.0, ge=0.1, le=60)
    takeover_after_s: float = Field(3.0, ge=0, le=3600)

    # Retries between attempts (delayed messages, never sleeps).
    retry_max_attempts: int = Field(8, ge=1, le=100)
    retry_backoff_min_s: float = Field(1.0, gt=0, le=3600)
    retry_backoff_max_s: float = Field(300.0, gt=0, le=86_400)

    # Circuit breaker (shared by the fleet).
    breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    breaker_slow_call_rate: float = Field(0.8, gt=0, le=1)
    breaker_slow_call_ms: int = Field(3000, ge=1, le=600_000)
    breaker_min_calls: int = Field(20, ge=1, le=100_000)
    breaker_window_s: int = Field(10, ge=1, le=3600)
    breaker_open_s: int = Field(15, ge=1, le=3600)
    breaker_half_open_probes: int = Field(3, ge=1, le=1000)

    # Producer limits.
    charge_max_amount: int = Field(99_999_999, ge=1, le=99_999_999)

    # Relay.
    relay_interval_s: float = Field(1.0, gt=0, le=300)
    relay_stale_after_s: float = Field(30.0, gt=0, le=86_400)
    relay_batch_size: int = Field(500, ge=1, le=100_000)
    relay_dead_worker_s: float = Field(15.0, ge=5, le=3600)
    # The sweep of dead charges whose outcome is unknown (run by the relay).
    sweep_lookups_per_s: float = Field(5.0, gt=0, le=1000)
    sweep_every_s: float = Field(30.0, ge=1, le=86_400)

    # Operations.
    health_check_interval_s: int = Field(30, ge=1, le=3600)
    health_error_rate: float = Field(0.5, gt=0, le=1)
    health_min_attempts: int = Field(10, ge=1)
    health_pool_utilization: float = Field(0.8, gt=0, le=1)
    metrics_host: str = Field("127.0.0.1", min_length=1)
    metrics_port: int = Field(9191, ge=0, le=65535)
    sentry_dsn: SecretStr | None = None
    payq_environment: str = Field("development", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # HTTP intake (`payq serve`). Tokens are comma-separated lists, so that a new token
    # can be added before the old one is removed.
    payq_api_tokens: SecretStr | None = None
    payq_operator_tokens: SecretStr | None = None
    serve_host: str = Field("127.0.0.1", min_length=1)
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_max_body_bytes: int = Field(32_768, ge=1024, le=10_485_760)
    serve_rate_limit_per_s: int = Field(100, ge=1, le=100_000)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """What repr and str show: the URLs without their passwords (the secret fields are
        ``SecretStr`` already), so that settings printed or logged by accident leak none."""
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                value = _without_password(value)
            yield name, value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self.check_provider_settings()
        self.sentinels  # noqa: B018  (parsing them checks REDIS_SENTINELS)
        sentinel_password = self.redis_sentinel_password
        if sentinel_password is not None and _CONTROL.search(sentinel_password.get_secret_value()):
            raise ValueError(
                "REDIS_SENTINEL_PASSWORD: contains a newline or other control character (a "
                "secret file's trailing newline?); set the bare password"
            )
        if self.retry_backoff_min_s > self.retry_backoff_max_s:
            raise ValueError(
                "RETRY_BACKOFF_MIN_S: must not exceed RETRY_BACKOFF_MAX_S "
                f"({self.retry_backoff_min_s} > {self.retry_backoff_max_s})"
            )
        if self.worker_watchdog_s and self.worker_watchdog_s < 2 * self.charge_lease_s:
            raise ValueError(
                "WORKER_WATCHDOG_S: must be at least 2 x CHARGE_LEASE_S "
                f"({2 * self.charge_lease_s} s), or 0 for three leases (got "
                f"{self.worker_watchdog_s:g}); a charge may rightly take a lease and a lookup"
            )
        if self.database_pooler_server_connections and self.database_pooler == "none":
            raise ValueError(
                "DATABASE_POOLER_SERVER_CONNECTIONS: is for a pooler; set DATABASE_POOLER="
                "transaction as well, or leave it 0"
            )
        if self.takeover_after_s and self.takeover_after_s < 2 * self.worker_heartbeat_s:
            raise ValueError(
                "TAKEOVER_AFTER_S: must be at least 2 x WORKER_HEARTBEAT_S "
                f"({2 * self.worker_heartbeat_s:g} s), or 0 to wait for the lease (got "
                f"{self.takeover_after_s:g}); one late heartbeat is no death"
            )
        self.endpoints  # noqa: B018  (resolving them checks each one's settings)
        self.read_url  # noqa: B018  (reading it checks it)
        risky = sorted(self.soft_declines & _NEVER_SOFT)
        if risky:
            raise ValueError(
                f"PAYMENT_SOFT_DECLINES: {', '.join(risky)} may not move to another acquirer "
                "(trying a lost, stolen or fraudulent card elsewhere is card testing); list "
                "only declines another acquirer may rightly approve"
            )
        for name, tokens in (
            ("PAYQ_API_TOKENS", tuple(token for _, token in self.intake_apps)),
            ("PAYQ_OPERATOR_TOKENS", self.operator_tokens),
        ):
            if not all(_API_TOKEN.fullmatch(token) for token in tokens):
                raise ValueError(
                    f"{name}: each token must be 16-512 printable characters without spaces "
                    "or commas (tokens are separated by commas)"
                )
        if set(self.intake_tokens) & set(self.operator_tokens):
            raise ValueError(
                "PAYQ_OPERATOR_TOKENS: shares a token with PAYQ_API_TOKENS; operators need "
                "tokens of their own"
            )
        return self

    def check_provider_settings(self) -> None:
        """The rules between the provider's settings and the lease (``ValueError``); each
        endpoint's own settings are checked by them too (``payq.endpoints``)."""
        problem = base_url_problem(self.payment_provider_url)
        if problem:
            raise ValueError(f"PAYMENT_PROVIDER_URL: {problem}")
        if self.payment_connect_timeout_ms > self.payment_timeout_ms:
            raise ValueError(
                "PAYMENT_CONNECT_TIMEOUT_MS: must not exceed PAYMENT_TIMEOUT_MS "
                f"({self.payment_connect_timeout_ms} > {self.payment_timeout_ms})"
            )
        # A lease must outlast one whole attempt.
        attempt_s = self.attempt_worst_case_ms / 1000
        if self.charge_lease_s <= attempt_s:
            raise ValueError(
                f"CHARGE_LEASE_S: must exceed one attempt's worst case, PAYMENT_TIMEOUT_MS + "
                f"2 x (DB_TIMEOUT_MS + DB_STATEMENT_TIMEOUT_MS) = {attempt_s:g} s "
                f"(got {self.charge_lease_s})"
            )
        if self.key_send_window_s <= 0:
            raise ValueError(
                "PROVIDER_IDEMPOTENCY_TTL_S: must exceed CHARGE_LEASE_S + PAYMENT_TIMEOUT_MS, "
                "the margin kept so that no request reaches the provider after it forgot the "
                f"key (got {self.provider_idempotency_ttl_s} s)"
            )
        key = self.payment_provider_api_key
        if key is not None and not re.fullmatch(r"[\x21-\x7e]*", key.get_secret_value()):
            raise ValueError(
                "PAYMENT_PROVIDER_API_KEY: contains a space, newline or other control "
                "character (a secret file's trailing newline?); set the bare key"
            )

    @property
    def host(self) -> str:
        """``PAYQ_HOST``, or the machine's host name."""
        return self.payq_host or socket.gethostname()[:100]

    @property
    def sentinels(self) -> tuple[tuple[str, int], ...]:
        """``(host, port)`` of each Redis Sentinel (``REDIS_SENTINELS``); none: REDIS_URL
        names the Redis itself. Raises ``ValueError`` naming the variable."""
        found = []
        for entry in (e.strip() for e in self.redis_sentinels.split(",")):
            if not entry:
                continue
            parsed = _SENTINEL.fullmatch(entry)
            port = int(parsed.group(2)) if parsed else 0
            if parsed is None or not 1 <= port <= 65535:
                raise ValueError(
                    f"REDIS_SENTINELS: {entry[:80]!r} is not host:port; list each sentinel "
                    "as host:port, separated by commas (e.g. 10.0.0.1:26379,10.0.0.2:26379)"
                )
            sentinel = (parsed.group(1).strip("[]"), port)
            if sentinel in found:
                raise ValueError(f"REDIS_SENTINELS: {entry[:80]!r} is listed twice; list each once")
            found.append(sentinel)
        if self.redis_sentinels.strip() and not found:
            raise ValueError(
                "REDIS_SENTINELS: names no sentinel; list each as host:port, or leave it empty "
                "to use the Redis at REDIS_URL"
            )
        if len(found) > MAX_SENTINELS:
            raise ValueError(
                f"REDIS_SENTINELS: {len(found)} sentinels; at most {MAX_SENTINELS} (a "
                "deployment runs 3 or 5: each is asked in turn when the others do not answer)"
            )
        return tuple(found)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The provider endpoints, highest priority first (``payq.endpoints``); each one's
        settings are these with its own overrides, checked by the same rules. Made anew on
        each read (a copy of these settings must not see this one's): read it once."""
        raw = self.payment_endpoints
        specs = parse_endpoints(None if raw is None else raw.get_secret_value())
        if not specs:
            return (Endpoint(DEFAULT_ENDPOINT, DEFAULT_ENDPOINT, 1, 1, self, key_scope=None),)
        return tuple(sorted((self._endpoint(spec) for spec in specs), key=lambda e: e.priority))

    def _endpoint(self, spec: EndpointSpec) -> Endpoint:
        own = self.model_copy(update=spec.overrides)
        try:
            own.check_provider_settings()
        except ValueError as exc:
            raise ValueError(
                f"PAYMENT_ENDPOINTS: entry {spec.index} ({spec.name}): {exc}"
            ) from None
        return Endpoint(
            spec.name, spec.group, spec.priority, spec.weight, own, key_scope=f"ep:{spec.name}"
        )

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, for logs and Sentry to mask: the API keys
        (each endpoint's too), the Sentry DSN, the intake and operator tokens, the
        sentinels' password and the passwords in the Redis and database URLs."""
        keys = [self.payment_provider_api_key, self.sentry_dsn, self.redis_sentinel_password]
        keys += [e.settings.payment_provider_api_key for e in self.endpoints]
        found = [k.get_secret_value() for k in keys if k is not None]
        read = self.database_read_url
        urls = (self.redis_url, self.database_url, self.database_direct_url or "")
        passwords = [
            p for u in (*urls, read.get_secret_value() if read else "") for p in _url_passwords(u)
        ]
        tokens = (*self.intake_tokens, *self.operator_tokens)
        return [s for s in (*found, *tokens, *passwords) if s]

    @property
    def read_url(self) -> str | None:
        """``DATABASE_READ_URL`` (``ValueError`` if it is not a PostgreSQL URL), or ``None``
        when it is unset or empty."""
        raw = self.database_read_url
        url = raw.get_secret_value().strip() if raw is not None else ""
        if url and not re.fullmatch(r"postgresql(\+psycopg2)?://\S+", url):
            raise ValueError(
                "DATABASE_READ_URL: must be a postgresql:// or postgresql+psycopg2:// URL naming "
                "a streaming replica of DATABASE_URL's server, or empty for none"
            )
        return url or None

    @property
    def soft_declines(self) -> frozenset[str]:
        """Decline codes after which a charge may move to another ledger group."""
        return frozenset(c.strip() for c in self.payment_soft_declines.split(",") if c.strip())

    @property
    def intake_apps(self) -> tuple[tuple[str, str], ...]:
        """``(app, token)`` for each bearer token web apps enqueue with (``PAYQ_API_TOKENS``,
        ``app=token,...``; a token without a name belongs to the app ``default``). An app
        reads and conflicts with its own charges only."""
        pairs = []
        for entry in _split_tokens(self.payq_api_tokens):
            named = _APP_TOKEN.fullmatch(entry)
            pairs.append((named.group(1), named.group(2)) if named else (DEFAULT_APP, entry))
        return tuple(pairs)

    @property
    def intake_tokens(self) -> tuple[str, ...]:
        """The bearer tokens web apps enqueue with, without their apps' names."""
        return tuple(token for _, token in self.intake_apps)

    @property
    def operator_tokens(self) -> tuple[str, ...]:
        """The bearer tokens of the ops routes (``PAYQ_OPERATOR_TOKENS``)."""
        return _split_tokens(self.payq_operator_tokens)

    @property
    def attempt_worst_case_ms(self) -> int:
        """The longest one attempt can take: claim, provider call, record (each database
        step may wait for a connection and then for its statements)."""
        db_step_ms = self.db_timeout_ms + self.db_statement_timeout_ms
        return self.payment_timeout_ms + 2 * db_step_ms

    @property
    def watchdog_s(self) -> float:
        """How long one message may be in progress before its thread counts as wedged."""
        return self.worker_watchdog_s or 3.0 * self.charge_lease_s

    @property
    def key_send_window_s(self) -> float:
        """How long after a charge's creation payq may still send it: the provider's key
        retention less one attempt's worst case (its lease and the call's timeout), so
        that no request can reach the provider after it forgot the key."""
        return self.provider_idempotency_ttl_s - self.charge_lease_s - self.payment_timeout_s

    @property
    def migration_url(self) -> str:
        """Where ``payq migrate`` connects: PostgreSQL itself (DATABASE_DIRECT_URL), else
        DATABASE_URL."""
        return self.database_direct_url or self.database_url

    @property
    def payment_timeout_s(self) -> float:
        return self.payment_timeout_ms / 1000

    def require_provider_key(self, who: str, *, every_endpoint: bool = True) -> None:
        """Refuse to start a process that calls the provider without an API key for each
        endpoint (``every_endpoint`` false: these settings' own key only, a client's)."""
        keyed = [(e.name, e.settings) for e in self.endpoints] if every_endpoint else []
        for name, settings in keyed or [("", self)]:
            key = settings.payment_provider_api_key
            if key is not None and key.get_secret_value():
                continue
            whose = "" if name in ("", DEFAULT_ENDPOINT) else f" for endpoint {name}"
            raise ConfigError(
                f"PAYMENT_PROVIDER_API_KEY: is not set{whose}; {who} needs the provider's API "
                "key to call it (set it in the environment or .env"
                + (", or give the endpoint an api_key in PAYMENT_ENDPOINTS)" if whose else ")")
            )

    def check_worker_pools(self, threads: int) -> None:
        """Refuse a worker whose threads could need more connections than its pools hold."""
        http = [
            (
                "PAYMENT_POOL_MAX_CONNECTIONS"
                if e.key_scope is None
                else f"pool_max_connections of endpoint {e.name}",
                e.settings.payment_pool_max_connections,
            )
            for e in self.endpoints
        ]
        exceeded = [
            f"{name}={size}"
            for name, size in (
                *http,
                ("DATABASE_POOL_MAX_CONNECTIONS", self.database_pool_max_connections),
            )
            if threads > size
        ]
        if exceeded:
            raise ConfigError(
                f"{threads} worker threads per process exceed {' and '.join(exceeded)}: each "
                "thread may hold one connection of each pool, so lower the threads (--threads, "
                "WORKER_THREADS) or raise the pool"
            )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One provider endpoint, resolved: ``settings`` are the process's settings as its
    client and gate read them (its URL, key, timeouts, pool, fleet limit, breaker)."""

    name: str
    group: str  # its ledger group: the books its charges are in
    priority: int  # lower first
    weight: int  # among endpoints of equal priority
    settings: Settings = field(repr=False)
    #: Its gate's Redis keys go under this (``None``: the namespace's own, one endpoint).
    key_scope: str | None

    @property
    def url(self) -> str:
        return self.settings.payment_provider_url


def _url_passwords(url: str) -> list[str]:
    """The password in ``url``'s user part, as written and percent-decoded (none: [])."""
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL the settings would accept anyway
        return []
    return [] if not password else sorted({password, unquote(password)})


def _without_password(url: str) -> str:
    """``url`` with its password, in the user part or the query, replaced by ``***``."""
    return _URL_QUERY_PASSWORD.sub(r"\1***", _URL_USER_PASSWORD.sub(r"\1:***@", url))


def _split_tokens(value: SecretStr | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(t.strip() for t in value.get_secret_value().split(",") if t.strip())


_PATTERN_HINTS = {
    "redis_url": "must be a redis:// or rediss:// URL",
    "redis_sentinel_master": "must be the name the sentinels monitor the primary by: 1-64 "
    "letters, digits, '_', '.' or '-'",
    "database_url": "must be a postgresql:// or postgresql+psycopg2:// URL",
    "database_direct_url": "must be a postgresql:// or postgresql+psycopg2:// URL, or empty",
    "payment_provider_url": "must be an http:// or https:// URL",
    "payq_namespace": "must be 1-64 letters, digits, '_', '.' or '-'",
    "payq_host": "must be up to 100 letters, digits, '_', '.' or '-' (empty: the host name)",
    "payment_soft_declines": "must be decline codes (the 402's error.code: lower-case letters, "
    "digits, _ or -) separated by commas, e.g. insufficient_funds,try_again_later",
}


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:  # a model-level check: its message already names the variable
        return message
    field = loc[0]
    shown = "" if field in _SECRET_FIELDS else f" (got {str(repr(error.get('input')))[:80]})"
    if error.get("type") == "string_pattern_mismatch":
        message = _PATTERN_HINTS.get(field, message)
    return f"{field.upper()}: {message}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; raise ``ConfigError`` with one line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(dict(exc.errors()[0]))) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, loaded once."""
    return load_settings()
