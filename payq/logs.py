"""Logging an ops team can search: one JSON object per line, or a readable console line.

Context travels as ``extra=`` fields (charge_id, attempt, outcome, latency_ms,
error_class). Every line is scrubbed of the provider API key, the Sentry DSN,
passwords in URLs and card numbers (``payq.cardnumbers``), in case one ever reaches a
message or a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from payq.cardnumbers import mask_card_numbers
from payq.settings import Settings

__all__ = ["configure_logging", "mask_bearer", "mask_url_passwords"]

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
# A password given as a URL's query parameter (libpq's password= and sslpassword=,
# redis-py's password=), which the user part's pattern above does not see.
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#\s\"']+", re.IGNORECASE)


#: A bearer token, however it got into a text (an echoed header, a repr of headers).
_BEARER = re.compile(r"(\bBearer\s+)[^\s\"',;}]+", re.IGNORECASE)


def mask_bearer(text: str, mask: str = "***") -> str:
    """``text`` with every bearer token replaced by ``mask`` (logs, Sentry, answers kept)."""
    return _BEARER.sub(rf"\g<1>{mask}", text)


def mask_url_passwords(text: str, mask: str = "***") -> str:
    """``text`` with every URL's password, in its user part or its query, replaced."""
    return _QUERY_PASSWORD.sub(rf"\g<1>{mask}", _DSN_PASSWORD.sub(rf"\g<1>{mask}@", text))


class _Redacting(logging.Formatter):
    """Wraps a formatter and masks secrets in the whole line: message, extras, traceback."""

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = [s for s in secrets if len(s) >= 6]

    def format(self, record: logging.LogRecord) -> str:
        line = mask_url_passwords(self.inner.format(_card_free(record)))
        line = mask_bearer(line)
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return mask_card_numbers(line)


def _card_free(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of the record whose text (message, extras, traceback) holds no card number,
    masked before formatting: a formatter's escapes (``\\t`` in JSON, ``repr`` of an extra,
    a traceback quoting a value) would hide the separators the detector reads."""
    masked = logging.makeLogRecord(record.__dict__)
    masked.msg, masked.args = mask_card_numbers(record.getMessage()), None
    for name, value in record.__dict__.items():
        if name not in _STANDARD and isinstance(value, str):
            setattr(masked, name, mask_card_numbers(value))
    if record.exc_info and not record.exc_text:
        masked.exc_text = logging.Formatter().formatException(record.exc_info)
    if masked.exc_text:
        masked.exc_text = mask_card_numbers(masked.exc_text)
        masked.exc_info = None
    return masked


class _ConsoleFormatter(logging.Formatter):
    """``time level logger message key=value ...`` with the extras at the end."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if extras:
            line += " " + " ".join(f"{k}={_short(v)}" for k, v in extras.items())
        return line


def _short(value: Any) -> str:
    text = str(value)
    return text if " " not in text else repr(text)


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Format every root handler the way ``LOG_FORMAT`` says (adding one if none)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(stream or sys.stderr))
    formatter: logging.Formatter
    if settings.log_format == "json":
        formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
            # Text as it is (UTF-8), not \u escapes: the scrubber must see the characters
            # (a card number pasted with no-break spaces would hide behind "\u00a0").
            json_ensure_ascii=False,
        )
    else:
        formatter = _ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.setFormatter(_Redacting(formatter, settings.secret_values()))
    root.setLevel(settings.log_level)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
