"""A stream that releases what it holds when closed, whether or not it was ever read.

A generator's `finally` runs only if the generator started. A stream opened for a
client (an admission, a concurrency slot, a replica's outstanding count, an engine
connection) and dropped before its first `anext` (the client left the moment the
stream opened) would keep those forever. `OwnedStream.aclose()` always runs its
closers, in order, once; every closer is itself safe to run twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class ClosableStream(Protocol[T_co]):
    def __aiter__(self) -> AsyncIterator[T_co]: ...

    def __anext__(self) -> Awaitable[T_co]: ...

    def aclose(self) -> Awaitable[None]: ...


class OwnedStream(Generic[T]):
    def __init__(
        self, body: ClosableStream[T], *closers: Callable[[], Awaitable[None] | None]
    ) -> None:
        self._body = body
        self._closers = closers
        self._closed = False

    def __aiter__(self) -> OwnedStream[T]:
        return self

    async def __anext__(self) -> T:
        return await self._body.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._body.aclose()
        finally:
            for close in self._closers:
                result = close()
                if result is not None:
                    await result


async def with_heartbeat(stream: ClosableStream[T], interval_s: float) -> AsyncIterator[T | None]:
    """`stream`'s items, and `None` whenever nothing came for `interval_s` (a client that
    waits on a long prompt hears that the server is alive). Never cancels a pending read."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
