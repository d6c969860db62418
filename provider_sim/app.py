"""The simulator's aiohttp application: the /v1 provider API and the control endpoints.

Handlers read the request, let `SimulatorState` decide the outcome, and deliver
it, including the connection-level faults (reset, timeout, trickle). The order of
events is described in `provider_sim.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from provider_sim.faults import Step
from provider_sim.state import (
    ChargeParams,
    JSONObject,
    RequestRecord,
    SimulatorState,
    StoredOutcome,
)

__all__ = ["STATE_KEY", "TRANSPORTS_KEY", "build_app", "close_transports"]

DROP_POLL_S = 0.05

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"

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


STATE_KEY = web.AppKey("state", SimulatorState)
#: Every connection's transport, so that stopping the simulator can close what
#: aiohttp's own shutdown leaves open: filled here for each request, and by the
#: server (`provider_sim.server`) for connections that never carried one.
TRANSPORTS_KEY = web.AppKey("transports", weakref.WeakSet[asyncio.Transport])


@web.middleware
async def _track_transport(request: web.Request, handler: Handler) -> web.StreamResponse:
    if isinstance(request.transport, asyncio.Transport):
        request.app[TRANSPORTS_KEY].add(request.transport)
    return await handler(request)


def close_transports(app: web.Application) -> None:
    """Abort every connection still open after the server shut down.

    Closing ones too: ``close()`` keeps the socket open until the client has read
    what is still buffered for it (an answer to ``/_requests/all``, say), which a
    client that stopped reading never does; the socket would then outlive the event
    loop. ``abort()`` drops the buffer and closes at the next turn of the loop; on a
    connection already lost it does nothing.
    """
    transports: weakref.WeakSet[asyncio.Transport] = app[TRANSPORTS_KEY]
    for transport in list(transports):
        transport.abort()


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
    """Sleep ``delay_s``; return False as soon as the client hangs up meanwhile.

    "As soon as" matters: the request stops counting as in flight then, and a client
    that gave up at its deadline may already have sent its next request. So the
    socket is watched (`_watch_hang_up`) rather than polled; polling every
    ``DROP_POLL_S`` remains where the event loop cannot watch a socket.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay_s
    with _watch_hang_up(request) as hung_up:
        while True:
            transport = request.transport
            if transport is None or transport.is_closing() or hung_up.done():
                return False
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return True
            await asyncio.wait({hung_up}, timeout=min(remaining_s, DROP_POLL_S))


@contextlib.contextmanager
def _watch_hang_up(request: web.Request) -> Iterator[asyncio.Future[None]]:
    """A future set the moment the client's end of the connection closes.

    The request has been read whole and the answer is being held, so the client has
    nothing more to send: the socket turns readable only when it closes. A duplicate of
    the socket's descriptor is watched (the transport keeps its own) and peeked at, so
    nothing is taken from the transport. Never set where that is not possible.
    """
    loop = asyncio.get_running_loop()
    hung_up: asyncio.Future[None] = loop.create_future()
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    watcher: socket.socket | None = None
    try:
        if sock is not None:
            watcher = socket.socket(fileno=os.dup(sock.fileno()))
            watcher.setblocking(False)
            fd = watcher.fileno()
            loop.add_reader(fd, _peek_hang_up, watcher, hung_up, loop)
    except (OSError, NotImplementedError, ValueError):
        pass  # polling only
    try:
        yield hung_up
    finally:
        if watcher is not None:
            with contextlib.suppress(OSError, NotImplementedError, ValueError):
                loop.remove_reader(watcher.fileno())
            watcher.close()
        if not hung_up.done():
            hung_up.cancel()


def _peek_hang_up(
    watcher: socket.socket, hung_up: asyncio.Future[None], loop: asyncio.AbstractEventLoop
) -> None:
    try:
        data = watcher.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return
    except OSError:
        data = b""  # reset
    if data:  # the client sent something after all: stop watching, polling goes on
        loop.remove_reader(watcher.fileno())
        return
    loop.remove_reader(watcher.fileno())
    if not hung_up.done():
        hung_up.set_result(None)


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
        request.headers.get(IDEMPOTENCY_KEY_HEADER) if is_charge else None,
        is_charge=is_charge,
        opened=request,
        label=f"{request.method} {request.path}",
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
        state.end_request(record, status, opened=request)


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
    try:  # a slow request holds its key in use all along: a second one gets a 409
        slow = step is Step.SLOW
        await asyncio.sleep(state.faults.timeout_delay_s if slow else state.latency_s())
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
    if state.outage_active() and state.faults.outage_mode != "charges":
        return await _outage(request, state)
    if state.draw_lookup_error():
        await asyncio.sleep(state.latency_s())
        return _api_error(503)
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


async def _get_request_log(request: web.Request) -> web.StreamResponse:
    log = request.app[STATE_KEY].request_log()
    return web.json_response([record.to_log_dict(key) for key, record in log])


async def _get_books(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE_KEY].books())


async def _forget_keys(request: web.Request) -> web.StreamResponse:
    return web.json_response({"forgotten": request.app[STATE_KEY].forget_keys()})


def build_app(state: SimulatorState) -> web.Application:
    """The aiohttp application serving the provider API and the simulator endpoints."""
    app = web.Application(middlewares=[_track_transport, _v1_middleware])
    app[STATE_KEY] = state
    app[TRANSPORTS_KEY] = weakref.WeakSet()
    app.router.add_post("/v1/charges", _create_charge)
    app.router.add_get("/v1/charges", _lookup_by_key)
    app.router.add_get("/v1/charges/{charge_id}", _get_charge)
    app.router.add_get("/_stats", _get_stats)
    app.router.add_post("/_stats/reset", _reset_stats)
    app.router.add_get("/_faults", _get_faults)
    app.router.add_post("/_faults", _post_faults)
    app.router.add_get("/_requests", _get_requests)
    app.router.add_get("/_requests/all", _get_request_log)
    app.router.add_get("/_charges", _get_books)
    app.router.add_post("/_keys/forget", _forget_keys)
    return app
