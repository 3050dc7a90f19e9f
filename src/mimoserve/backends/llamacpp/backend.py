"""The embedded llama.cpp backend: one model, one worker thread, a bounded wait queue.

Requests run one at a time on a dedicated thread (llama.cpp contexts are not
thread-safe, and decoding must not block the event loop). Tokens travel back to the
event loop through an asyncio queue. Batching several requests per step replaces the
single worker in a later scheduler without changing this interface.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

from mimoserve.backends.base import (
    Capabilities,
    Finished,
    GenerationEvent,
    GenerationRequest,
)
from mimoserve.backends.llamacpp.decode import THINK_OPEN, DecodeJob, run_decode
from mimoserve.backends.llamacpp.grammar import build_grammar, inline_reasoning
from mimoserve.backends.llamacpp.model import EngineConfig, LoadedModel
from mimoserve.backends.llamacpp.template import TemplateError
from mimoserve.errors import (
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
)


class LlamaCppBackend:
    def __init__(self, config: EngineConfig, weights_name: str) -> None:
        self._model = LoadedModel(config)
        self._weights_name = weights_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        # Admitted requests (running or waiting): one runs, `max_queue` may wait.
        self._admitted = 0
        self._max_admitted = 1 + config.max_queue
        self._jobs: set[DecodeJob] = set()
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
        job = DecodeJob(
            prompt=self._prompt_tokens(request),
            sampling=request.sampling,
            grammar=build_grammar(request.constraint),
            in_think=request.thinking.mode == "prompted",
            think_budget=request.thinking.budget,
        )
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

        def work() -> None:
            try:
                run_decode(self._model, job, emit)
            except Exception as exc:
                emit(EngineError(f"engine failed while generating: {exc}"))

        self._admitted += 1
        self._jobs.add(job)
        try:
            loop.run_in_executor(self._executor, work)
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()
            self._jobs.discard(job)
            self._admitted -= 1

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancelled.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._model.close()
