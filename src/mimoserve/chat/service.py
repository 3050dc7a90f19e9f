"""The chat core: one pipeline for every backend and every front door.

validate (the door) -> authorise (allowed models) -> prepare (the backend checks what
its engine can do) -> admit (limits, one token estimate) -> generate -> meter (ledger,
metrics) -> release. The door gets the backend's events, or the whole answer; it alone
knows its wire format.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from mimoserve.auth.keys import Principal
from mimoserve.backends.base import (
    Backend,
    ChatRequest,
    Finished,
    GenerationEvent,
    KvCells,
    Progress,
    Started,
)
from mimoserve.billing.keeper import BudgetHold
from mimoserve.billing.prices import Price, cost_micros
from mimoserve.billing.service import Budgets
from mimoserve.chat.answer import Answer
from mimoserve.chat.choices import IndexedEvent, merged, summed
from mimoserve.chat.meter import RequestMeter, admit, reserve_budgets
from mimoserve.context import current_request_id
from mimoserve.errors import (
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from mimoserve.limits.admission import (
    AdmissionPolicy,
    completion_budget,
    estimate_prompt_tokens,
)
from mimoserve.limits.limiter import Admission, Limiter, RateLimiter
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.metering.metrics import Metrics
from mimoserve.protocol.chat import ChatCompletionRequest, ModelCard, ModelList
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
    prepared: Any  # the backend's own request
    principal: Principal
    reserve_tokens: int  # what rate limits reserve at admission, settled at the end
    reserve_cost: int  # what money budgets reserve (micros), settled at the end
    price: Price | None
    include_usage: bool
    api: str  # the front door, recorded with the usage
    logprobs: bool = False  # the answer carries each token's log-probability
    n: int = 1  # choices (OpenAI's `n`): generations of the same prompt


class ChatService:
    def __init__(
        self,
        registry: ModelRegistry,
        backends: Mapping[str, Backend],
        metrics: Metrics | None = None,
        ledger: UsageLedger | None = None,
        limiter: Limiter | None = None,
        policy: AdmissionPolicy | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self._registry = registry
        self._budgets = budgets
        self._backends = dict(backends)
        self._created = int(time.time())
        self._metrics = metrics or Metrics()
        self._ledger = ledger
        self._limiter: Limiter = limiter or RateLimiter()
        self._policy = policy or AdmissionPolicy()

    # ---- models and engines ------------------------------------------------------------

    def engines_down(self) -> list[str]:
        return sorted(model for model, backend in self._backends.items() if not backend.healthy)

    def _engines(self) -> dict[str, Backend]:
        """Each backend once, under the first model id that names it: ids naming the same
        weights share one engine, and one series per id would count its load and its
        pool once per id (a sum over `model` in Prometheus would be wrong)."""
        seen: dict[int, str] = {}
        for model, backend in self._backends.items():
            seen.setdefault(id(backend), model)
        return {model: self._backends[model] for model in seen.values()}

    def engine_load(self) -> dict[str, tuple[int, int]]:
        return {model: backend.load() for model, backend in self._engines().items()}

    def engine_memory(self) -> dict[str, KvCells]:
        found = {model: backend.kv_cells() for model, backend in self._engines().items()}
        return {model: cells for model, cells in found.items() if cells is not None}

    def list_models(self) -> ModelList:
        cards = [self.get_model(entry.id) for entry in self._registry.entries()]
        return ModelList(data=cards, first_id=cards[0].id if cards else None,
                         last_id=cards[-1].id if cards else None)  # fmt: skip

    def get_model(self, model_id: str) -> ModelCard:
        backend = self._backend_for(model_id)
        return ModelCard(
            id=model_id,
            created=self._created,
            root=backend.weights_name,
            context_length=backend.capabilities.context_length or None,
            display_name=model_id,
            created_at=datetime.fromtimestamp(self._created, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        )

    def _backend_for(self, model_id: str) -> Backend:
        backend = self._backends.get(model_id)
        if backend is None:
            raise ModelNotFoundError(
                f"The model {model_id!r} does not exist; GET /v1/models lists the served models.",
                param="model",
            )
        return backend

    # ---- the pipeline ------------------------------------------------------------------

    def record_refusal(
        self, principal: Principal, model: str | None, status: int, api: str = "chat.completions"
    ) -> None:
        """A request refused before it was prepared (bad body, unknown model, ...)."""
        # Only served ids become labels: clients must not be able to grow the series set.
        label = model if model in self._backends else "unknown"
        self._metrics.requests.labels(label, str(status)).inc()
        if self._ledger is not None:
            self._ledger.record(
                UsageRecord(
                    key_id=principal.key_id,
                    account_id=principal.account_id,
                    model=(model or "")[:128],
                    status=status,
                    api=api,
                    http_request_id=current_request_id.get(),
                )
            )

    def prepare(
        self,
        request: ChatCompletionRequest,
        principal: Principal,
        raw: bytes | None = None,
        *,
        api: str = "chat.completions",
        id_prefix: str = "chatcmpl-",
    ) -> PreparedChat:
        backend = self._backend_for(request.model)
        if principal.allowed_models is not None and request.model not in principal.allowed_models:
            raise PermissionDeniedError(
                f"This key may not use the model {request.model!r}.", param="model"
            )
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs set to true.", param="top_logprobs"
            )
        n = request.n or 1
        if n > 1 and not backend.capabilities.choices:
            raise InvalidRequestError(
                f"The engine behind {request.model!r} gives one choice per request (n=1).",
                param="n",
            )
        if request.logprobs and not backend.capabilities.logprobs:
            raise InvalidRequestError(
                f"The engine behind {request.model!r} does not report logprobs.",
                param="logprobs",
            )
        if request.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        entry = self._registry.get(request.model)
        assert entry is not None  # every backend comes from a registry entry
        prompt_tokens = estimate_prompt_tokens(request, raw)
        completion_tokens = n * completion_budget(request, self._policy.completion_reserve)
        return PreparedChat(
            completion_id=f"{id_prefix}{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            backend=backend,
            prepared=backend.prepare(ChatRequest(request, entry, raw)),
            principal=principal,
            reserve_tokens=prompt_tokens + completion_tokens,
            reserve_cost=cost_micros(entry.price, prompt_tokens, 0, completion_tokens),
            price=entry.price,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            api=api,
            logprobs=bool(request.logprobs),
            n=n,
        )

    async def choice_events(self, chat: PreparedChat) -> AsyncGenerator[IndexedEvent, None]:
        """Admits the request and yields its choices' events, metering them as one
        request; the admission and the slots are released however the stream ends."""
        meter = RequestMeter(self._metrics, self._ledger, chat.model, chat.principal,
                             chat.completion_id, chat.api, chat.price)  # fmt: skip
        try:
            meter.hold = await self._reserve_budgets(chat)
            meter.ticket = await self._admit(chat)
        except Exception as exc:
            meter.failed(exc)
            raise
        events = merged(chat.backend.generate, chat.prepared, chat.n)
        finished: list[Finished] = []
        try:
            async for index, event in events:
                if isinstance(event, Progress):
                    meter.text(event.tokens)
                elif isinstance(event, Started):
                    meter.started(event.prompt_tokens, event.cached_tokens)
                elif isinstance(event, Finished):
                    finished.append(event)
                    if len(finished) == chat.n:
                        meter.finished(finished[0].reason, summed(finished))
                        yield index, event
                        return
                yield index, event
            raise EngineError("the engine ended without finishing the answer")
        except Exception as exc:
            meter.failed(exc)
            raise
        finally:
            meter.close()
            await events.aclose()

    async def _reserve_budgets(self, chat: PreparedChat) -> BudgetHold | None:
        return await reserve_budgets(
            self._budgets, self._metrics, chat.principal, chat.model, chat.reserve_tokens,
            chat.reserve_cost,
        )  # fmt: skip

    async def _admit(self, chat: PreparedChat) -> Admission:
        return await admit(
            self._limiter, self._policy, self._metrics, chat.principal, chat.model,
            chat.reserve_tokens,
        )  # fmt: skip

    async def events(self, chat: PreparedChat) -> AsyncGenerator[GenerationEvent, None]:
        """The events of a one-choice request (the doors that have no `n`)."""
        assert chat.n == 1
        stream = self.choice_events(chat)
        try:
            async for _, event in stream:
                yield event
        finally:
            await stream.aclose()

    async def open_stream(self, chat: PreparedChat) -> OwnedStream[GenerationEvent]:
        """Returns once the engine has taken the request (`Started`): refusals before that
        (limits, a full queue, a prompt too long) are still plain HTTP errors, and the
        response can start at once, before any text."""
        return await _opened(self.events(chat))

    async def open_choices(self, chat: PreparedChat) -> OwnedStream[IndexedEvent]:
        """`open_stream` for every choice of the request."""
        return await _opened(self.choice_events(chat))

    async def count_tokens(self, chat: PreparedChat) -> int:
        """The prompt's tokens, without generating (nothing is admitted or metered)."""
        return await chat.backend.count_tokens(chat.prepared)

    async def complete(self, chat: PreparedChat) -> Answer:
        return (await self.complete_choices(chat))[0]

    async def complete_choices(self, chat: PreparedChat) -> list[Answer]:
        answers = [Answer() for _ in range(chat.n)]
        stream = self.choice_events(chat)
        try:
            async for index, event in stream:
                answers[index].add(event)
        finally:
            await stream.aclose()
        assert all(answer.finished is not None for answer in answers)
        return answers


T = TypeVar("T")


async def _opened(stream: AsyncGenerator[T, None]) -> OwnedStream[T]:
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    # Closing the events closes the generation (admission, slot, ledger record) even
    # if the client left before the first chunk was read.
    return OwnedStream(_prepend(first, stream), stream.aclose)


async def _prepend(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    yield first
    async for event in rest:
        yield event
