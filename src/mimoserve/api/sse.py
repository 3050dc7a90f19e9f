"""Server-sent events framing of a chunk stream, with in-stream errors and `[DONE]`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mimoserve.api.errors import error_body
from mimoserve.errors import EngineError, MimoError
from mimoserve.protocol.chat import ChatCompletionChunk
from mimoserve.streams import ClosableStream, OwnedStream

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def frame(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def named_frame(event: str, data: dict[str, Any]) -> bytes:
    """An event with its type named (`event: ...`), as Anthropic's and Responses' streams are."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def failure_after_start(error: Exception) -> MimoError:
    """What a stream that failed after its first bytes tells its client (in the door's
    error event; the status code is already sent): an API error as it is, anything else
    logged and reported as the engine failing, never its text."""
    if isinstance(error, MimoError):
        return error
    log.error("stream failed after it started", exc_info=error)
    return EngineError("engine failed while generating")


def sse_frames(chunks: ClosableStream[ChatCompletionChunk]) -> OwnedStream[bytes]:
    """The SSE frames of a chunk stream; closing them closes the chunks, read or not."""
    return OwnedStream(_frames(chunks), chunks.aclose)


async def _frames(chunks: ClosableStream[ChatCompletionChunk]) -> AsyncGenerator[bytes, None]:
    """Once bytes have been sent the status code is fixed: errors become an error event."""
    try:
        async for chunk in chunks:
            yield frame(chunk.model_dump_json())
    except Exception as exc:
        yield frame(json.dumps(error_body(failure_after_start(exc))))
    finally:
        await chunks.aclose()
    yield DONE


# How long a client may take no bytes before its stream is ended (`--stream-write-
# timeout-s`; the app sets it from its settings).
DEFAULT_WRITE_TIMEOUT_S = 60.0


def write_timeout(request: Request) -> float:
    """The server's `--stream-write-timeout-s`."""
    settings = getattr(request.app.state, "settings", None)
    return getattr(settings, "stream_write_timeout_s", DEFAULT_WRITE_TIMEOUT_S)


class EventStreamResponse(Response):
    """An SSE response that stops the moment its client disconnects, or stops reading.

    Starlette's StreamingResponse does the same with an anyio task group per response
    (on uvicorn, whose ASGI spec version is 2.3); here one plain task watches
    `receive()` and cancels the streaming task on `http.disconnect`, which closes the
    chunk generator (and, for a relayed stream, the engine's connection) at once.

    A client that keeps its connection open but reads nothing fills the socket buffers,
    and uvicorn's `send` then waits (flow control). While it waits the engine stops
    generating for this stream (its unread output is bounded, see the engine's
    backlog), but the stream still holds an engine place; after `write_timeout_s` with
    no byte taken, the stream is ended as if the client had left: its place is given
    back and the ledger records a 499 with the tokens generated so far.
    """

    media_type = "text/event-stream"

    def __init__(
        self, frames: OwnedStream[bytes], write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S
    ) -> None:
        # Not Response.__init__: it would announce a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._frames = frames
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        client_left = finished = False

        async def watch() -> None:
            nonlocal client_left
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:  # a client that closes after the last byte changes nothing
                client_left = True
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        limit = self._write_timeout_s
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})  # fmt: skip
            async for payload in self._frames:
                async with asyncio.timeout(limit):
                    await send({"type": "http.response.body", "body": payload, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # The client stopped reading: end the stream here (its frames are closed below,
            # which records the 499); the connection is left for the server to close.
            log.warning("a stream's client took nothing for %.0f s; ending it", limit)
        except asyncio.CancelledError:
            # The watcher's cancel always surfaces at one of the awaits above, so it is
            # caught here and nothing is pending once this block ends.
            if not client_left:
                raise  # cancelled from outside (shutdown): not ours to swallow
            streaming.uncancel()
        finally:
            finished = True
            watcher.cancel()
            await self._close_frames()  # the generator chain, and an engine connection

    async def _close_frames(self) -> None:
        await self._frames.aclose()
