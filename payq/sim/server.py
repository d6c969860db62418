"""The payment provider simulator: the provider's HTTP contract (provider-api.md) plus faults.

Why aiohttp: the simulator has to abort a connection without answering (a reset,
with SO_LINGER 0), stream a body that trickles one byte at a time, and hold
hundreds of slow requests in flight on one event loop; aiohttp gives access to the
transport and to streamed responses, and runs all of it in one thread.

Order of events for ``POST /v1/charges``: authentication, then an outage window
(neither consumes a script step), then one script step (or, without a script,
the random faults in the order reset, rate_limit, error), then validation and the
idempotency check, then the outcome (decline or success, stored) and its delivery
(normal, timeout, trickle). Replays and 409s are decided on arrival. Latency is
slept just before answering; a new charge claims its key before that sleep, so
requests pile up in flight and a second request with the key gets a 409.

The timeout fault charges and stores the outcome *first*, then waits
``timeout_delay_s`` before answering. The key is no longer in flight during the
wait: a retry with the same key gets the idempotent replay (200,
``Idempotent-Replayed: true``) and a lookup by key finds the charge. The wait ends
early when the client hangs up.

Random faults (reset, rate_limit, error, decline, timeout, trickle) and script
steps apply to ``POST /v1/charges`` only; latency and outages apply to every /v1
request.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
from aiohttp import web

from payq.sim.faults import KNOBS, Faults, Step, add_fault_arguments, faults_from_args

__all__ = [
    "API_KEY_ENV",
    "ChargeParams",
    "RequestRecord",
    "SimulatorState",
    "SimulatorThread",
    "StoredOutcome",
    "add_cli_arguments",
    "build_app",
    "serve",
    "serve_from_args",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAYMENT_PROVIDER_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8099
SHUTDOWN_TIMEOUT_S = 1.0
LISTEN_BACKLOG = 1024
DROP_POLL_S = 0.05

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"

JSONObject = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_EARLY_STEPS = frozenset(
    {
        Step.ERROR,
        Step.RATE_LIMIT,
        Step.RESET,
        Step.INVALID_REQUEST,
        Step.AUTH,
        Step.KEY_IN_USE,
        Step.KEY_REUSED,
        Step.BAD_BODY,
        Step.UNEXPECTED_STATUS,
    }
)


# --- state -----------------------------------------------------------------------

MAX_AMOUNT = 99_999_999
ERROR_STATUSES = (500, 502, 503, 504)
DECLINE_TOKENS = {
    "tok_chargeDeclined": "card_declined",
    "tok_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "tok_chargeDeclinedExpiredCard": "expired_card",
}
DECLINE_MESSAGES = {
    "card_declined": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
}
_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")
_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")


@dataclass(frozen=True)
class ChargeParams:
    """A validated charge request; ``canonical`` is the whole body, for key comparison."""

    key: str
    canonical: str
    amount: int
    currency: str
    source: str

    @staticmethod
    def validate(body: JSONObject) -> tuple[str, str] | None:
        """``(param, message)`` for the first invalid field, or None if the body is valid."""
        amount = body.get("amount")
        if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT:
            return "amount", f"amount must be an integer from 1 to {MAX_AMOUNT} (minor units)"
        currency = body.get("currency")
        if not isinstance(currency, str) or not _CURRENCY_RE.fullmatch(currency):
            return "currency", "currency must be a three-letter code"
        source = body.get("source")
        if not isinstance(source, str) or not source.strip():
            return "source", "source must be a non-empty payment token"
        return None

    @classmethod
    def from_body(cls, key: str, body: JSONObject) -> ChargeParams:
        """Build from a body that passed `validate`."""
        return cls(
            key=key,
            canonical=json.dumps(body, sort_keys=True),
            amount=body["amount"],
            currency=body["currency"].lower(),
            source=body["source"],
        )


@dataclass
class RequestRecord:
    """One ``POST /v1/charges`` as it reached the simulator (``GET /_requests``).

    ``status`` is None when the client got no complete answer (a reset, or it
    hung up first); ``fault`` names the fault or script step that fired.
    """

    at: float
    status: int | None = None
    fault: str | None = None
    retry_after_s: int | None = None
    replayed: bool = False

    def to_dict(self) -> JSONObject:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StoredOutcome:
    """A stored 200 or 402, replayed for a later request with the same key and body."""

    canonical: str
    status: int
    body: JSONObject
    charge_id: str


class SimulatorState:
    """Everything the simulator remembers: faults, charges, stored keys, counters.

    Used from one event loop only, so its methods need no locks; a decision taken
    between two awaits is atomic.
    """

    requests: int
    charge_requests: int
    charges_created: int
    declines: int
    replays: int
    max_in_flight: int
    by_status: dict[str, int]
    charges: dict[str, JSONObject]
    _outcomes: dict[str, StoredOutcome]
    _new_charges_by_key: Counter[str]
    _log: dict[str, list[RequestRecord]]

    def __init__(self, api_key: str, faults: Faults | None = None) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.api_key = api_key
        self.faults = Faults()
        self.rng = random.Random()
        self.script: deque[Step] = deque()
        self.outage_until: float | None = None
        self.in_flight = 0
        self._claims: dict[str, str] = {}  # idempotency key -> canonical body, in flight
        self._install(faults or Faults(), changed=set(KNOBS))
        self.reset_stats()

    # faults
    def _install(self, faults: Faults, changed: set[str]) -> None:
        self.faults = faults
        if "script" in changed:
            self.script = deque(Step(step) for step in faults.script)
        if "seed" in changed:
            self.rng.seed(faults.seed)
        if "outage_s" in changed:
            has_outage = faults.outage_s > 0
            self.outage_until = time.monotonic() + faults.outage_s if has_outage else None

    def update_faults(self, data: JSONObject) -> None:
        """Merge a partial update (``POST /_faults``); ``{"reset": true}`` restores defaults.

        Raises ``ValueError`` naming the knob; nothing changes then.
        """
        knobs = dict(data)
        reset = knobs.pop("reset", False)
        if not isinstance(reset, bool):
            raise ValueError(f"'reset' must be true or false, got {reset!r}")
        base = Faults() if reset else self.faults
        self._install(base.updated(knobs), set(KNOBS) if reset else set(knobs))

    def faults_view(self) -> JSONObject:
        """Current knobs; ``script`` holds the steps not yet consumed."""
        view = self.faults.to_dict()
        view["script"] = [step.value for step in self.script]
        view["outage_remaining_s"] = round(self.outage_remaining_s(), 3)
        return view

    def outage_remaining_s(self) -> float:
        """Seconds left in the outage window (0 when there is none)."""
        if self.outage_until is None:
            return 0.0
        return max(0.0, self.outage_until - time.monotonic())

    def outage_active(self) -> bool:
        """True while the outage window lasts."""
        return self.outage_remaining_s() > 0

    def latency_s(self) -> float:
        """Latency to sleep before this answer: fixed plus uniform jitter."""
        jitter_ms = self.rng.uniform(0, self.faults.latency_jitter_ms)
        return (self.faults.latency_ms + jitter_ms) / 1000

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def pop_script_step(self) -> Step | None:
        """The next script step, consumed, or None when the script is empty."""
        return self.script.popleft() if self.script else None

    def draw_early_fault(self) -> Step | None:
        """Random faults that fire before validation, in order: reset, rate_limit, error."""
        if self._draw(self.faults.reset_rate):
            return Step.RESET
        if self._draw(self.faults.rate_limit_rate):
            return Step.RATE_LIMIT
        if self._draw(self.faults.error_rate):
            return Step.ERROR
        return None

    def random_error_status(self) -> int:
        """A 5xx status chosen at random."""
        return self.rng.choice(ERROR_STATUSES)

    # request accounting
    def begin_request(self, key: str | None, *, is_charge: bool) -> RequestRecord | None:
        """Count a /v1 request on arrival; log it if it is a charge with a key."""
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if not is_charge:
            return None
        self.charge_requests += 1
        if key is None:
            return None
        record = RequestRecord(at=time.time())
        self._log.setdefault(key, []).append(record)
        return record

    def end_request(self, record: RequestRecord | None, status: int | None) -> None:
        """Count a /v1 request as finished with ``status`` (None: no answer)."""
        self.in_flight -= 1
        label = "no_answer" if status is None else str(status)
        self.by_status[label] = self.by_status.get(label, 0) + 1
        if record is not None:
            record.status = status

    def requests_for(self, key: str) -> list[RequestRecord]:
        """Every charge request with ``key``, in arrival order."""
        return list(self._log.get(key, []))

    # idempotency and charges
    @staticmethod
    def valid_key(key: str) -> bool:
        """An idempotency key is 1..255 printable ASCII characters."""
        return _KEY_RE.fullmatch(key) is not None

    def check_key(self, params: ChargeParams) -> tuple[str | None, StoredOutcome | None]:
        """``(conflict code, None)``, ``(None, outcome to replay)`` or ``(None, None)``."""
        claimed = self._claims.get(params.key)
        if claimed is not None:
            same = claimed == params.canonical
            return ("idempotency_key_in_use" if same else "idempotency_key_reused"), None
        stored = self._outcomes.get(params.key)
        if stored is None:
            return None, None
        if stored.canonical != params.canonical:
            return "idempotency_key_reused", None
        self.replays += 1
        return None, stored

    def claim(self, params: ChargeParams) -> None:
        """Mark the key in flight until `release`."""
        self._claims[params.key] = params.canonical

    def release(self, params: ChargeParams) -> None:
        """End the in-flight mark of the key."""
        self._claims.pop(params.key, None)

    def key_in_flight(self, key: str) -> bool:
        """True while a first request with ``key`` is being processed."""
        return key in self._claims

    def make_outcome(
        self, params: ChargeParams, step: Step | None
    ) -> tuple[StoredOutcome, Step | None]:
        """Charge or decline, store the outcome; return it and the fault that fired.

        ``step`` is the script step of the request (None: draw the random knobs).
        """
        code = DECLINE_TOKENS.get(params.source)
        fault: Step | None = None
        if step is None:
            if code is None and self._draw(self.faults.decline_rate):
                code, fault = "card_declined", Step.DECLINE
            if self._draw(self.faults.timeout_rate):
                fault = Step.TIMEOUT
            elif self._draw(self.faults.trickle_rate):
                fault = Step.TRICKLE
        elif step is Step.DECLINE:
            code, fault = code or "card_declined", Step.DECLINE
        elif step in (Step.TIMEOUT, Step.TRICKLE):
            fault = step
        charge_id = "ch_" + secrets.token_hex(12)
        charge: JSONObject = {
            "id": charge_id,
            "object": "charge",
            "status": "succeeded" if code is None else "failed",
            "amount": params.amount,
            "currency": params.currency,
            "created": int(time.time()),
        }
        if code is None:
            status, body = 200, dict(charge)
            self.charges_created += 1
            self._new_charges_by_key[params.key] += 1
        else:
            error = {
                "type": "card_error",
                "code": code,
                "message": DECLINE_MESSAGES[code],
                "charge": charge_id,
            }
            charge["error"] = error
            status, body = 402, {"error": dict(error)}
            self.declines += 1
        self.charges[charge_id] = charge
        outcome = StoredOutcome(params.canonical, status, body, charge_id)
        self._outcomes[params.key] = outcome
        return outcome, fault

    def charge_for_key(self, key: str) -> JSONObject | None:
        """The charge object created with ``key``, or None."""
        outcome = self._outcomes.get(key)
        return None if outcome is None else self.charges.get(outcome.charge_id)

    def forget_keys(self) -> int:
        """Drop every stored outcome (as if keys expired), keeping the counters.

        A client that then resends a charged key is charged again, and
        ``duplicate_charges`` shows it.
        """
        count = len(self._outcomes)
        self._outcomes.clear()
        return count

    # stats
    def stats(self) -> JSONObject:
        """The ``GET /_stats`` document."""
        return {
            "requests": self.requests,
            "charges": self.charges_created,
            "replays": self.replays,
            "duplicate_charges": sum(1 for n in self._new_charges_by_key.values() if n > 1),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "charge_requests": self.charge_requests,
            "declines": self.declines,
            "stored_keys": len(self._outcomes),
            "by_status": dict(sorted(self.by_status.items())),
        }

    def reset_stats(self) -> None:
        """Forget counters, charges, stored keys and the request log (not the faults)."""
        self.requests = 0
        self.charge_requests = 0
        self.charges_created = 0
        self.declines = 0
        self.replays = 0
        self.max_in_flight = self.in_flight
        self.by_status = {}
        self.charges = {}
        self._outcomes = {}
        self._new_charges_by_key = Counter()
        self._log = {}


STATE_KEY = web.AppKey("state", SimulatorState)
_RECORD_KEY = web.RequestKey("record", RequestRecord)
_NO_ANSWER_KEY = web.RequestKey("no_answer", bool)


# --- response bodies -------------------------------------------------------------


def _error(status: int, type_: str, **fields: Any) -> web.Response:
    return web.json_response({"error": {"type": type_, **fields}}, status=status)


def _invalid(message: str, param: str | None) -> web.Response:
    return _error(400, "invalid_request_error", message=message, param=param)


def _auth_error() -> web.Response:
    return _error(401, "authentication_error", message="invalid or missing API key")


def _key_error(code: str) -> web.Response:
    messages = {
        "idempotency_key_in_use": "a request with this idempotency key is in progress",
        "idempotency_key_reused": "this idempotency key was used with other parameters",
    }
    return _error(409, "idempotency_error", code=code, message=messages[code])


def _api_error(status: int) -> web.Response:
    return _error(status, "api_error", message="simulated provider error")


def _rate_limited(retry_after_s: int) -> web.Response:
    response = _error(429, "rate_limit_error", message="too many requests")
    response.headers["Retry-After"] = str(retry_after_s)
    return response


# --- connection-level faults -----------------------------------------------------


def _reset_connection(request: web.Request) -> web.StreamResponse:
    """Abort the connection with an RST; the returned response is never sent."""
    request[_NO_ANSWER_KEY] = True
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)


async def _wait_unless_dropped(request: web.Request, delay_s: float) -> bool:
    """Sleep ``delay_s``; return False early if the client hung up meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay_s
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        remaining_s = deadline - loop.time()
        if remaining_s <= 0:
            return True
        await asyncio.sleep(min(remaining_s, DROP_POLL_S))


