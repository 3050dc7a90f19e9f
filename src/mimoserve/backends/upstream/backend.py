"""A fleet of OpenAI-compatible engines (vLLM, SGLang, llama.cpp, OpenAI) as a backend.

The request goes to the engine almost as the client sent it (wire.py); the engine's
structured deltas come back as the same events every backend yields (events.py).
Failures before the first chunk fail over to another replica (client.py); after it,
they end the answer with an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import aiohttp

from mimoserve.backends.base import Capabilities, ChatRequest
from mimoserve.backends.upstream import wire
from mimoserve.backends.upstream.client import UpstreamModel
from mimoserve.backends.upstream.events import AnswerMapper
from mimoserve.backends.upstream.media import MediaLimits, check_media
from mimoserve.backends.upstream.replicas import Replica
from mimoserve.backends.upstream.routing import route_hint
from mimoserve.backends.upstream.url_guard import MediaUrl, refuse_internal_urls
from mimoserve.events import Finished, GenerationEvent, Started
from mimoserve.protocol.estimate import estimate_prompt_tokens


@dataclass(frozen=True)
class UpstreamRequest:
    chat: ChatRequest
    media_urls: tuple[MediaUrl, ...]  # hosts still to check for internal addresses
    choice: int = 0  # which of the client's n choices this request generates
    max_tokens: int | None = None  # a budget's cap on the output, beside the client's

    def body_for(self, replica: Replica) -> dict[str, Any]:
        chat = self.chat
        return wire.request_body(
            chat.request, replica.spec, chat.request.model, chat.raw, choice=self.choice,
            max_tokens=self.max_tokens,
        )  # fmt: skip

    def capped(self, max_tokens: int) -> UpstreamRequest:
        mine = self.max_tokens
        limit = max_tokens if mine is None else min(mine, max_tokens)
        return dataclasses.replace(self, max_tokens=limit)

    def for_choice(self, index: int) -> UpstreamRequest:
        return dataclasses.replace(self, choice=index)


class UpstreamBackend:
    def __init__(self, model: UpstreamModel, media: MediaLimits | None = None) -> None:
        self.model = model
        self._media = media or MediaLimits()

    @property
    def capabilities(self) -> Capabilities:
        return self.model.capabilities

    @property
    def weights_name(self) -> str:
        return self.model.weights_name

    @property
    def healthy(self) -> bool:
        return True  # replicas come and go; the circuit breakers answer for them

    def load(self) -> tuple[int, int]:
        return sum(replica.outstanding for replica in self.model.pool.replicas), 0

    def kv_cells(self) -> None:
        return None  # the engines' own /metrics show their caches

    def start(self, session: aiohttp.ClientSession) -> None:
        self.model.use_session(session)
        self.model.start()

    async def close(self) -> None:
        await self.model.close()

    def prepare(self, chat: ChatRequest) -> UpstreamRequest:
        urls = check_media(chat.request, self.model.entry.input_modalities, self._media)
        return UpstreamRequest(chat, urls)

    async def count_tokens(self, prepared: UpstreamRequest) -> int:
        # Engines count only when they generate: the same estimate admission uses.
        return estimate_prompt_tokens(prepared.chat.request, prepared.chat.raw)

    async def generate(self, prepared: UpstreamRequest) -> AsyncGenerator[GenerationEvent, None]:
        # Resolving hosts waits on DNS: here, off the synchronous prepare step.
        await refuse_internal_urls(prepared.media_urls, self._media.url_allow)
        chat = prepared.chat
        mapper = AnswerMapper(lambda: estimate_prompt_tokens(chat.request, chat.raw),
                              top_logprobs=chat.request.top_logprobs or 0)  # fmt: skip
        router = self.model.pool.router
        hint = None
        if router is not None:
            hint = route_hint(chat.request)
            await router.prefetch(hint)
        if not prepared.chat.request.stream:
            data = await self.model.complete(prepared.body_for, hint)
            yield Started(0, estimated=True)  # the engine counts only in its answer
            for event in _mapped(mapper.completion, data, "answer"):
                yield event
        else:
            stream = await self.model.open_stream(prepared.body_for, hint)
            try:
                yield Started(0, estimated=True)  # a client may leave before the usage
                async for batch in stream:
                    for raw in batch:
                        for event in _mapped(mapper.chunk, raw, "chunk"):
                            yield event
            finally:
                await stream.aclose()
        for event in mapper.finish():
            if isinstance(event, Finished) and hint is not None and not event.usage.estimated:
                # What the engine had cached, against what routing predicted.
                assert router is not None
                router.reported(hint, event.usage.prompt_tokens, event.usage.cached_tokens)
            yield event


def _mapped(mapping: Any, data: Any, what: str) -> list[GenerationEvent]:
    try:
        events: list[GenerationEvent] = mapping(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise wire.UpstreamFailure(
            f"The model engine sent a malformed {what}.", code="upstream_malformed"
        ) from exc
    return events
