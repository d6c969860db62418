"""An end-to-end deadline for one HTTP call, enforced on every socket operation.

httpx's timeouts bound each connect, read or write on its own: a response that
trickles in one byte per second never trips a 5 s read timeout. Here the network
backend under httpx caps each socket operation at what is left of the call's
deadline, so the whole call ends at ``PAYMENT_TIMEOUT_MS`` whatever the server
does. (httpx has no deadline of its own; wrapping httpcore's public
``NetworkBackend`` interface is the smallest way to get one.)
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import ssl
import time
import typing
from collections.abc import Iterator

import httpcore
import httpx

__all__ = ["DeadlineTransport", "SendWindowClosed", "deadline"]

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "payq_http_deadline", default=None
)
_send_by: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "payq_http_send_by", default=None
)


class SendWindowClosed(Exception):
    """The request was not (completely) sent: its send-by time had passed."""


@contextlib.contextmanager
def deadline(seconds: float, *, send_by: float | None = None) -> Iterator[None]:
    """Every socket operation inside this block ends by ``seconds`` from now; with
    ``send_by`` (a ``time.monotonic()`` moment), no byte of a request is written after it:
    a process frozen on its way to the provider sends nothing once it thaws too late."""
    token = _deadline.set(time.monotonic() + seconds)
    send_token = _send_by.set(send_by)
    try:
        yield
    finally:
        _send_by.reset(send_token)
        _deadline.reset(token)


def _capped(timeout: float | None, on_expiry: type[Exception]) -> float | None:
    end = _deadline.get()
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise on_expiry("the call's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose operations end by the call's deadline, and whose requests go out
    whole: httpcore writes a request's head and its body apart, and a process frozen
    between the two would hold a half-sent request open at the provider for as long as
    it is frozen, past its fleet slot. So a request is held until it is complete (by its
    ``Content-Length``) and written in one go; a chunked one goes as it comes."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        self._pending = b""
        self._chunked = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _capped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._chunked:
            self._chunked = not buffer.endswith(b"0\r\n\r\n")
            self._send(buffer, timeout)
            return
        self._pending += buffer
        complete, self._chunked = _request_state(self._pending)
        if complete or self._chunked:
            data, self._pending = self._pending, b""
            self._send(data, timeout)

    def _send(self, data: bytes, timeout: float | None) -> None:
        send_by = _send_by.get()
        if send_by is not None and time.monotonic() > send_by:
            self._inner.close()  # a request cut short is never processed: no half of it goes
            raise SendWindowClosed("the request's send-by time passed before it was sent")
        self._inner.write(data, _capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._inner.start_tls(
                ssl_context, server_hostname, _capped(timeout, httpcore.ConnectTimeout)
            )
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)


def _request_state(data: bytes) -> tuple[bool, bool]:
    """Whether ``data`` holds a whole request (head, and the body its length says), and
    whether its body is chunked (its head is then complete, and the body streams)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False, False
    head = data[:end]
    if _CHUNKED.search(head):
        return False, True
    length = _CONTENT_LENGTH.search(head)
    return len(data) >= end + 4 + (int(length.group(1)) if length else 0), False


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, _capped(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(
            path, _capped(timeout, httpcore.ConnectTimeout), socket_options
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport over a connection pool whose sockets obey ``deadline``."""

    def __init__(self, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend(),
        )
