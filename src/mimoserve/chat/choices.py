"""Several choices for one request (OpenAI's `n`): n generations of the same prompt,
merged into one stream of (choice index, event).

On the embedded engine the n sequences share the prompt's KV cells (the first reads
it, the others wait for it and attach to it in the prefix cache) and decode together in
one batch. An upstream model gets n requests of one choice each (every engine kind
serves those, and vLLM's and SGLang's prefix caches share the prompt the same way).
The request is metered once: one Started (the prompt, counted once), the choices'
Progress, and one usage at the end, completion tokens summed as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from mimoserve.events import Finished, GenerationEvent, Started, TokenUsage

IndexedEvent = tuple[int, GenerationEvent]
_DONE = object()
_EVENTS_PER_CHOICE = 32  # events a choice may have waiting for the client


@runtime_checkable
class VariesPerChoice(Protocol):
    """A backend's prepared request that knows choice `index`'s own version of itself
    (the embedded engine's: seed + index; an upstream one's: n=1 on the wire, seed +
    index)."""

    def for_choice(self, index: int) -> Any: ...


def for_choice(prepared: Any, index: int) -> Any:
    """Choice `index`'s request; a request that cannot vary is sent as it is."""
    if index == 0 or not isinstance(prepared, VariesPerChoice):
        return prepared
    return prepared.for_choice(index)


@runtime_checkable
class CapsOutput(Protocol):
    """A backend's prepared request that can be told to stop after `max_tokens`
    completion tokens (a budget's cap; the client's own stays if it is lower)."""

    def capped(self, max_tokens: int) -> Any: ...


def capped(prepared: Any, max_tokens: int) -> Any:
    """The request capped at `max_tokens` per choice. Every backend that can be metered
    by a budget must support it: a silent no-op would let a budget be overspent."""
    if not isinstance(prepared, CapsOutput):
        raise TypeError(f"{type(prepared).__name__} cannot cap its output")
    return prepared.capped(max_tokens)


def _sum_of(counts: list[Callable[[], int]]) -> Callable[[], int]:
    return lambda: sum(count() for count in counts)


def summed(finished: list[Finished]) -> TokenUsage:
    """The request's usage: the prompt once, the choices' completions added up."""
    first = finished[0].usage
    return TokenUsage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(f.usage.completion_tokens for f in finished),
        cached_tokens=first.cached_tokens,
        reasoning_tokens=sum(f.usage.reasoning_tokens for f in finished),
        estimated=any(f.usage.estimated for f in finished),
        draft_tokens=sum(f.usage.draft_tokens for f in finished),
        accepted_draft_tokens=sum(f.usage.accepted_draft_tokens for f in finished),
        accepted_prediction_tokens=sum(f.usage.accepted_prediction_tokens for f in finished),
        rejected_prediction_tokens=sum(f.usage.rejected_prediction_tokens for f in finished),
        # Audio belongs to the prompt (heard) or to a speech model's one answer (spoken).
        audio_tokens=first.audio_tokens,
        audio_seconds=first.audio_seconds,
        characters=first.characters,
    )


async def merged(
    generate: Callable[[Any], AsyncGenerator[GenerationEvent, None]], prepared: Any, n: int
) -> AsyncGenerator[IndexedEvent, None]:
    """The n generations' events as they come; one Started first. A failure of any
    choice fails the request (the others are stopped)."""
    if n == 1:
        only = generate(prepared)
        try:
            async for event in only:
                yield 0, event
        finally:  # now, not when the collector finds it: it holds an engine slot
            await only.aclose()
        return
    # Bounded: a client that stops reading stops the pumps, and so each choice's engine
    # backpressure (unread steps pause a sequence) holds for n > 1 too.
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | object]] = asyncio.Queue(
        maxsize=_EVENTS_PER_CHOICE * n
    )

    async def pump(index: int) -> None:
        stream = generate(for_choice(prepared, index))
        try:
            try:
                async for event in stream:
                    await queue.put((index, event))
            finally:
                await stream.aclose()
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((index, exc))
        # Cancelled (the reader is gone, the queue may be full): nothing more to hand on.
        await queue.put((index, _DONE))

    tasks = [asyncio.create_task(pump(i)) for i in range(n)]
    running, started = n, False
    counts: list[Callable[[], int]] = []  # each started choice's count of generated tokens
    try:
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, Started):
                if item.generated is not None:
                    counts.append(item.generated)
                if not started:  # the prompt is counted once; generated, over all choices
                    started = True
                    total = None if item.generated is None else _sum_of(counts)
                    yield index, replace(item, generated=total)
            else:
                assert not isinstance(item, BaseException)
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
