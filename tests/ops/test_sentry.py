"""Sentry reporting over real HTTP: a local ingest endpoint receives what sentry-sdk sends.

The endpoint speaks Sentry's wire format (``POST /api/<project>/envelope/`` and
``/store/``, gzip/deflate/brotli bodies, newline-separated envelopes); the tests look
for secrets in the raw bytes received, as anyone reading the Sentry project could.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import threading
import uuid
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
import sentry_sdk

import payq
from payq.errors import ProviderConnectionError
from payq.sentry import FILTERED, capture_alert, init_sentry, scrub, tag_charge
from payq.settings import load_settings
from producers import enqueue_charges
from provider_sim import SimulatorThread
from tests.conftest import API_KEY
from tests.helpers import Sim, charge, unique_key, wait_until
from tests.processes import PayqProcess

try:  # sentry-sdk sends brotli only when this module is installed (gzip otherwise)
    import brotli  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    brotli = None

# Secrets, kept here and away from the lines that raise: Sentry shows source lines.
CARD = "4242 4242 4242 4242"
DB_URL = "postgresql://u:hunter2@h/db"
SOURCE = "tok_visa_secret"
OTHER_TOKEN = "eyJhbGciOiJIUzI1NiJ9.other-bearer-token"
CONTEXT_PASSWORD = "ctx-pw-" + uuid.uuid4().hex[:8]
SECRETS = [API_KEY, "hunter2", CARD, CARD.replace(" ", ""), SOURCE, OTHER_TOKEN, CONTEXT_PASSWORD]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.bodies: list[bytes] = []  # decompressed, as received
        self.encodings: list[str] = []
        self.events: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    _PATH = re.compile(r"/api/(\d+)/(envelope|store)/")

    def do_POST(self) -> None:
        match = self._PATH.fullmatch(urlsplit(self.path).path)
        if match is None:
            self.send_error(404)
            return
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        body = self._read_body()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding == "br" and brotli is not None:
            body = brotli.decompress(body)
        elif encoding not in ("", "identity"):
            self.send_error(415, f"unsupported Content-Encoding {encoding}")
            return
        events = [json.loads(body)] if match.group(2) == "store" else _envelope_events(body)
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.encodings.append(encoding)
            self.server.events.extend(events)
        reply = json.dumps({"id": events[0].get("event_id") if events else None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def _envelope_events(data: bytes) -> list[dict[str, Any]]:
    """The event items of an envelope: a header line, then items (header line + payload)."""
    _headers, _, rest = data.partition(b"\n")
    events = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        if not line.strip():
            continue
        item = json.loads(line)
        if "length" in item:
            payload, rest = rest[: item["length"]], rest[item["length"] :].removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        if item.get("type") == "event":
            events.append(json.loads(payload))
    return events


class SentryServer:
    """A stand-in for Sentry's ingest on 127.0.0.1, keeping every event it is sent."""

    def __init__(self) -> None:
        self._server = _Server()
        self.dsn = f"http://public@127.0.0.1:{self._server.server_address[1]}/1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SentryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def raw(self) -> bytes:
        with self._server.lock:
            return b"\n".join(self._server.bodies)

    @property
    def encodings(self) -> list[str]:
        with self._server.lock:
            return list(self._server.encodings)

    def events(self, **tags: str) -> list[dict[str, Any]]:
        with self._server.lock:
            return [
                e
                for e in self._server.events
                if all(dict(_tags(e)).get(k) == v for k, v in tags.items())
            ]


def _tags(event: dict[str, Any]) -> list[tuple[str, str]]:
    tags = event.get("tags") or {}
    return list(tags.items()) if isinstance(tags, dict) else [tuple(t) for t in tags]


def _text(event: dict[str, Any]) -> str:
    return json.dumps(event)


@pytest.fixture
def sentry() -> Iterator[SentryServer]:
    with SentryServer() as server:
        yield server


@pytest.fixture
def sentry_off_afterwards() -> Iterator[None]:
    """Leave no Sentry client behind for the rest of the suite."""
    yield
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.get_global_scope().set_client(None)
    sentry_sdk.get_global_scope().remove_tag("component")
    assert not sentry_sdk.get_client().is_active()


def test_without_a_dsn_sentry_stays_off() -> None:
    assert init_sentry(load_settings(sentry_dsn=None), component="test") is False
    assert init_sentry(load_settings(sentry_dsn=""), component="test") is False
    assert not sentry_sdk.get_client().is_active()
    tag_charge("c", 1)  # no-ops, no error
    capture_alert("nothing", check="x")


