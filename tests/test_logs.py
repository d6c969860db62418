"""Log lines: JSON one object per line, extras kept, secrets never written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from payq.logs import configure_logging
from payq.settings import load_settings

KEY = "sk_live_Zx81mQ0pLr7"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    root.handlers = [logging.StreamHandler(buffer)]
    yield buffer
    root.handlers, root.level = saved_handlers, saved_level


def test_json_lines_carry_the_charge_context(stream: io.StringIO) -> None:
    configure_logging(load_settings(log_format="json", payment_provider_api_key=KEY))
    logging.getLogger("payq.charge").info(
        "charge succeeded", extra={"charge_id": "c-1", "attempt": 2, "latency_ms": 41}
    )
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "charge succeeded" and record["level"] == "INFO"
    assert (record["charge_id"], record["attempt"], record["latency_ms"]) == ("c-1", 2, 41)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_secrets_are_masked_in_messages_extras_and_tracebacks(
    stream: io.StringIO, log_format: str
) -> None:
    configure_logging(load_settings(log_format=log_format, payment_provider_api_key=KEY))
    log = logging.getLogger("payq.test")
    log.warning("calling with Bearer %s", KEY)
    log.warning("broker at redis://:hunter2secret@cache:6379/0", extra={"key": KEY})
    try:
        raise RuntimeError(f"postgresql://app:hunter2secret@db/payq refused {KEY}")
    except RuntimeError:
        log.exception("boom")
    text = stream.getvalue()
    assert KEY not in text and "hunter2secret" not in text
    assert text.count("***") >= 4


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_card_numbers_are_masked_however_they_were_pasted(
    stream: io.StringIO, log_format: str
) -> None:
    configure_logging(load_settings(log_format=log_format))
    log = logging.getLogger("payq.test")
    log.warning("customer wrote 4242.4242.4242.4242 in the note")
    log.warning(
        "and", extra={"note": "4242\u00a04242\u00a04242\u00a04242", "id": "order-1733400000000"}
    )
    text = stream.getvalue()
    digits = "".join(ch for ch in text if ch.isdigit())
    assert "4242424242424242" not in digits.replace("1733400000000", "")
    assert text.count("[card number]") == 2 and "order-1733400000000" in text  # no false alarm


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_formatters_escapes_do_not_hide_a_card_number(
    stream: io.StringIO, log_format: str
) -> None:
    """JSON writes a tab as \\t, the console repr()s an extra with a space, %r and
    tracebacks quote: each would hide the separators, so text is masked before."""
    configure_logging(load_settings(log_format=log_format))
    log = logging.getLogger("payq.test")
    log.warning("tabbed 4111\t1111\t1111\t1111")
    log.warning("as repr %r", "4111\n1111\n1111\n1111")
    log.warning("extra", extra={"note": "4111\u00a01111 1111 1111"})
    try:
        {}["4111\u20091111\u20091111\u20091111"]
    except KeyError:
        log.exception("lookup failed")
    text = stream.getvalue()
    assert text.count("[card number]") >= 4, text
    assert "1111" not in text.replace("[card number]", ""), text


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_query_passwords_and_the_sentinel_password_are_masked(
    stream: io.StringIO, log_format: str
) -> None:
    configure_logging(load_settings(log_format=log_format, redis_sentinel_password="sentinelPw7q"))
    log = logging.getLogger("payq.test")
    log.warning("db at postgresql://app@db/payq?sslmode=require&password=queryPw7q&x=1")
    log.warning("sentinel refused AUTH sentinelPw7q")
    text = stream.getvalue()
    assert "queryPw7q" not in text and "sentinelPw7q" not in text
    assert "password=***&x=1" in text
