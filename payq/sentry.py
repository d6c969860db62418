"""Sentry for payq: errors and alerts, with secrets and card data scrubbed out.

Call ``init_sentry`` once per process, at start and **before the Dramatiq broker is
created** (``payq.broker.get_broker()``): sentry-sdk's Dramatiq integration patches
``Broker.__init__``, so a broker made earlier reports nothing. Without ``SENTRY_DSN``
every function here does nothing.

Sent: exceptions an actor raises (on every attempt; not its ``throws`` nor
``dramatiq.Retry``), ERROR log lines (INFO and WARNING become breadcrumbs) and
``capture_alert``; a line with ``extra={"alert": True}`` is left to ``capture_alert``, so
one alert is one event. ``charge_id`` and ``attempt`` in a line's ``extra`` become tags;
``tag_charge`` sets them for the rest of a message's scope. Never sent: message payloads,
local variables, trace headers to other hosts (the provider). Every event and breadcrumb
passes ``scrub``, which finds API keys, ``Bearer`` tokens, URL passwords and card numbers
inside text (sentry-sdk's ``EventScrubber``, also on, matches key names only).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, Literal, cast

import sentry_sdk
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.types import Event, Hint

from payq import __version__
from payq.cardnumbers import looks_like_card_number
from payq.logs import mask_bearer, mask_url_passwords
from payq.settings import Settings

__all__ = ["FILTERED", "capture_alert", "init_sentry", "scrub", "tag_charge"]

FILTERED = "[Filtered]"
_MIN_SECRET_CHARS = 6  # shorter "secrets" would blank out ordinary words
_SENSITIVE = (
    r"source|authori[sz]ation|api[_-]?key|token|passw(?:or)?d|secret|dsn|"
    r"database[_-]?url|redis[_-]?url|cookie"
)
_SENSITIVE_KEY = re.compile(_SENSITIVE, re.IGNORECASE)
_SENSITIVE_OPTION = re.compile(rf"--?[\w-]*(?:{_SENSITIVE})[\w-]*", re.IGNORECASE)
_OPTION_VALUE = re.compile(rf"({_SENSITIVE_OPTION.pattern}[= ])(\"[^\"]*\"|'[^']*'|\S+)", re.I)
# Written by sentry-sdk, never secret; ids could pass for card numbers (digits + Luhn).
_SDK_KEYS = frozenset(
    {
        "event_id",
        "trace_id",
        "span_id",
        "parent_span_id",
        "timestamp",
        "mechanism",  # its "source" is "__cause__" or "__context__"
        "transaction_info",  # its "source" is "task", "url", ...
        "sdk",
    }
)
_LEVELS = frozenset({"fatal", "critical", "error", "warning", "info", "debug"})
_Level = Literal["fatal", "critical", "error", "warning", "info", "debug"]


def scrub(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of ``value`` (an event, a breadcrumb, any part) with secrets filtered out.

    Values under sensitive key names go whole; in strings, the exact ``secrets``,
    ``Bearer`` tokens, URL passwords and ``--secret-option value`` pairs are masked,
    and a string (or an integer) that looks like a card number goes whole.
    """
    return _scrub(value, tuple(s for s in secrets if len(s) >= _MIN_SECRET_CHARS))


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _scrub_entry(k, v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # ["--source", "tok_..."] (sys.argv, a command line): the option's value goes.
        return [
            FILTERED
            if i and isinstance(prev := value[i - 1], str) and _SENSITIVE_OPTION.fullmatch(prev)
            else _scrub(item, secrets)
            for i, item in enumerate(value)
        ]
    if isinstance(value, str):
        if looks_like_card_number(value):
            return FILTERED
        for secret in secrets:
            value = value.replace(secret, FILTERED)
        value = mask_bearer(value, FILTERED)
        value = mask_url_passwords(value, FILTERED)
        return _OPTION_VALUE.sub(rf"\g<1>{FILTERED}", value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return FILTERED if looks_like_card_number(str(value)) else value
    return value


def _scrub_entry(key: Any, value: Any, secrets: tuple[str, ...]) -> Any:
    if key in _SDK_KEYS:
        return value
    if isinstance(key, str) and _SENSITIVE_KEY.search(key) and value not in (None, ""):
        return FILTERED
    return _scrub(value, secrets)


def _before_send(event: Event, hint: Hint, secrets: tuple[str, ...]) -> Event | None:
    record = hint.get("log_record")
    if record is not None and getattr(record, "alert", False) is True:
        return None  # capture_alert reports it, with its tags
    extra = event.get("extra") or {}
    tags = event.setdefault("tags", {})
    for name in ("charge_id", "attempt"):
        if name in extra and extra[name] is not None and name not in tags:
            tags[name] = str(extra[name])
    return cast(Event, _scrub(event, secrets))


def init_sentry(settings: Settings, *, component: str) -> bool:
    """Start reporting to ``SENTRY_DSN``; ``False`` (and nothing done) when it is unset.

    Call it before the Dramatiq broker is created (see the module's docstring).
    ``component`` ("worker", "relay", ...) becomes a tag on every event of the process;
    ``PAYQ_ENVIRONMENT`` names the environment ("development" unless set).
    """
    dsn = settings.sentry_dsn.get_secret_value() if settings.sentry_dsn is not None else ""
    if not dsn:  # unset, or `SENTRY_DSN=` as in .env.example
        return False
    secrets = tuple(s for s in settings.secret_values() if len(s) >= _MIN_SECRET_CHARS)

    def before_send(event: Event, hint: Hint) -> Event | None:
        return _before_send(event, hint, secrets)

    def before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        return cast(dict[str, Any], _scrub(crumb, secrets))

    sentry_sdk.init(
        dsn=dsn,
        integrations=[DramatiqIntegration()],
        # No PII: sentry-sdk 2.75 resolves an unset send_default_pii (and no
        # data_collection) as send_default_pii=False; passing False outright is
        # deprecated there and warns.
        max_request_body_size="never",  # Dramatiq message payloads are never attached
        include_local_variables=False,
        trace_propagation_targets=[],  # no sentry-trace/baggage headers to the provider
        before_send=before_send,
        before_breadcrumb=before_breadcrumb,
        environment=settings.payq_environment,
        release=f"payq@{__version__}",
    )
    sentry_sdk.get_global_scope().set_tag("component", component)
    return True


def tag_charge(charge_id: str, attempt: int | None) -> None:
    """Tag this message's events with its charge (and attempt, once known).

    In a worker, the Dramatiq integration gives each message an isolation scope of its
    own, so the tags end with the message. Elsewhere they stay on the current thread's
    scope until changed.
    """
    if not sentry_sdk.get_client().is_active():
        return
    scope = sentry_sdk.get_isolation_scope()
    scope.set_tag("charge_id", charge_id)
    if attempt is None:
        scope.remove_tag("attempt")
    else:
        scope.set_tag("attempt", str(attempt))


def capture_alert(message: str, *, level: str = "warning", **tags: str) -> None:
    """Send a health alert as a Sentry message; grouped by its tags when it has any.

    ``level`` is a Sentry level ("warning", "error", ...); an unknown one is sent as
    "error". Does nothing when Sentry is not initialised.
    """
    if not sentry_sdk.get_client().is_active():
        return
    sentry_level = cast(_Level, level.lower() if level.lower() in _LEVELS else "error")
    with sentry_sdk.new_scope() as scope:
        for name, value in tags.items():
            scope.set_tag(name, value)
        if tags:  # the text carries figures that change; the check does not
            scope.fingerprint = ["payq-alert", *(f"{k}={v}" for k, v in sorted(tags.items()))]
        sentry_sdk.capture_message(message, level=sentry_level)


def alert(logger: logging.Logger, message: str, level: int = logging.WARNING, **tags: str) -> None:
    """Raise an alert: an ``ALERT`` log line (``alert: true`` in JSON) and a Sentry event."""
    logger.log(level, "ALERT %s", message, extra={"alert": True, **tags})
    capture_alert(message, level=logging.getLevelName(level).lower(), **tags)