async def _trickle(
    request: web.Request, status: int, body: JSONObject, duration_s: float
) -> web.StreamResponse:
    """Send the headers at once, then the body one byte at a time over ``duration_s``."""
    data = json.dumps(body).encode()
    response = web.StreamResponse(status=status)
    response.content_type = "application/json"
    response.content_length = len(data)
    interval_s = duration_s / len(data)
    try:
        await response.prepare(request)
        for index in range(len(data)):
            await asyncio.sleep(interval_s)
            await response.write(data[index : index + 1])
        await response.write_eof()
    except ConnectionError:
        request[_NO_ANSWER_KEY] = True
    return response


# --- /v1 middleware: auth, in-flight accounting, request log ----------------------


async def _finish(request: web.Request, response: web.StreamResponse) -> int | None:
    """Write the whole response now; the status the client got, or None if none."""
    if request.get(_NO_ANSWER_KEY):
        return None
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return None
    return None if request.get(_NO_ANSWER_KEY) else response.status


@web.middleware
async def _v1_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    state = request.app[STATE_KEY]
    is_charge = request.method == "POST" and request.path == "/v1/charges"
    record = state.begin_request(
        request.headers.get(IDEMPOTENCY_KEY_HEADER) if is_charge else None, is_charge=is_charge
    )
    if record is not None:
        request[_RECORD_KEY] = record
    status: int | None = None
    try:
        response: web.StreamResponse
        if request.headers.get("Authorization") != f"Bearer {state.api_key}":
            await asyncio.sleep(state.latency_s())
            response = _auth_error()
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(exc.status, "invalid_request_error", message=exc.reason)
        status = await _finish(request, response)
        return response
    finally:
        state.end_request(record, status)


