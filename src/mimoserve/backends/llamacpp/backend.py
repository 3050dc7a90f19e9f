"""The embedded llama.cpp backend: one model, a continuous-batching scheduler, a wait queue.

The event loop renders and tokenizes the prompt, admits or refuses the request, and
hands it to the scheduler thread; tokens come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncGenerator
from typing import Any

from mimoserve.backends.base import Capabilities, ChatRequest, GenerationRequest
from mimoserve.backends.llamacpp.grammar import build_grammar
from mimoserve.backends.llamacpp.kv_store import KvStore, StoreIdentity, weights_sha256
from mimoserve.backends.llamacpp.kv_tiers import KvTiers
from mimoserve.backends.llamacpp.model import PREFIX_HOLDERS, EngineConfig, LoadedModel
from mimoserve.backends.llamacpp.native import (
    SHAPE_SPAN,
    Batch,
    MeasuredShape,
    NativeContext,
    NativeModel,
    Sampler,
    measure_step_shape,
    step_sizes,
)
from mimoserve.backends.llamacpp.scheduler import Scheduler, engine_down
from mimoserve.backends.llamacpp.sequence import (
    FORCED_CLOSE,
    MAX_UNREAD_STEPS,
    DecodeJob,
    EngineEvent,
    Generated,
)
from mimoserve.backends.llamacpp.speculation import StepShape
from mimoserve.backends.llamacpp.template import TemplateError, inline_reasoning
from mimoserve.backends.text_request import to_generation_request
from mimoserve.errors import ContextLengthExceededError, InvalidRequestError, OverloadedError
from mimoserve.events import Finished, GenerationEvent, KvCells, Logprobs, Progress, Started
from mimoserve.parsing.output import THINK_OPEN

# llama.cpp's limit on sequence ids in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256


class Mailbox:
    """Carries events from the scheduler thread to the event loop.

    Events posted while the loop has not yet drained the box ride along with the
    pending wake-up: one step of N sequences wakes the loop once, not N times (each
    wake-up takes CPU from the threads that decode).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[EngineEvent | BaseException], Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue[EngineEvent | BaseException], event: Any) -> None:
        with self._lock:
            self._items.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        # The loop may already be closed at shutdown; then nobody waits for the event.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, event in items:
            queue.put_nowait(event)


def _measured_shape(weights: NativeModel, config: EngineConfig) -> StepShape:
    """Step costs measured on a scratch context, on a thread that then ends. Measured on
    the loading thread, every later decode ran 30 % slower (Qwen2.5-Coder-0.5B here):
    llama.cpp's OpenMP workers belong to the thread that decodes, and the loading
    thread's team stayed behind, competing with the scheduler's for the two cores.
    Measured once per process for a model file, thread count, KV type, attention kernel
    and guess limit
    (about 6 s for the default model, 3 s for SmolLM2)."""
    file = config.model_path.stat()
    key = (str(config.model_path), file.st_size, file.st_mtime_ns, config.threads,
           config.kv_type, config.flash_attn, config.spec_max_draft)  # fmt: skip
    measured = _SHAPES.get(key)
    if measured is None:
        found: list[MeasuredShape] = []

        def measure() -> None:
            sizes = step_sizes(config.spec_max_draft)
            fill = max(SHAPE_SPAN, max(sizes))  # the span in one step
            scratch = NativeContext(weights, n_ctx=SHAPE_SPAN + 2 * max(sizes), n_seq=1,
                                    n_batch=fill, n_threads=config.threads,
                                    kv_type=config.kv_type,
                                    flash_attn=config.flash_attn)  # fmt: skip
            batch = Batch(fill)
            try:
                found.append(measure_step_shape(scratch, batch, sizes))
            finally:
                batch.close()
                scratch.close()

        worker = threading.Thread(target=measure, name="llamacpp-step-shape")
        worker.start()
        worker.join()
        measured = _SHAPES[key] = found[0]
    return StepShape(measured.empty, measured.at_span, measured.span, rows_alone=config.flash_attn)


_SHAPES: dict[tuple[str, int, int, int, str, bool, int], MeasuredShape] = {}


def _lower_tiers(config: EngineConfig) -> KvTiers | None:
    """The host and disk tiers under the pool, when a folder and a disk cap are set."""
    if config.kv_store_dir is None or config.kv_disk_bytes <= 0:
        return None
    identity = StoreIdentity(
        weights_sha256(config.model_path, config.weights_sha256, config.kv_store_dir),
        config.kv_type,
        config.flash_attn,
    )
    store = KvStore(config.kv_store_dir, identity, disk_bytes=config.kv_disk_bytes,
                    host_bytes=config.kv_host_bytes)  # fmt: skip
    return KvTiers(store)


