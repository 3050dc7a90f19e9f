"""The chat core: one pipeline for every backend and every front door.

validate (the door) -> authorise (allowed models) -> prepare (the backend checks what
its engine can do) -> admit (limits, one token estimate) -> generate -> meter (ledger,
metrics) -> release. The door gets the backend's events, or the whole answer; it alone
knows its wire format.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mimoserve.auth.keys import Principal
from mimoserve.backends.base import Backend, ChatRequest
from mimoserve.billing.keeper import BudgetHold, Usage
from mimoserve.billing.prices import Price, cost_micros
from mimoserve.billing.service import Budgets
from mimoserve.chat.answer import Answer
from mimoserve.chat.catalogue import ModelCatalogue
from mimoserve.chat.choices import IndexedEvent, capped, merged, summed
from mimoserve.chat.meter import RequestMeter, admit, reserve_budgets
from mimoserve.context import current_request_id
from mimoserve.errors import (
    EngineError,
    InvalidRequestError,
    PermissionDeniedError,
)
from mimoserve.events import Finished, Progress, Started, TokenUsage
from mimoserve.limits.admission import (
    AdmissionPolicy,
    completion_budget,
    estimate_prompt_tokens,
    requested_output,
)
from mimoserve.limits.limiter import Admission, Limiter, RateLimiter
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.metering.metrics import Metrics
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import ModelRegistry
from mimoserve.streams import OwnedStream

log = logging.getLogger(__name__)

# The doors whose answers can carry audio (the others have no place for it).
AUDIO_DOORS = frozenset({"chat.completions", "audio.speech"})


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, bound to its backend, ready to run."""

    completion_id: str
    created: int
    model: str
    backend: Backend[Any]
    prepared: Any  # the backend's own request
    principal: Principal
    reserve_tokens: int  # what rate limits reserve at admission, settled at the end
    price: Price | None
    include_usage: bool
    api: str  # the front door, recorded with the usage
    logprobs: bool = False  # the answer carries each token's log-probability
    n: int = 1  # choices (OpenAI's `n`): generations of the same prompt
    prompt_estimate: int = 0  # prompt tokens, as far as they are known before the engine
    # The most completion tokens one choice can produce (the client's cap, else a whole
    # context window), and whether the client set it: what budgets must hold.
    output_limit: int = 0
    output_explicit: bool = False
    # Speech: the most audio seconds and characters the request can be billed for (what
    # money budgets reserve beside the tokens; the backend's request says, see SpeechClaim).
    speech_claim: tuple[float, int] = (0.0, 0)


