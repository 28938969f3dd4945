"""Streams between the engine and the HTTP client: admission, merging, disconnects, SSE.

A request with k prompts runs k engine requests. ``EngineStreams.start()`` starts one
task per engine request ("pump") that moves its outputs into a shared queue, so the
handler reads them merged, in arrival order.

Admission. ``AsyncEngine.generate()`` refuses a request (ValueError, QueueFullError,
EngineDeadError) synchronously, before its first wait. ``start()`` therefore creates the
pumps and yields to the event loop once: asyncio runs ready tasks in FIFO order, so by
the time ``start()`` resumes every pump has either been refused or is waiting for
tokens. A refusal is raised from ``start()`` and becomes an HTTP error status; an
accepted request can answer at once, and a streaming response sends its headers
without waiting for the first token.

Aborts. Closing ``EngineStreams`` (``aclose()``) cancels the pumps; the cancellation
travels into ``AsyncEngine.generate()``, whose ``finally`` aborts the engine request and
frees its KV blocks. It is closed on every path: after a non-streaming response,
when ``until_disconnected()`` sees the client hang up first, and when a streaming
response ends for any reason, client disconnect included (``EventStreamResponse``).

Framing. ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]\\n\\n``. An error after the
first byte can only be reported inside the stream, as a ``data: {"error": ...}`` frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.server.errors import ClientDisconnected, to_api_error

logger = logging.getLogger("tokenmill.server")

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
_END = object()


def sse_frame(payload_json: str) -> str:
    return f"data: {payload_json}\n\n"


class EngineStreams:
    """The merged output streams of one HTTP request; iterate for ``(index, item)``."""

    def __init__(self, streams: list[AsyncGenerator[Any, None]]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._refusals: list[Exception] = []
        self._remaining = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        self._running = len(self._tasks)
        self._on_done: list[Callable[[], None]] = []
        for t in self._tasks:
            t.add_done_callback(self._pump_done)

    def _pump_done(self, _task: asyncio.Task) -> None:
        self._running -= 1
        if self._running == 0:
            callbacks, self._on_done = self._on_done, []
            for callback in callbacks:
                callback()

    def on_done(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once every engine request has ended (finished or aborted)."""
        if self._running == 0:
            callback()
        else:
            self._on_done.append(callback)

    @classmethod
    async def start(cls, streams: list[AsyncGenerator[Any, None]]) -> EngineStreams:
        """Starts every stream; raises the first refusal (after aborting the others)."""
        self = cls(streams)
        await asyncio.sleep(0)  # every pump runs up to its first wait (see module doc)
        if self._refusals:
            await self.aclose()
            raise self._refusals[0]
        return self

    async def _pump(self, i: int, stream: AsyncGenerator[Any, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    self._queue.put_nowait((i, item))
            self._queue.put_nowait((i, _END))
        except Exception as e:
            self._refusals.append(e)
            self._queue.put_nowait((i, e))

    def __aiter__(self) -> EngineStreams:
        return self

    async def __anext__(self) -> tuple[int, Any]:
        while self._remaining:
            i, item = await self._queue.get()
            if item is _END:
                self._remaining -= 1
            elif isinstance(item, Exception):
                self._remaining = 0
                raise item
            else:
                return i, item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Aborts what is still running. The cancels are issued before the first await,
        so they happen even if this coroutine is itself cancelled."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read, so
    the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``; if the client disconnects first, cancels it and raises
    ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


class EventStreamResponse(StreamingResponse):
    """Server-sent events from ``frames`` (already ``data: ...`` formatted), ending with
    ``[DONE]``; closes ``streams`` when the response ends, however it ends."""

    def __init__(self, frames: AsyncIterator[str], streams: EngineStreams) -> None:
        super().__init__(self._body(frames), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.streams = streams

    @staticmethod
    async def _body(frames: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for frame in frames:
                yield frame
        except Exception as e:
            err = to_api_error(e)
            if err.status >= 500:
                logger.error("error in the middle of a stream", exc_info=e)
            yield sse_frame(json.dumps(err.body(), ensure_ascii=False))
        yield SSE_DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.streams.aclose()
