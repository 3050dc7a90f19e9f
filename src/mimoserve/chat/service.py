"""The chat service: runs one chat completion on the backend that serves its model."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from mimoserve.backends.base import (
    Backend,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    TokenUsage,
)
from mimoserve.chat.convert import to_generation_request
from mimoserve.errors import EngineError, ModelNotFoundError
from mimoserve.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)
from mimoserve.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, bound to its backend, ready to run."""

    completion_id: str
    created: int
    model: str
    backend: Backend
    generation: GenerationRequest
    include_usage: bool


def to_usage(usage: TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=0),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


class ChatService:
    def __init__(self, registry: ModelRegistry, backends: Mapping[str, Backend]) -> None:
        self._registry = registry
        self._backends = dict(backends)
        self._created = int(time.time())

    def list_models(self) -> ModelList:
        return ModelList(data=[self.get_model(entry.id) for entry in self._registry.entries()])

    def get_model(self, model_id: str) -> ModelCard:
        backend = self._backend_for(model_id)
        return ModelCard(
            id=model_id,
            created=self._created,
            root=backend.weights_name,
            context_length=backend.capabilities.context_length,
        )

    def _backend_for(self, model_id: str) -> Backend:
        backend = self._backends.get(model_id)
        if backend is None:
            raise ModelNotFoundError(
                f"The model {model_id!r} does not exist; GET /v1/models lists the served models.",
                param="model",
            )
        return backend

    def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        backend = self._backend_for(request.model)
        if request.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        return PreparedChat(
            completion_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            backend=backend,
            generation=to_generation_request(request, backend.capabilities),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )

    async def complete(self, chat: PreparedChat) -> ChatCompletion:
        parts: list[str] = []
        finished: Finished | None = None
        events = chat.backend.generate(chat.generation)
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                else:
                    finished = event
        finally:
            await events.aclose()
        if finished is None:
            raise EngineError("the engine ended without finishing the answer")
        return ChatCompletion(
            id=chat.completion_id,
            created=chat.created,
            model=chat.model,
            choices=[
                Choice(
                    index=0,
                    message=ResponseMessage(content="".join(parts)),
                    finish_reason=finished.reason,
                )
            ],
            usage=to_usage(finished.usage),
        )

    async def open_stream(self, chat: PreparedChat) -> AsyncGenerator[ChatCompletionChunk, None]:
        """Starts generating and waits for the first event before returning the chunk stream.

        Refusals (queue full, prompt too long) therefore surface here as plain HTTP errors,
        before any byte of the SSE response is sent.
        """
        events = chat.backend.generate(chat.generation)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return self._chunks(chat, first, events)

    async def _chunks(
        self,
        chat: PreparedChat,
        first: GenerationEvent,
        events: AsyncGenerator[GenerationEvent, None],
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        def chunk(delta: Delta, finish_reason: FinishReason | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=chat.completion_id,
                created=chat.created,
                model=chat.model,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
            )

        try:
            yield chunk(Delta(role="assistant"))
            event: GenerationEvent | None = first
            while event is not None:
                if isinstance(event, TextDelta):
                    if event.text:
                        yield chunk(Delta(content=event.text))
                else:
                    yield chunk(Delta(), event.reason)
                    if chat.include_usage:
                        yield ChatCompletionChunk(
                            id=chat.completion_id,
                            created=chat.created,
                            model=chat.model,
                            choices=[],
                            usage=to_usage(event.usage),
                        )
                    return
                event = await anext(events, None)
            raise EngineError("the engine ended without finishing the answer")
        finally:
            await events.aclose()
