"""Work done for a client that may leave: cancelled the moment it does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from mimoserve.errors import ClientDisconnected
from mimoserve.streams import OwnedStream

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.1


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it as soon as the client goes away.

    If `work` finished just as the client left, its result is not handed on: a stream
    it opened is closed here, so what the stream holds (admission, slot) is released.
    """
    task = asyncio.ensure_future(work)
    handed_on = False
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                result = task.result()
                handed_on = True
                return result
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif (
            not handed_on
            and not task.cancelled()
            and task.exception() is None
            and isinstance(stream := task.result(), OwnedStream)
        ):
            await stream.aclose()
