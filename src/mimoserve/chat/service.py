"""The chat service: runs one chat completion on the backend that serves its model."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from mimoserve.auth.keys import Principal
from mimoserve.backends.base import (
    Backend,
    Finished,
    GenerationRequest,
    ServedModel,
    Started,
    TextDelta,
    TokenUsage,
)
from mimoserve.chat.convert import to_generation_request
from mimoserve.chat.meter import RequestMeter, admit
from mimoserve.chat.output import OutputAssembler, OutputPlan
from mimoserve.errors import (
    EngineError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from mimoserve.limits.admission import AdmissionPolicy, estimate_tokens
from mimoserve.limits.limiter import Admission, Limiter, RateLimiter
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.metering.metrics import Metrics
from mimoserve.parsing.events import ContentText, ParsedEvent, ReasoningText, ToolCallParsed
from mimoserve.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FinishReason,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)
from mimoserve.protocol.messages import FunctionCall, ToolCall
from mimoserve.registry import ModelRegistry
from mimoserve.streams import OwnedStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, bound to its backend, ready to run."""

    completion_id: str
    created: int
    model: str
    backend: Backend
    generation: GenerationRequest
    plan: OutputPlan
    principal: Principal
    reserve_tokens: int  # what rate limits reserve at admission, settled at the end
    include_usage: bool