class ChatService:
    def __init__(
        self,
        registry: ModelRegistry,
        backends: Mapping[str, Backend[Any]],
        metrics: Metrics | None = None,
        ledger: UsageLedger | None = None,
        limiter: Limiter | None = None,
        policy: AdmissionPolicy | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self._registry = registry
        self._budgets = budgets
        self._backends = dict(backends)
        # What is served, apart from the pipeline (GET /v1/models, /ready, /metrics).
        self.catalogue = ModelCatalogue(registry, self._backends)
        self._metrics = metrics or Metrics()
        self._ledger = ledger
        self._limiter: Limiter = limiter or RateLimiter()
        self._policy = policy or AdmissionPolicy()

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
        backend = self.catalogue.backend_for(request.model)
        if principal.allowed_models is not None and request.model not in principal.allowed_models:
            raise PermissionDeniedError(
                f"This key may not use the model {request.model!r}.", param="model"
            )
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs set to true.", param="top_logprobs"
            )
        if backend.capabilities.audio_output and api not in AUDIO_DOORS:
            raise InvalidRequestError(
                f"{request.model!r} answers with speech, which this API cannot carry; use "
                "/v1/chat/completions or /v1/audio/speech.", param="model",
            )  # fmt: skip
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
        context = backend.capabilities.context_length or _UNKNOWN_CONTEXT
        completion_tokens = n * completion_budget(request, self._policy.completion_reserve, context)
        explicit = requested_output(request)
        prepared = backend.prepare(ChatRequest(request, entry, raw))
        return PreparedChat(
            completion_id=f"{id_prefix}{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            backend=backend,
            prepared=prepared,
            principal=principal,
            reserve_tokens=prompt_tokens + completion_tokens,
            price=entry.price,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            api=api,
            logprobs=bool(request.logprobs),
            n=n,
            prompt_estimate=prompt_tokens,
            output_limit=min(explicit or context, context),
            output_explicit=explicit is not None,
            speech_claim=getattr(prepared, "speech_claim", (0.0, 0)),
        )

    async def choice_events(self, chat: PreparedChat) -> AsyncGenerator[IndexedEvent, None]:
        """Admits the request and yields its choices' events, metering them as one
        request; the admission and the slots are released however the stream ends."""
        meter = RequestMeter(self._metrics, self._ledger, chat.model, chat.principal,
                             chat.completion_id, chat.api, chat.price,
                             chat.prompt_estimate)  # fmt: skip
        try:
            meter.hold = await self._reserve_budgets(chat)
            prepared = capped_to(chat, meter.hold)
            meter.ticket = await self._admit(chat)
        except Exception as exc:
            meter.failed(exc)
            raise
        except BaseException:  # cancelled while waiting (the client left): settle the holds
            meter.close()
            raise
        events = merged(chat.backend.generate, prepared, chat.n)
        finished: list[Finished] = []
        try:
            async for index, event in events:
                if isinstance(event, Progress):
                    meter.text(event.tokens)
                elif isinstance(event, Started):
                    meter.started(event)
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
        wanted, minimum = budget_claim(chat)
        return await reserve_budgets(
            self._budgets, self._metrics, chat.principal, chat.model, wanted, minimum
        )

    async def _admit(self, chat: PreparedChat) -> Admission:
        return await admit(
            self._limiter, self._policy, self._metrics, chat.principal, chat.model,
            chat.reserve_tokens, places=chat.n,
        )  # fmt: skip

    async def open_choices(self, chat: PreparedChat) -> OwnedStream[IndexedEvent]:
        """Returns once the engine has taken the request (`Started`): refusals before that
        (limits, a full queue, a prompt too long) are still plain HTTP errors, and the
        response can start at once, before any text. Events carry their choice's index."""
        return await _opened(self.choice_events(chat))

    async def count_tokens(self, chat: PreparedChat) -> int:
        """The prompt's tokens, without generating. Admitted like a request (rate limits,
        the key's concurrency: counting a 1 MiB prompt is template and tokenizer work on
        the server) and recorded with no output, so it is neither free nor unlimited."""
        # Recorded under its own door name, with no tokens: counting is not generating,
        # and hosted platforms do not bill it, but it is seen and limited.
        meter = RequestMeter(self._metrics, self._ledger, chat.model, chat.principal,
                             chat.completion_id, f"{chat.api}.count_tokens")  # fmt: skip
        try:
            meter.ticket = await admit(
                self._limiter, self._policy, self._metrics, chat.principal, chat.model,
                chat.prompt_estimate,
            )  # fmt: skip
            counted = await chat.backend.count_tokens(chat.prepared)
        except Exception as exc:
            meter.failed(exc)
            raise
        except BaseException:
            meter.close()
            raise
        meter.finished("stop", TokenUsage(prompt_tokens=0, completion_tokens=0))
        return counted

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

# A model whose engine did not say how long a context it takes (an upstream engine
# without `context_length` in the registry): what no request can plausibly exceed.
_UNKNOWN_CONTEXT = 1 << 20


def budget_claim(chat: PreparedChat) -> tuple[Usage, Usage]:
    """(what the request may spend, the least it needs) in tokens and money. With its
    own `max_tokens` a request needs all it asked for (else 402: it would be cut short
    of what the client said it wants); without, it needs its prompt and one token per
    choice, and gets what is left up to a whole context per choice (then its output is
    capped to what it got: `capped_to`)."""
    prompt = chat.prompt_estimate
    output = chat.n * chat.output_limit
    speech = chat.speech_claim  # billed whatever the output: part of the least it needs
    wanted = Usage(prompt + output, cost_micros(chat.price, prompt, 0, output, *speech))
    if chat.output_explicit:
        return wanted, wanted
    return wanted, Usage(prompt + chat.n, cost_micros(chat.price, prompt, 0, chat.n, *speech))


def affordable_output(chat: PreparedChat, hold: BudgetHold) -> int:
    """Completion tokens per choice that the hold pays for, after the prompt's estimate."""
    per_choice = chat.output_limit
    price = chat.price
    for charge in hold.charges:
        if charge.budget.unit == "tokens":
            room = charge.reserved - chat.prompt_estimate
        elif price is not None and price.output > 0:
            # Prices are per million tokens, costs in millionths: `output` micros a token.
            fixed = cost_micros(price, chat.prompt_estimate, 0, 0, *chat.speech_claim)
            room = math.floor((charge.reserved - fixed) / price.output)
        else:
            continue  # output costs nothing under this budget
        per_choice = min(per_choice, room // chat.n)
    return max(per_choice, 1)


def capped_to(chat: PreparedChat, hold: BudgetHold | None) -> Any:
    """The backend's request, its output capped to what the budgets hold for it: a
    generation stops (finish_reason `length`) when its reservation is used up."""
    if hold is None:
        return chat.prepared
    return capped(chat.prepared, affordable_output(chat, hold))


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