# --- POST /v1/charges -------------------------------------------------------------


def _note(request: web.Request, fault: str, retry_after_s: int | None = None) -> None:
    record = request.get(_RECORD_KEY)
    if record is not None:
        record.fault = fault
        record.retry_after_s = retry_after_s


async def _outage(request: web.Request, state: SimulatorState) -> web.StreamResponse:
    _note(request, "outage")
    await asyncio.sleep(state.latency_s())
    if state.faults.outage_mode == "reset":
        return _reset_connection(request)
    return _api_error(503)


async def _early_answer(
    request: web.Request, state: SimulatorState, step: Step, *, scripted: bool
) -> web.StreamResponse:
    """Answer a fault that fires before validation; nothing is stored."""
    retry_after_s = state.faults.retry_after_s if step is Step.RATE_LIMIT else None
    _note(request, step.value, retry_after_s)
    await asyncio.sleep(state.latency_s())
    if step is Step.RESET:
        return _reset_connection(request)
    if step is Step.RATE_LIMIT:
        return _rate_limited(state.faults.retry_after_s)
    if step is Step.ERROR:
        return _api_error(503 if scripted else state.random_error_status())
    if step is Step.INVALID_REQUEST:
        return _invalid("simulated invalid request", "amount")
    if step is Step.AUTH:
        return _auth_error()
    if step is Step.KEY_IN_USE:
        return _key_error("idempotency_key_in_use")
    if step is Step.KEY_REUSED:
        return _key_error("idempotency_key_reused")
    if step is Step.BAD_BODY:
        return web.json_response({"hello": "world"})
    return web.Response(status=418, text="I'm a teapot (simulated unexpected status)")


