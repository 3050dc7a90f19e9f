"""Several choices merged into one stream: a client that stops reading stops the choices
being pulled from the engine (so each one's engine backpressure holds)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from mimoserve.chat.choices import merged
from mimoserve.events import ContentDelta, GenerationEvent, Started
from tests.waiting import until


async def test_an_unread_merged_stream_stops_pulling_from_its_choices() -> None:
    pulled = [0, 0, 0]

    async def endless(prepared: Any) -> AsyncGenerator[GenerationEvent, None]:
        index = prepared if isinstance(prepared, int) else 0
        yield Started(5)
        while True:
            pulled[index] += 1
            yield ContentDelta("x")
            await asyncio.sleep(0)

    class Choice(int):
        def for_choice(self, index: int) -> int:
            return index

    stream = merged(endless, Choice(0), 3)
    assert (await anext(stream))[1] == Started(5)  # the client reads this, then nothing
    await until(lambda: sum(pulled) > 0, "the choices started")
    settled = sum(pulled)
    for _ in range(200):  # give the pumps every chance to run on
        await asyncio.sleep(0)
        if sum(pulled) == settled:
            break
        settled = sum(pulled)
    for _ in range(200):
        await asyncio.sleep(0)
    assert sum(pulled) == settled  # they stopped: nothing more was pulled
    assert settled <= 3 * 32 + 3  # at most the bound per choice waits for the client
    await stream.aclose()