class LlamaCppBackend:
    def __init__(self, config: EngineConfig, weights_name: str) -> None:
        self._model = LoadedModel(config)
        self._weights_name = weights_name
        pool = config.pool_cells(self._model.trained_ctx)
        # llama.cpp reserves one output row per sequence id within a batch's outputs, so
        # ids may not outnumber the batch (it aborts the process otherwise).
        if config.n_batch < config.n_parallel:
            raise ValueError(f"n_batch ({config.n_batch}) must be at least n_parallel")
        tiers = _lower_tiers(config)
        # One more id with lower tiers: the one stored cells are loaded under.
        n_seq = min(config.n_parallel + PREFIX_HOLDERS + (1 if tiers else 0), MAX_SEQUENCES,
                    config.n_batch)  # fmt: skip
        self._context = NativeContext(
            self._model.weights,
            n_ctx=pool,
            n_seq=n_seq,
            n_batch=config.n_batch,
            n_threads=config.threads,
            kv_type=config.kv_type,
            flash_attn=config.flash_attn,
        )
        weights = self._model.weights
        # Speculation weighs a guess's cost by how a step's cost grows with its size here.
        shape = _measured_shape(weights, config) if config.spec_max_draft > 0 else None
        self._scheduler = Scheduler(
            lambda sampling, seed, grammar: Sampler(weights, sampling, seed=seed, grammar=grammar),
            self._context,
            lanes=config.n_parallel,
            pool_cells=pool,
            seq_ctx=self._model.n_ctx,
            n_batch=config.n_batch,
            token_bytes=self._model.token_bytes,
            is_end=self._model.is_end_of_generation,
            end_tokens=self._model.end_tokens,
            forced_close=self._model.tokenize_text(FORCED_CLOSE),
            new_batch=Batch,
            max_draft=config.spec_max_draft,
            step_shape=shape,
            tiers=tiers,
            attends_pool=not config.flash_attn,
        )
        self._mailbox: Mailbox | None = None
        # Admitted requests (running or waiting): `n_parallel` run, `max_queue` may wait.
        self._admitted = 0
        self._max_admitted = config.n_parallel + config.max_queue
        self._capabilities = Capabilities(
            context_length=self._model.n_ctx,
            tools=self._model.supports_tools,
            constrained_output=True,
            logprobs=True,
            choices=True,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_name(self) -> str:
        return self._weights_name

    def prepare(self, chat: ChatRequest) -> GenerationRequest:
        return to_generation_request(chat.request, self._capabilities, chat.entry)

    async def count_tokens(self, prepared: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._prompt_tokens, prepared))

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        thinking = request.thinking.mode
        messages = request.messages
        if thinking == "prompted":
            messages = tuple(inline_reasoning(m) for m in messages)
        try:
            prompt = self._model.template.render_guarded(
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
                prompt_tokens=len(tokens),
                limit=self._model.n_ctx,
                param="messages",
            )
        return tokens

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], str | None, list[int]]:
        """Template, tokenizer and grammar compiler: CPU work that runs off the event loop."""
        prompt = self._prompt_tokens(request)
        grammar = build_grammar(request.constraint, self._model.weights)
        predicted = self._model.tokenize_text(request.prediction) if request.prediction else []
        return prompt, grammar, predicted

    @property
    def healthy(self) -> bool:
        return self._scheduler.alive

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        # Cheap refusals first: a full queue or a dead engine must not cost a 1 MiB
        # tokenization or 128 grammar compilations.
        if not self._scheduler.alive:
            raise engine_down()
        if self._admitted >= self._max_admitted:
            raise OverloadedError(
                "The engine is busy and its queue is full; retry shortly.", retry_after_s=2
            )
        self._admitted += 1
        try:
            async for event in self._run(request):
                yield event
        finally:
            self._admitted -= 1

    async def _run(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        prompt, grammar, predicted = await asyncio.to_thread(self._prepare, request)
        events: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        mailbox = self._mailbox_for(asyncio.get_running_loop())

        def emit(event: EngineEvent | BaseException) -> None:
            mailbox.post(events, event)

        job = DecodeJob(
            prompt=prompt,
            sampling=request.sampling,
            emit=emit,
            grammar=grammar,
            # A grammar shapes the output from its first token; the engine must never
            # write text the grammar has not accepted (see sequence.py).
            in_think=request.thinking.mode == "prompted" and grammar is None,
            think_budget=request.thinking.budget,
            plan=request.plan,
            prediction=predicted,
        )
        try:
            self._scheduler.submit(job)
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Generated):
                    job.taken += 1
                    if job.backlog == MAX_UNREAD_STEPS - 1:  # it may be paused: resume it
                        self._scheduler.wake()
                    yield Progress(event.tokens)
                    if event.logprobs:
                        yield Logprobs(event.logprobs)
                    for output in event.events:
                        yield output
                    continue
                if isinstance(event, Started):
                    # What the engine generated, read or not: a client that stops reading
                    # is billed for the tokens it made the engine compute.
                    event = dataclasses.replace(event, generated=lambda: job.generated_tokens)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()
            self._scheduler.wake()

    def _mailbox_for(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def load(self) -> tuple[int, int]:
        return self._scheduler.load()

    def kv_cells(self) -> KvCells:
        return self._scheduler.kv_cells()

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.stop)
        self._context.close()
        self._model.close()
