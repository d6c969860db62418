"""The request size limit, ``SERVE_MAX_BODY_BYTES``: 413 in payq's error shape.

Our own, small, because the framework's cannot keep the shape: FastAPI's
``max_body_size`` (Starlette's ``RequestBodyLimitMiddleware``) sits outside every
user middleware and replaces the answer to a request whose ``Content-Length`` is over
the limit with a plain-text 413, whatever the app sent.

A declared size over the limit is answered at once, the body unread. A body sent
without a size (chunked) is counted as it arrives: the read that passes the limit
raises a 413 ``HTTPException`` inside the route, where the error handlers render it.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.intake.errors import ErrorCode, error_response

__all__ = ["RejectLargeBody"]


class RejectLargeBody:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _over(Headers(scope=scope).get("content-length", ""), self.max_bytes):
            response = error_response(
                413,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def _over(declared: str, max_bytes: int) -> bool:
    """A well-formed Content-Length over the limit (a malformed one is the server's to refuse)."""
    if not (declared.isascii() and declared.isdigit()):
        return False
    return len(declared) > 18 or int(declared) > max_bytes
