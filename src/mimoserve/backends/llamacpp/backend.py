"""The embedded llama.cpp backend: one model, a continuous-batching scheduler, a wait queue.

The event loop renders and tokenizes the prompt, admits or refuses the request, and
hands it to the scheduler thread; tokens come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from mimoserve.backends.base import (
    Capabilities,
    Finished,
    GenerationEvent,
    GenerationRequest,
)
from mimoserve.backends.llamacpp.grammar import build_grammar, inline_reasoning
from mimoserve.backends.llamacpp.model import EngineConfig, LoadedModel
from mimoserve.backends.llamacpp.native import NativeContext
from mimoserve.backends.llamacpp.scheduler import Scheduler
from mimoserve.backends.llamacpp.sequence import FORCED_CLOSE, THINK_OPEN, DecodeJob
from mimoserve.backends.llamacpp.template import TemplateError
from mimoserve.errors import ContextLengthExceededError, InvalidRequestError, OverloadedError


class LlamaCppBackend:
    def __init__(self, config: EngineConfig, weights_name: str) -> None:
        self._model = LoadedModel(config)
        self._weights_name = weights_name
        # Every slot can hold a full context, so a running sequence never runs out of KV.
        self._context = NativeContext(
            self._model.weights,
            n_ctx=config.n_ctx * config.n_parallel,
            n_seq=config.n_parallel,
            n_batch=config.n_batch,
            n_threads=config.threads,
        )
        self._scheduler = Scheduler(
            self._model.weights,
            self._context,
            slots=config.n_parallel,
            seq_ctx=config.n_ctx,
            n_batch=config.n_batch,
            token_bytes=self._model.token_bytes,
            is_end=self._model.is_end_of_generation,
            end_tokens=self._model.end_tokens,
            forced_close=self._model.tokenize_text(FORCED_CLOSE),
        )
        # Admitted requests (running or waiting): `n_parallel` run, `max_queue` may wait.
        self._admitted = 0
        self._max_admitted = config.n_parallel + config.max_queue
        self._capabilities = Capabilities(
            context_length=config.n_ctx,
            tools=self._model.supports_tools,
            constrained_output=True,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_name(self) -> str:
        return self._weights_name

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        thinking = request.thinking.mode
        messages = request.messages
        if thinking == "prompted":
            messages = tuple(inline_reasoning(m) for m in messages)
        try:
            prompt = self._model.template.render(
                messages, tools=request.tools, enable_thinking=thinking == "native"
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"messages: {exc}", param="messages") from exc
        if thinking == "prompted":
            prompt += THINK_OPEN + "\n"
        tokens = self._model.tokenize_prompt(prompt)
        if len(tokens) >= self._model.n_ctx:
            raise ContextLengthExceededError(
                f"The prompt is {len(tokens)} tokens long, but the model's context holds "
                f"{self._model.n_ctx} tokens (prompt and completion together). "
                "Shorten the messages.",
                param="messages",
            )
        return tokens

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        prompt = self._prompt_tokens(request)
        grammar = build_grammar(request.constraint, self._model.weights)
        if self._admitted >= self._max_admitted:
            raise OverloadedError(
                "The engine is busy and its queue is full; retry shortly.", retry_after_s=2
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

        def emit(event: GenerationEvent | BaseException) -> None:
            # The loop may already be closed at shutdown; then nobody waits for the event.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = DecodeJob(
            prompt=prompt,
            sampling=request.sampling,
            emit=emit,
            grammar=grammar,
            in_think=request.thinking.mode == "prompted",
            think_budget=request.thinking.budget,
        )
        self._admitted += 1
        try:
            self._scheduler.submit(job)
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()
            self._scheduler.wake()
            self._admitted -= 1

    def load(self) -> tuple[int, int]:
        return self._scheduler.load()

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.stop)
        self._context.close()
        self._model.close()