async def _read_params(request: web.Request) -> ChargeParams | web.Response:
    """Validate the key header and the JSON body; a 400 response if they are wrong."""
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None or not SimulatorState.valid_key(key):
        return _invalid("Idempotency-Key must be 1..255 printable ASCII", IDEMPOTENCY_KEY_HEADER)
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _invalid("the body is not valid JSON", None)
    if not isinstance(body, dict):
        return _invalid("the body must be a JSON object", None)
    problem = ChargeParams.validate(body)
    if problem is not None:
        param, message = problem
        return _invalid(message, param)
    return ChargeParams.from_body(key, body)


def _replay(outcome: StoredOutcome) -> web.Response:
    return web.json_response(outcome.body, status=outcome.status, headers={REPLAYED_HEADER: "true"})


async def _create_charge(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if state.outage_active():
        return await _outage(request, state)
    step = state.pop_script_step()
    early = state.draw_early_fault() if step is None else step
    if early is not None and early in _EARLY_STEPS:
        return await _early_answer(request, state, early, scripted=step is not None)
    params = await _read_params(request)
    if isinstance(params, web.Response):
        await asyncio.sleep(state.latency_s())
        return params
    conflict, stored = state.check_key(params)  # decided on arrival, answered after latency
    if stored is not None:
        record = request.get(_RECORD_KEY)
        if record is not None:
            record.replayed = True
        await asyncio.sleep(state.latency_s())
        return _replay(stored)
    if conflict is not None:
        await asyncio.sleep(state.latency_s())
        return _key_error(conflict)
    state.claim(params)
    try:
        await asyncio.sleep(state.latency_s())
        outcome, fault = state.make_outcome(params, step)
    finally:
        state.release(params)
    if fault is not None:
        _note(request, fault)
    if fault == Step.TIMEOUT:
        if not await _wait_unless_dropped(request, state.faults.timeout_delay_s):
            request[_NO_ANSWER_KEY] = True
    elif fault == Step.TRICKLE:
        return await _trickle(
            request, outcome.status, outcome.body, state.faults.trickle_duration_s
        )
    return web.json_response(outcome.body, status=outcome.status)


# --- GET /v1/charges -------------------------------------------------------------


async def _lookup_by_key(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if state.outage_active():
        return await _outage(request, state)
    response = _charge_for_key(state, request.query.get("idempotency_key"))
    await asyncio.sleep(state.latency_s())  # decided on arrival, like a charge
    return response


def _charge_for_key(state: SimulatorState, key: str | None) -> web.Response:
    if key is None or not SimulatorState.valid_key(key):
        return _invalid("idempotency_key must be 1..255 printable ASCII", "idempotency_key")
    if state.key_in_flight(key):
        return _key_error("idempotency_key_in_use")
    charge = state.charge_for_key(key)
    if charge is None:
        return _error(404, "invalid_request_error", message="no charge with this idempotency key")
    return web.json_response(charge)


async def _get_charge(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if state.outage_active():
        return await _outage(request, state)
    charge = state.charges.get(request.match_info["charge_id"])
    await asyncio.sleep(state.latency_s())
    if charge is None:
        return _error(404, "invalid_request_error", message="no such charge", param="id")
    return web.json_response(charge)


# --- simulator control endpoints (no auth) ---------------------------------------


async def _read_json_object(request: web.Request) -> JSONObject | web.Response:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return _invalid("the body is not valid JSON", None)
    if not isinstance(data, dict):
        return _invalid("the body must be a JSON object", None)
    return data


async def _get_stats(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE_KEY].stats())


async def _reset_stats(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.reset_stats()
    return web.json_response(state.stats())


async def _get_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE_KEY].faults_view())


async def _post_faults(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    data = await _read_json_object(request)
    if isinstance(data, web.Response):
        return data
    try:
        state.update_faults(data)
    except ValueError as exc:
        return _invalid(str(exc), None)
    return web.json_response(state.faults_view())


async def _get_requests(request: web.Request) -> web.StreamResponse:
    key = request.query.get("idempotency_key")
    if key is None:
        return _invalid("idempotency_key is required", "idempotency_key")
    records = request.app[STATE_KEY].requests_for(key)
    return web.json_response([record.to_dict() for record in records])


async def _forget_keys(request: web.Request) -> web.StreamResponse:
    return web.json_response({"forgotten": request.app[STATE_KEY].forget_keys()})


def build_app(state: SimulatorState) -> web.Application:
    """The aiohttp application serving the provider API and the simulator endpoints."""
    app = web.Application(middlewares=[_v1_middleware])
    app[STATE_KEY] = state
    app.router.add_post("/v1/charges", _create_charge)
    app.router.add_get("/v1/charges", _lookup_by_key)
    app.router.add_get("/v1/charges/{charge_id}", _get_charge)
    app.router.add_get("/_stats", _get_stats)
    app.router.add_post("/_stats/reset", _reset_stats)
    app.router.add_get("/_faults", _get_faults)
    app.router.add_post("/_faults", _post_faults)
    app.router.add_get("/_requests", _get_requests)
    app.router.add_post("/_keys/forget", _forget_keys)
    return app


# --- runners ---------------------------------------------------------------------


async def _start(state: SimulatorState, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


def _resolve_api_key(api_key: str | None) -> str:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    if not key:
        raise ValueError(f"the simulator needs an API key: pass api_key or set {API_KEY_ENV}")
    return key


async def _serve_until_signal(state: SimulatorState, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, actual_port = await _start(state, host, port)
        try:
            logger.info("provider simulator listening on http://%s:%d", host, actual_port)
            await stop.wait()
            logger.info("provider simulator stopping")
        finally:
            await runner.cleanup()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    faults: Faults | None = None,
) -> None:
    """Run the simulator until SIGINT or SIGTERM (the ``payq provider-sim`` command).

    ``api_key`` defaults to the ``PAYMENT_PROVIDER_API_KEY`` environment variable.
    """
    state = SimulatorState(_resolve_api_key(api_key), faults)
    asyncio.run(_serve_until_signal(state, host, port))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port``, ``--api-key`` and every fault knob to ``parser``."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the Bearer key clients must send (default: ${API_KEY_ENV})",
    )
    add_fault_arguments(parser)


def serve_from_args(ns: argparse.Namespace) -> None:
    """`serve` with options added by `add_cli_arguments` (``ValueError`` if one is bad)."""
    serve(host=ns.host, port=ns.port, api_key=ns.api_key, faults=faults_from_args(ns))


class SimulatorThread:
    """The simulator on its own event loop in a background thread (for tests and demos).

    ``start()`` returns once the server listens; ``url`` then holds the real port.
    ``state`` is the live `SimulatorState`: read it freely, change it only over HTTP.
    """

    def __init__(
        self,
        api_key: str,
        faults: Faults | None = None,
        host: str = DEFAULT_HOST,
        port: int = 0,
    ) -> None:
        self.state = SimulatorState(api_key, faults)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (the actual port once started)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start serving; return when the server listens (or raise why it could not)."""
        if self._thread is not None:
            raise RuntimeError("the simulator thread was already started")
        self._thread = threading.Thread(target=self._run, name="payq-provider-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the provider simulator did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"the provider simulator did not stop within {timeout_s} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_faults(self, **knobs: Any) -> JSONObject:
        """``POST /_faults`` with ``knobs`` (a partial update; ``reset=True`` for defaults)."""
        return self._call("POST", "/_faults", knobs)

    def stats(self) -> JSONObject:
        """``GET /_stats``."""
        return self._call("GET", "/_stats", None)

    def _call(self, method: str, path: str, body: JSONObject | None) -> JSONObject:
        response = httpx.request(method, self.url + path, json=body, timeout=5.0)
        response.raise_for_status()
        data: JSONObject = response.json()
        return data

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() in the caller's thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner, self.port = await _start(self.state, self.host, self.port)
        try:
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
