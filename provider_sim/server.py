"""The payment provider simulator: the provider's HTTP contract (provider-api.md) plus faults.

(aiohttp: it can reset a connection unanswered, trickle a body, and hold hundreds of slow
requests on one event loop in one thread.)

``POST /v1/charges``, in order: authentication; an outage window (neither uses a script
step); one script step (without a script, the random faults reset, rate_limit, error);
validation and the idempotency check, decided on arrival (replays, 409s); the outcome
(decline or success, stored); its delivery (normal, timeout, trickle). Latency is slept
just before answering, after a new charge claims its key: requests pile up in flight,
and a second one with the key meanwhile gets a 409. The timeout fault stores the charge
*first*, releases the key, then waits ``timeout_delay_s`` (less if the client hangs up):
a retry with the key meanwhile gets the idempotent replay (200, ``Idempotent-Replayed:
true``) and a lookup by key finds the charge. Random faults (reset, rate_limit, error,
decline, timeout, trickle) and script steps apply to ``POST /v1/charges`` only; latency
and outages, to every /v1 request.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import httpx
from aiohttp import web

from provider_sim.app import TRANSPORTS_KEY, build_app, close_transports
from provider_sim.faults import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    Faults,
    add_cli_arguments,
    faults_from_args,
)
from provider_sim.state import (
    ChargeParams,
    JSONObject,
    RequestRecord,
    SimulatorState,
    StoredOutcome,
)

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

SHUTDOWN_TIMEOUT_S = 1.0
LISTEN_BACKLOG = 1024
#: Turns of the event loop an accepted socket takes to become a connection: the
#: loop's accept task runs (transport and protocol made), then ``connection_made``.
ACCEPT_TURNS = 3


class _Serving:
    """A started simulator: the aiohttp runner and the socket it listens on."""

    def __init__(self, runner: web.AppRunner, listener: socket.socket) -> None:
        self.runner = runner
        self.listener = listener
        self.port = int(listener.getsockname()[1])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port), for `web.SockSite`.

    The simulator owns its listening socket so that stopping can stop accepting
    before the server closes (see `_stop`).
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


async def _start(state: SimulatorState, host: str, port: int) -> _Serving:
    listener = _listen(host, port)
    try:
        runner = web.AppRunner(
            build_app(state), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            await web.SockSite(runner, listener, backlog=LISTEN_BACKLOG).start()
        except BaseException:
            await runner.cleanup()
            raise
    except BaseException:
        listener.close()
        raise
    return _Serving(runner, listener)


async def _stop(serving: _Serving) -> None:
    """Shut the server down so that no connection outlives the event loop.

    1. Stop accepting, and give the sockets accepted already the turns of the loop
       they take to become connections, while the server is still open. (The
       loop's accept task for a socket accepted just before the server closed
       runs after it: making the transport then fails, on Python 3.11 an
       assertion in ``Server._attach``, and neither the half-made transport nor
       the socket is ever closed. A connection made after aiohttp's shutdown began
       is not shut down by it either.)
    2. aiohttp's shutdown: the server closes, idle connections close, handlers get
       ``SHUTDOWN_TIMEOUT_S``, then are cancelled.
    3. Abort every connection still open, closing ones with unsent data too
       (`close_transports`), and let the aborts and the cancelled handlers finish
       while the loop still runs.
    """
    runner, app = serving.runner, serving.runner.app
    asyncio.get_running_loop().remove_reader(serving.listener.fileno())
    for _ in range(ACCEPT_TURNS):
        await asyncio.sleep(0)
    if runner.server is not None:
        _track_connections(runner.server, app)
    await runner.cleanup()
    close_transports(app)
    await asyncio.sleep(0)  # the aborts close their sockets
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    if pending:
        await asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT_S)


def _track_connections(server: web.Server, app: web.Application) -> None:
    """Add the transport of every connection the server knows to `TRANSPORTS_KEY`."""
    transports = app[TRANSPORTS_KEY]
    for handler in server.connections:
        if isinstance(handler.transport, asyncio.Transport):
            transports.add(handler.transport)


def _resolve_api_key(api_key: str | None) -> str:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    if not key:
        raise ValueError(f"the simulator needs an API key: pass api_key or set {API_KEY_ENV}")
    return key


async def _serve_until_signal(states: list[SimulatorState], host: str, ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    servings = []
    try:
        for state, port in zip(states, ports, strict=True):
            servings.append(await _start(state, host, port))
            logger.info("provider simulator listening on http://%s:%d", host, servings[-1].port)
        await stop.wait()
        logger.info("provider simulator stopping")
    finally:
        for serving in servings:
            await _stop(serving)
        for sig in signals:
            loop.remove_signal_handler(sig)


def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int | Sequence[int] = DEFAULT_PORT,
    api_key: str | None = None,
    faults: Faults | None = None,
) -> None:
    """Run the simulator until SIGINT or SIGTERM (the ``payq provider-sim`` command).

    Several ports: as many independent providers, one per port, each with its own books,
    counters and fault knobs (all start with ``faults``; ``POST /_faults`` on one port
    changes that provider's only). ``api_key`` defaults to the
    ``PAYMENT_PROVIDER_API_KEY`` environment variable.
    """
    ports = [port] if isinstance(port, int) else list(port)
    key = _resolve_api_key(api_key)
    states = [SimulatorState(key, faults) for _ in ports]
    asyncio.run(_serve_until_signal(states, host, ports))


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
        serving = await _start(self.state, self.host, self.port)
        self.port = serving.port
        try:
            self._ready.set()
            await self._stop.wait()
        finally:
            await _stop(serving)