def test_scrub_masks_secrets_by_key_by_value_and_in_text() -> None:
    event: dict[str, Any] = {
        "event_id": "4242424242424242" + "0" * 16,
        "extra": {
            "X-Api-Key": "k1",
            "PAYMENT_PROVIDER_API_KEY": "k2",
            "Database-URL": "x",
            "sentry_dsn": "y",
            "amount": 4242424242424242,
            "attempt": 2,
            "sys.argv": ["payq", "enqueue", "--source", "tok_a", "--api-key=k3", "--amount", "5"],
        },
        "message": "sk_live_123456 to redis://:pw@r:6379/0 with Bearer abc.def",
        "exception": {"values": [{"mechanism": {"type": "chained", "source": "__cause__"}}]},
    }
    out = scrub(event, ["sk_live_123456"])
    assert out["event_id"] == event["event_id"]  # sdk ids are left alone
    assert out["extra"] == {
        "X-Api-Key": FILTERED,
        "PAYMENT_PROVIDER_API_KEY": FILTERED,
        "Database-URL": FILTERED,
        "sentry_dsn": FILTERED,
        "amount": FILTERED,
        "attempt": 2,
        "sys.argv": [
            "payq",
            "enqueue",
            "--source",
            FILTERED,
            f"--api-key={FILTERED}",
            "--amount",
            "5",
        ],
    }
    assert out["message"] == f"{FILTERED} to redis://:{FILTERED}@r:6379/0 with Bearer {FILTERED}"
    assert out["exception"]["values"][0]["mechanism"]["source"] == "__cause__"
    assert event["extra"]["X-Api-Key"] == "k1"  # a copy: the input is unchanged


def _fail_with_secrets(charge_id: str) -> None:
    try:
        raise ProviderConnectionError(
            f"POST failed; headers Authorization: Bearer {OTHER_TOKEN}, X-Key: {API_KEY}; "
            f"db {DB_URL}"
        )
    except ProviderConnectionError as exc:
        raise RuntimeError(f"charge {charge_id} failed with key {API_KEY}") from exc


@pytest.mark.usefixtures("sentry_off_afterwards")
def test_scrub_masks_url_query_passwords_and_the_settings_url_passwords() -> None:
    """A password as a URL's query parameter, and the Redis, database and sentinel
    passwords on their own (as ``init_sentry`` passes ``secret_values``), are filtered."""
    settings = load_settings(
        redis_url="redis://:redisPw7q@r:6379/0", redis_sentinel_password="sentinelPw7q"
    )
    text = "postgresql://app@db/payq?password=queryPw7q&x=1; AUTH redisPw7q sentinelPw7q"
    out = scrub({"message": text}, settings.secret_values())["message"]
    for password in ("queryPw7q", "redisPw7q", "sentinelPw7q"):
        assert password not in out
    assert f"password={FILTERED}&x=1" in out