def to_usage(usage: TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


ParsedStream = AsyncGenerator[ParsedEvent | Finished, None]


class ChatService:
    def __init__(
        self,
        registry: ModelRegistry,
        backends: Mapping[str, Backend],
        metrics: Metrics | None = None,
        ledger: UsageLedger | None = None,
        limiter: Limiter | None = None,
        policy: AdmissionPolicy | None = None,
        relayed: Mapping[str, ServedModel] | None = None,
    ) -> None:
        self._registry = registry
        self._backends = dict(backends)
        # Models served by upstream engines (the relay runs them): listed here, not generated.
        self._served: dict[str, ServedModel] = {**self._backends, **(relayed or {})}
        self._created = int(time.time())
        self._metrics = metrics or Metrics()
        self._ledger = ledger
        self._limiter: Limiter = limiter or RateLimiter()
        self._policy = policy or AdmissionPolicy()

    def engines_down(self) -> list[str]:
        return sorted(model for model, backend in self._backends.items() if not backend.healthy)

    def engine_load(self) -> dict[str, tuple[int, int]]:
        return {model: backend.load() for model, backend in self._backends.items()}

    def record_refusal(self, principal: Principal, model: str | None, status: int) -> None:
        # Only served ids become labels: clients must not be able to grow the series set.
        label = model if model in self._served else "unknown"
        self._metrics.requests.labels(label, str(status)).inc()
        if self._ledger is not None:
            self._ledger.record(
                UsageRecord(
                    key_id=principal.key_id,
                    account_id=principal.account_id,
                    model=(model or "")[:128],
                    status=status,
                )
            )

    async def _admit(self, chat: PreparedChat) -> Admission:
        return await admit(
            self._limiter, self._policy, self._metrics, chat.principal, chat.model,
            chat.reserve_tokens,
        )  # fmt: skip

    def list_models(self) -> ModelList:
        return ModelList(data=[self.get_model(entry.id) for entry in self._registry.entries()])

    def get_model(self, model_id: str) -> ModelCard:
        backend = self._served.get(model_id) or self._backend_for(model_id)
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

    def prepare(self, request: ChatCompletionRequest, principal: Principal) -> PreparedChat:
        backend = self._backend_for(request.model)
        if principal.allowed_models is not None and request.model not in principal.allowed_models:
            raise PermissionDeniedError(
                f"This key may not use the model {request.model!r}.", param="model"
            )
        entry = self._registry.get(request.model)
        assert entry is not None  # every backend comes from a registry entry
        if request.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        generation, plan = to_generation_request(request, backend.capabilities, entry)
        return PreparedChat(
            completion_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            backend=backend,
            generation=generation,
            plan=plan,
            principal=principal,
            reserve_tokens=estimate_tokens(request, self._policy.completion_reserve),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )

    async def _parsed(self, chat: PreparedChat) -> ParsedStream:
        """Backend events -> parsed events, ending with the backend's `Finished`.

        The first backend event is awaited before anything is yielded, so refusals
        (queue full, prompt too long) raise before a stream starts.
        """
        assembler = OutputAssembler(chat.plan)
        watch = RequestMeter(self._metrics, self._ledger, chat.model, chat.principal,
                             chat.completion_id)  # fmt: skip
        try:
            watch.ticket = await self._admit(chat)
        except Exception as exc:
            watch.failed(exc)
            raise
        events = chat.backend.generate(chat.generation)
        try:
            async for event in events:
                if isinstance(event, Started):
                    watch.started(event.prompt_tokens, event.cached_tokens)
                    continue
                if isinstance(event, TextDelta):
                    watch.text(event.tokens)
                    for parsed in assembler.feed(event.text):
                        yield parsed
                    continue
                for parsed in assembler.finish():
                    yield parsed
                watch.finished(event.reason, event.usage)
                yield event
                return
            raise EngineError("the engine ended without finishing the answer")
        except Exception as exc:
            watch.failed(exc)
            raise
        finally:
            watch.close()
            await events.aclose()

    async def complete(self, chat: PreparedChat) -> ChatCompletion:
        reasoning: list[str] = []
        content: list[str] = []
        calls: list[ToolCall] = []
        finished: Finished | None = None
        stream = self._parsed(chat)
        try:
            async for item in stream:
                if isinstance(item, ReasoningText):
                    reasoning.append(item.text)
                elif isinstance(item, ContentText):
                    content.append(item.text)
                elif isinstance(item, ToolCallParsed):
                    function = FunctionCall(name=item.name, arguments=item.arguments)
                    calls.append(ToolCall(id=_call_id(), function=function))
                else:
                    finished = item
        finally:
            await stream.aclose()
        assert finished is not None
        text = "".join(content)
        message = ResponseMessage(
            content=None if calls and not text.strip() else text,
            reasoning_content="".join(reasoning) or None,
            tool_calls=calls or None,
        )
        return ChatCompletion(
            id=chat.completion_id,
            created=chat.created,
            model=chat.model,
            choices=[
                Choice(index=0, message=message, finish_reason=_finish(finished, bool(calls)))
            ],
            usage=to_usage(finished.usage),
        )

    async def open_stream(self, chat: PreparedChat) -> OwnedStream[ChatCompletionChunk]:
        """Starts generating and waits for the first event before returning the chunk stream."""
        stream = self._parsed(chat)
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        # Closing the chunks closes the generation (admission, slot, ledger record) even
        # if the client left before the first chunk was read.
        return OwnedStream(self._chunks(chat, first, stream), stream.aclose)

    async def _chunks(
        self, chat: PreparedChat, first: ParsedEvent | Finished, stream: ParsedStream
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        def chunk(delta: Delta, finish_reason: FinishReason | None = None) -> ChatCompletionChunk:
            choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(
                id=chat.completion_id, created=chat.created, model=chat.model, choices=[choice]
            )

        calls = 0
        try:
            yield chunk(Delta(role="assistant"))
            item: ParsedEvent | Finished | None = first
            while item is not None:
                if isinstance(item, ReasoningText):
                    yield chunk(Delta(reasoning_content=item.text))
                elif isinstance(item, ContentText):
                    yield chunk(Delta(content=item.text))
                elif isinstance(item, ToolCallParsed):
                    for delta in _tool_call_deltas(calls, item):
                        yield chunk(Delta(tool_calls=[delta]))
                    calls += 1
                else:
                    yield chunk(Delta(), _finish(item, has_calls=calls > 0))
                    if chat.include_usage:
                        yield ChatCompletionChunk(
                            id=chat.completion_id,
                            created=chat.created,
                            model=chat.model,
                            choices=[],
                            usage=to_usage(item.usage),
                        )
                    return
                item = await anext(stream, None)
        finally:
            await stream.aclose()


def _finish(finished: Finished, has_calls: bool) -> FinishReason:
    return "tool_calls" if has_calls and finished.reason == "stop" else finished.reason


def _tool_call_deltas(index: int, call: ToolCallParsed) -> tuple[DeltaToolCall, DeltaToolCall]:
    """The id, type and name first, then the arguments (clients concatenate them per index)."""
    header = DeltaToolCall(
        index=index,
        id=_call_id(),
        type="function",
        function=DeltaFunctionCall(name=call.name, arguments=""),
    )
    return header, DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments))
