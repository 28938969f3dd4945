"""The HTTP layer's guards, ahead of any handler (see ``limits`` for the whole list).

* ``RequestBodyMiddleware`` (ASGI): reads a request's body before the app sees it, at most
  ``max_body_bytes`` of it (413; a Content-Length over the limit is refused before reading)
  and within ``read_timeout`` seconds of the request head (408), then hands the app the
  whole body at once. Both answers close the connection. Before a 413 the rest of the body
  is read and thrown away (at most ``MAX_DISCARD_BYTES``, within the read time-out): a
  client such as httpx sends its whole body before it reads the answer, and a connection
  closed with unread data in it is reset, which throws away the answer too.
* ``JSONBodyRoute`` (the routes' class): a route that takes a body requires
  ``Content-Type: application/json`` (415) and parses the body with
  ``json_bounds.parse_json_body`` (400 for what JSON or Unicode do not allow, or what
  nests too deeply), off the event loop when it is large; FastAPI then validates the
  parsed object against the route's model.
* ``guarded_h11_protocol``: uvicorn's h11 protocol, plus a time-out on the request head
  and a cap on open connections. uvicorn has no head time-out: a client that sends half a
  request head (or nothing) keeps its connection, and its slot under the cap, forever.
  Here a connection whose request head is not complete ``read_timeout`` seconds after the
  connection opened (or after the first byte of a later request on a kept-alive
  connection) is closed. Idle kept-alive connections keep uvicorn's own
  ``--timeout-keep-alive``. A request that arrives while more than ``max_connections``
  connections are open gets a 503 in OpenAI's shape and its connection is closed (uvicorn's
  own ``limit_concurrency`` answers in plain text). A client that stops reading its response
  (a stream it never reads: the socket's buffers fill, the transport pauses writing) for
  more than ``stall_timeout`` seconds is dropped: its connection is aborted, which the app
  sees as a disconnect, so its request is aborted and its KV blocks freed. Without this, a
  stream's writer would wait on that client forever.
"""

from __future__ import annotations

import asyncio
import email.message
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import (
    APIError,
    invalid_request,
    request_timeout,
    request_too_large,
    unsupported_media_type,
)
from tokenmill.server.json_bounds import parse_json_body

logger = logging.getLogger("tokenmill.server")

# bodies above this are parsed in a worker thread (a few ms of the event loop below it)
_PARSE_INLINE_BYTES = 64 * 1024
# the most of a too-large body read and thrown away so that its client can read the 413
MAX_DISCARD_BYTES = 64 * 1024 * 1024


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error.response()
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


class RequestBodyMiddleware:
    """Reads each request body in full, bounded in size and time (see the module doc)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                has_body = True
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                has_body = True
        if not has_body:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout

        async def next_message() -> Message | None:
            """The next body message, None once the client left; TimeoutError past the
            deadline."""
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            return None if message["type"] == "http.disconnect" else message

        async def too_large(more: bool) -> None:
            """Reads the rest of the body (bounded; see the module doc), then answers 413."""
            discarded = 0
            while more and discarded <= MAX_DISCARD_BYTES:
                try:
                    message = await next_message()
                except TimeoutError:
                    break
                if message is None:
                    return  # nobody is left to answer
                discarded += len(message.get("body", b""))
                more = message.get("more_body", False)
            await _refuse(request_too_large(self.max_body_bytes), scope, receive, send)

        if length is not None and length > self.max_body_bytes:
            await too_large(length <= MAX_DISCARD_BYTES)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await next_message()
            except TimeoutError:
                await _refuse(request_timeout(self.read_timeout), scope, receive, send)
                return
            if message is None:
                return  # the client left while sending
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await too_large(more)
                return
            chunks.append(chunk)
            if not more:
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then only the disconnect remains

        await self.app(scope, replay, send)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


async def load_json_body(request: Request) -> None:
    """Parses and checks the body, and leaves it where FastAPI looks for it."""
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise unsupported_media_type(content_type)
    raw = await request.body()
    if not raw:
        raise invalid_request("The request body is empty; it must be a JSON object ({...}).")
    if len(raw) > _PARSE_INLINE_BYTES:
        value = await asyncio.to_thread(parse_json_body, raw)
    else:
        value = parse_json_body(raw)
    request._json = value  # starlette's cache of request.json(), which FastAPI reads


class JSONBodyRoute(APIRoute):
    """A FastAPI route whose JSON body goes through ``load_json_body`` first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked_handler(request: Request) -> Response:
            await load_json_body(request)
            return await handler(request)

        return checked_handler


def _too_many_connections(max_connections: int) -> APIError:
    return APIError(503, f"The server has too many open connections (at most "
                         f"{max_connections}); retry later.", type="server_error",
                    code="too_many_connections")


def guarded_h11_protocol(read_timeout: float, max_connections: int,
                         stall_timeout: float | None = None) -> type:
    """uvicorn's ``H11Protocol`` with a time-out on the request head, a connection cap and
    (unless ``stall_timeout`` is None) a bound on how long a response may wait for its
    client to read (see the module doc); pass it as ``uvicorn.Config(http=...)``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            app, connections = self.app, self.connections

            async def capped(scope: Scope, receive: Receive, send: Send) -> None:
                if scope["type"] == "http" and len(connections) > max_connections:
                    await _refuse(_too_many_connections(max_connections), scope, receive, send)
                    return
                if stall_timeout is None or scope["type"] != "http":
                    await app(scope, receive, send)
                    return

                async def unstalled_send(message: Message) -> None:
                    # uvicorn's send waits while the transport's write buffer is full;
                    # here that wait is bounded
                    if self.flow.write_paused and not self.transport.is_closing():
                        try:
                            await asyncio.wait_for(self.flow.drain(), stall_timeout)
                        except TimeoutError:
                            self._drop_stalled()
                            return
                    await send(message)

                await app(scope, receive, unstalled_send)

            self.app = capped

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(read_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _drop_stalled(self) -> None:
            """The client has not read for ``stall_timeout`` seconds: abort (not close,
            which would wait for the full buffer to drain). uvicorn reports the lost
            connection to the app as a disconnect."""
            if not self.transport.is_closing():
                logger.warning("dropping a client that stopped reading its response for "
                               "%g s (--stream-stall-timeout): %s", stall_timeout,
                               self.client)
                self.transport.abort()

        def _head_pending(self) -> bool:
            return self.conn.their_state is h11.IDLE

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._head_pending() and not self.transport.is_closing():
                self.logger.debug("closing a connection whose request head did not arrive "
                                  "within %g s", read_timeout)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_pending():
                self._arm()  # a head has started (or is still incomplete)
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # a pipelined request may already be partly here
            if self._head_pending() and self.conn.trailing_data[0]:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