def test_in_process_events_arrive_with_tags_and_without_secrets(
    sentry: SentryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYQ_ENVIRONMENT", "test-sentry")
    settings = load_settings(sentry_dsn=sentry.dsn, payment_provider_api_key=API_KEY)
    log = logging.getLogger("payq.tests.sentry")
    log.setLevel(logging.INFO)  # INFO lines become breadcrumbs
    charge_id = str(uuid.uuid4())

    with sentry_sdk.isolation_scope():
        assert init_sentry(settings, component="test") is True
        client = sentry_sdk.get_client()
        assert not client.should_send_default_pii()
        assert client.options["data_collection"]["stack_frame_variables"] is False
        tag_charge(charge_id, 3)
        sentry_sdk.set_tag("source", SOURCE)
        sentry_sdk.set_context("provider", {"url": f"https://ops:{CONTEXT_PASSWORD}@p.example"})
        log.info("connecting to %s", DB_URL, extra={"database_url": DB_URL})  # a breadcrumb
        sentry_sdk.add_breadcrumb(category="http", message=f"Authorization: Bearer {API_KEY}")
        try:
            _fail_with_secrets(charge_id)
        except RuntimeError:
            sentry_sdk.capture_exception()
        log.error(
            "charge %s: provider refused key %s",
            charge_id,
            API_KEY,
            extra={"source": SOURCE, "charge_id": charge_id, "attempt": 4},
        )
        sentry_sdk.capture_message(f"card number seen: {CARD}")
        log.error("ALERT pools hot", extra={"alert": True, "check": "pools"})  # left to:
        capture_alert("pools hot: 93% for 30 s", level="error", check="pools")
        sentry_sdk.flush(timeout=5)
    log.setLevel(logging.NOTSET)

    wait_until(lambda: len(sentry.events()) >= 4, 10, "four events at the local Sentry")
    raw = sentry.raw
    leaked = [s for s in SECRETS if s.encode() in raw]
    assert not leaked, f"secrets reached Sentry: {leaked}"
    assert sentry.encodings and set(sentry.encodings) <= {"gzip", "br"}  # decoded above

    events = sentry.events(component="test", charge_id=charge_id)
    assert len(events) == len(sentry.events()) == 4  # the ALERT log line was not sent too
    for event in events:
        assert event["environment"] == "test-sentry"
        assert event["release"] == f"payq@{payq.__version__}"
        assert dict(_tags(event))["source"] == FILTERED
    [crash] = [e for e in events if "exception" in e]
    types = [v["type"] for v in crash["exception"]["values"]]
    assert types == ["ProviderConnectionError", "RuntimeError"]
    assert dict(_tags(crash))["attempt"] == "3"
    assert f"Bearer {FILTERED}" in _text(crash) and f"u:{FILTERED}@h/db" in _text(crash)
    assert crash["contexts"]["provider"]["url"] == f"https://ops:{FILTERED}@p.example"
    crumbs = {c.get("category"): c for c in crash["breadcrumbs"]["values"]}
    assert crumbs["payq.tests.sentry"]["data"]["database_url"] == FILTERED
    assert crumbs["payq.tests.sentry"]["message"] == f"connecting to postgresql://u:{FILTERED}@h/db"
    assert crumbs["http"]["message"] == f"Authorization: Bearer {FILTERED}"

    [logged] = [e for e in events if e.get("logger") == "payq.tests.sentry"]
    assert logged["level"] == "error" and logged["extra"]["source"] == FILTERED
    assert logged["logentry"]["formatted"] == f"charge {charge_id}: provider refused key {FILTERED}"
    assert logged["logentry"]["params"] == [charge_id, FILTERED]
    # Tags from this scope win; a log line's own attempt counts where there is none.
    assert dict(_tags(logged))["attempt"] == "3"
    [card] = [e for e in events if e.get("message") == FILTERED]  # "card number seen: ..."
    assert card["level"] == "info"
    [alert] = sentry.events(check="pools")
    assert alert["level"] == "error" and alert["message"] == "pools hot: 93% for 30 s"
    assert alert["fingerprint"] == ["payq-alert", "check=pools"]
    assert all("ALERT" not in (e.get("logentry") or {}).get("message", "") for e in events)


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_a_real_worker_reports_a_dead_charge_tagged_and_without_secrets(
    sentry: SentryServer,
) -> None:
    source = "tok_" + uuid.uuid4().hex  # the charge's payment token: must never reach Sentry
    with SimulatorThread(api_key=API_KEY) as thread:
        Sim(thread.url).faults(script=["auth"])  # 401: the charge goes dead on attempt 1
        env = {
            "PAYMENT_PROVIDER_URL": thread.url,
            "SENTRY_DSN": sentry.dsn,
            "PAYQ_ENVIRONMENT": "e2e",
        }
        with PayqProcess("worker", "--processes", "1", "--threads", "1", env=env):
            [made] = enqueue_charges(
                [
                    {
                        "amount": 1234,
                        "currency": "usd",
                        "source": source,
                        "idempotency_key": unique_key("sentry"),
                    }
                ]
            )
            wait_until(lambda: charge(made.id).status == "dead", 20, "the charge to go dead")
            [event] = wait_until(
                lambda: sentry.events(charge_id=str(made.id)),
                10,
                "a Sentry event for the dead charge (it needs init_sentry before get_broker() "
                "in workers/actors.py and dead charges logged at ERROR in payq/processing.py)",
            )
    tags = dict(_tags(event))
    assert tags["attempt"] == "1" and tags["component"] == "worker"
    assert event["level"] == "error" and event["environment"] == "e2e"
    assert event["logentry"]["formatted"] == "charge dead"
    assert event["extra"]["error_class"] == "authentication_failed"
    assert not (event.get("contexts") or {}).get("dramatiq", {}).get("data")  # no payload
    assert event["transaction_info"]["source"] == "task"  # sentry-sdk's own fields stay
    raw = sentry.raw
    assert API_KEY.encode() not in raw and source.encode() not in raw
