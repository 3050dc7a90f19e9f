"""Metering of one request: admission against the limits, then metrics and one usage
record however the request ends. Shared by the embedded engine and the upstream relay."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mimoserve.auth.keys import Principal
from mimoserve.billing.keeper import BudgetHold, InsufficientQuotaError, Usage
from mimoserve.billing.prices import Price, cost_micros
from mimoserve.billing.service import Budgets
from mimoserve.context import current_request_id
from mimoserve.errors import MimoError, StoreUnavailableError
from mimoserve.events import Started, TokenUsage
from mimoserve.limits.admission import AdmissionPolicy
from mimoserve.limits.limiter import Admission, Limiter, RateLimitedError
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.metering.metrics import Metrics
from mimoserve.store.base import StoreError

log = logging.getLogger(__name__)


async def reserve_budgets(
    budgets: Budgets | None, metrics: Metrics, principal: Principal, model: str, wanted: Usage,
    minimum: Usage,
) -> BudgetHold | None:  # fmt: skip
    if budgets is None:
        return None
    try:
        return await budgets.reserve(principal.account_id, principal.key_id, wanted, minimum)
    except InsufficientQuotaError:
        metrics.budget_refused.labels(model).inc()
        raise
    except StoreError as exc:  # shared counters unreachable: refuse rather than overspend
        log.warning("budget store unavailable: %s", exc)
        raise StoreUnavailableError(
            "The budget store is unavailable; retry shortly.", retry_after_s=2
        ) from exc


async def admit(
    limiter: Limiter, policy: AdmissionPolicy, metrics: Metrics, principal: Principal,
    model: str, tokens: int, *, places: int = 1,
) -> Admission:  # fmt: skip
    try:
        return await limiter.acquire(
            account_id=principal.account_id,
            key_id=principal.key_id,
            model=model,
            account_limits=policy.defaults.overridden_by(principal.account_limits),
            key_limits=principal.key_limits,
            tokens=tokens,
            places=places,
        )
    except RateLimitedError:
        metrics.rate_limited.labels(model).inc()
        raise
    except StoreError as exc:  # shared counters unreachable: refuse rather than run unmetered
        log.warning("rate-limit store unavailable: %s", exc)
        raise StoreUnavailableError(
            "The rate-limit store is unavailable; retry shortly.", retry_after_s=2
        ) from exc


class RequestMeter:
    """Times and counts one generation, then records it (metrics and the usage ledger)
    whichever way it ends: finished, failed, or abandoned by its client."""

    def __init__(
        self, metrics: Metrics, ledger: UsageLedger | None, model: str, principal: Principal,
        completion_id: str, api: str = "chat.completions", price: Price | None = None,
        prompt_estimate: int = 0,
    ) -> None:  # fmt: skip
        self._prompt_estimate = prompt_estimate
        self._estimated = False  # some counts are the server's estimate, not the engine's
        self._drafts = (0, 0)  # speculation: guessed tokens, accepted ones
        self._speech = (0.0, 0)  # audio seconds heard or spoken, characters spoken
        self._generated: Callable[[], int] | None = None
        self._api = api
        self._price = price
        self.hold: BudgetHold | None = None
        self._metrics, self._ledger = metrics, ledger
        self._model, self._principal, self._id = model, principal, completion_id
        self.ticket: Admission | None = None
        self._start = time.perf_counter()
        self._ttft: float | None = None
        self._prompt_tokens = self._cached_tokens = self._completion_tokens = 0
        self._done = False

    def started(self, event: Started) -> None:
        prompt_tokens = event.prompt_tokens
        if event.estimated:  # the engine tells only at the end: until then, the estimate
            prompt_tokens = max(prompt_tokens, self._prompt_estimate)
            self._estimated = True
        self._prompt_tokens, self._cached_tokens = prompt_tokens, event.cached_tokens
        self._generated = event.generated

    def _completion_so_far(self) -> int:
        """What was generated, read by the client or not (as far as the engine says)."""
        generated = self._generated() if self._generated is not None else 0
        return max(self._completion_tokens, generated)

    def text(self, tokens: int) -> None:
        self._completion_tokens += tokens
        if self._ttft is None:
            self._ttft = time.perf_counter() - self._start
            m = self._metrics
            m.child(m.ttft, self._model).observe(self._ttft)

    def finished(self, reason: str, usage: TokenUsage) -> None:
        m, model = self._metrics, self._model
        latency = time.perf_counter() - self._start
        m.child(m.request_success, model, reason).inc()
        m.child(m.prompt_tokens, model).inc(usage.prompt_tokens)
        m.child(m.generation_tokens, model).inc(usage.completion_tokens)
        m.child(m.cached_tokens, model).inc(usage.cached_tokens)
        m.child(m.e2e_latency, model).observe(latency)
        self._estimated = usage.estimated
        self._drafts = (usage.draft_tokens, usage.accepted_draft_tokens)
        self._speech = (usage.audio_seconds, usage.characters)
        if usage.audio_seconds:
            m.child(m.audio_seconds, model).inc(usage.audio_seconds)
        if usage.characters:
            m.child(m.speech_characters, model).inc(usage.characters)
        if usage.draft_tokens:
            m.child(m.draft_tokens, model).inc(usage.draft_tokens)
            m.child(m.accepted_draft_tokens, model).inc(usage.accepted_draft_tokens)
            rejected = usage.draft_tokens - usage.accepted_draft_tokens
            m.child(m.rejected_draft_tokens, model).inc(rejected)
        self._record(200, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                     usage.reasoning_tokens, reason)  # fmt: skip

    def failed(self, error: Exception) -> None:
        """Any failure: an API error with its status, anything else as the 500 it becomes
        (recorded as such, not as a client that left)."""
        status = error.status_code if isinstance(error, MimoError) else 500
        code = (error.code if isinstance(error, MimoError) else None) or "internal_error"
        if self._ttft is not None:
            self._metrics.aborted.labels(self._model, code).inc()
        self._record(status, self._prompt_tokens, self._completion_so_far(),
                     self._cached_tokens, 0, None)  # fmt: skip

    def close(self) -> None:
        if not self._done:  # closed before finishing: the client went away
            self._metrics.aborted.labels(self._model, "client_disconnected").inc()
            self._record(499, self._prompt_tokens, self._completion_so_far(),
                         self._cached_tokens, 0, None)  # fmt: skip

    def _record(
        self, status: int, prompt: int, completion: int, cached: int, reasoning: int,
        reason: str | None,
    ) -> None:  # fmt: skip
        self._done = True
        cost = cost_micros(self._price, prompt, cached, completion, *self._speech)
        if self.ticket is not None:
            self.ticket.settle(prompt + completion)
        if self.hold is not None:
            self.hold.settle(prompt + completion, cost)
        self._metrics.child(self._metrics.requests, self._model, str(status)).inc()
        if self._ledger is not None:
            self._ledger.record(
                UsageRecord(
                    key_id=self._principal.key_id,
                    account_id=self._principal.account_id,
                    request_id=self._id,
                    model=self._model,
                    status=status,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    reasoning_tokens=reasoning,
                    cached_tokens=cached,
                    latency_s=time.perf_counter() - self._start,
                    ttft_s=self._ttft,
                    finish_reason=reason,
                    api=self._api,
                    http_request_id=current_request_id.get(),
                    cost_micros=cost,
                    usage_source="estimate" if self._estimated else "engine",
                    draft_tokens=self._drafts[0],
                    accepted_draft_tokens=self._drafts[1],
                    audio_seconds=self._speech[0],
                    characters=self._speech[1],
                )
            )
