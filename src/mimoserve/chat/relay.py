"""Chat completions for models served by upstream engines: validate, admit, forward, meter.

The client's request was validated and authorised like any other; it goes to the
engine almost as sent (see backends/upstream/wire.py), and the answer comes back in
the contract's shape. Usage always reaches the ledger: the engine is asked for it on
every stream, and when an engine sends none it is estimated from what was relayed.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from mimoserve.auth.keys import Principal
from mimoserve.backends.base import TokenUsage
from mimoserve.backends.upstream import wire
from mimoserve.backends.upstream.client import UpstreamModel, new_session
from mimoserve.backends.upstream.replicas import Replica
from mimoserve.chat.media import MediaLimits, check_media
from mimoserve.chat.meter import RequestMeter, admit
from mimoserve.chat.url_guard import MediaUrl, refuse_internal_urls
from mimoserve.errors import InvalidRequestError, PermissionDeniedError
from mimoserve.limits.admission import (
    AdmissionPolicy,
    estimate_prompt_tokens,
    estimate_tokens,
    estimate_tokens_from_body,
)
from mimoserve.limits.limiter import Limiter
from mimoserve.metering.ledger import UsageLedger
from mimoserve.metering.metrics import Metrics
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.streams import ClosableStream, OwnedStream

log = logging.getLogger(__name__)
_CHARS_PER_TOKEN = 4  # for estimates only, when an engine reports no usage


@dataclass(frozen=True)
class PreparedRelay:
    request: ChatCompletionRequest
    upstream: UpstreamModel
    principal: Principal
    completion_id: str
    created: int
    reserve_tokens: int
    raw: bytes | None = None  # the body as the client sent it
    media_urls: tuple[MediaUrl, ...] = ()  # hosts checked for internal addresses

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)

    def body_for(self, replica: Replica) -> dict[str, Any]:
        return wire.request_body(self.request, replica.spec, self.model, self.raw)


def _usage(raw: Mapping[str, Any]) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=raw["prompt_tokens"],
        completion_tokens=raw["completion_tokens"],
        cached_tokens=raw["prompt_tokens_details"]["cached_tokens"],
        reasoning_tokens=raw["completion_tokens_details"]["reasoning_tokens"],
    )


def _estimated_usage(request: ChatCompletionRequest, completion_chars: int) -> dict[str, Any]:
    prompt = estimate_prompt_tokens(request)
    completion = math.ceil(completion_chars / _CHARS_PER_TOKEN)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": 0},
            "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def _delta_chars(chunk: Mapping[str, Any]) -> int:
    chars = 0
    for choice in chunk["choices"]:
        delta = choice["delta"]
        chars += len(delta.get("content") or "") + len(delta.get("reasoning_content") or "")
        for call in delta.get("tool_calls") or ():
            chars += len(call.get("function", {}).get("arguments") or "")
    return chars


class RelayService:
    def __init__(
        self,
        models: Mapping[str, UpstreamModel],
        metrics: Metrics,
        ledger: UsageLedger | None,
        limiter: Limiter,
        policy: AdmissionPolicy,
        media_limits: MediaLimits | None = None,
    ) -> None:
        self.models = dict(models)
        self._metrics, self._ledger = metrics, ledger
        self._limiter, self._policy = limiter, policy
        self._media_limits = media_limits or MediaLimits()
        self._session: aiohttp.ClientSession | None = None

    def serves(self, model_id: str) -> bool:
        return model_id in self.models

    def start(self) -> None:
        """Inside the running loop: one connection pool for all, and health checks."""
        if not self.models:
            return
        self._session = new_session()
        for model in self.models.values():
            model.use_session(self._session)
            model.start()

    async def close(self) -> None:
        for model in self.models.values():
            await model.close()
        if self._session is not None:
            await self._session.close()

    def prepare(
        self, request: ChatCompletionRequest, principal: Principal, raw: bytes | None = None
    ) -> PreparedRelay:
        upstream = self.models[request.model]
        if principal.allowed_models is not None and request.model not in principal.allowed_models:
            raise PermissionDeniedError(
                f"This key may not use the model {request.model!r}.", param="model"
            )
        if request.logprobs:
            raise InvalidRequestError("logprobs are not supported", param="logprobs")
        if request.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        media_urls = check_media(request, upstream.entry.input_modalities, self._media_limits)
        return PreparedRelay(
            media_urls=media_urls,
            request=request,
            upstream=upstream,
            principal=principal,
            completion_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            reserve_tokens=(
                estimate_tokens(request, self._policy.completion_reserve) if raw is None
                else estimate_tokens_from_body(len(raw), request, self._policy.completion_reserve)
            ),
            raw=raw,
        )  # fmt: skip

    async def _metered(self, relay: PreparedRelay) -> RequestMeter:
        meter = RequestMeter(self._metrics, self._ledger, relay.model, relay.principal,
                             relay.completion_id)  # fmt: skip
        try:
            # Resolving hosts waits on DNS: here, off the synchronous prepare step.
            await refuse_internal_urls(relay.media_urls, self._media_limits.url_allow)
            meter.ticket = await admit(
                self._limiter, self._policy, self._metrics, relay.principal, relay.model,
                relay.reserve_tokens,
            )  # fmt: skip
        except Exception as exc:
            meter.failed(exc)
            raise
        return meter

    async def complete(self, relay: PreparedRelay) -> dict[str, Any]:
        meter = await self._metered(relay)
        try:
            data = await relay.upstream.complete(relay.body_for)
            try:
                body, usage = wire.completion(data, completion_id=relay.completion_id,
                                              model=relay.model, created=relay.created)  # fmt: skip
            except (ValueError, TypeError, KeyError) as exc:
                raise wire.UpstreamFailure("The model engine sent a malformed answer.",
                                           code="upstream_malformed") from exc  # fmt: skip
            if usage is None:
                message = body["choices"][0]["message"] if body["choices"] else {}
                chars = len(message.get("content") or "") + len(
                    message.get("reasoning_content") or ""
                )
                usage = body["usage"] = _estimated_usage(relay.request, chars)
            tokens = _usage(usage)
            meter.started(tokens.prompt_tokens, tokens.cached_tokens)
            meter.text(tokens.completion_tokens)
            reason = body["choices"][0]["finish_reason"] if body["choices"] else "stop"
            meter.finished(reason, tokens)
            return body
        except Exception as exc:
            meter.failed(exc)
            raise
        finally:
            meter.close()

    async def open_stream(self, relay: PreparedRelay) -> OwnedStream[list[dict[str, Any]]]:
        """Returns once the engine's first chunk arrived (failures before it are HTTP errors)."""
        meter = await self._metered(relay)
        try:
            events = await relay.upstream.open_stream(relay.body_for)
        except Exception as exc:
            meter.failed(exc)
            meter.close()
            raise
        except BaseException:
            meter.close()
            raise
        return OwnedStream(self._chunks(relay, meter, events), meter.close, events.aclose)

    async def _chunks(
        self, relay: PreparedRelay, meter: RequestMeter, batches: ClosableStream[list[Any]]
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Mapped chunks, in the batches they arrived in (one write each, see sse.py)."""
        usage: dict[str, Any] | None = None
        reason = "stop"
        chars = 0
        try:
            async for batch in batches:
                out_batch = []
                for raw in batch:
                    try:
                        out = wire.chunk(raw, completion_id=relay.completion_id,
                                         model=relay.model, created=relay.created)  # fmt: skip
                    except (ValueError, TypeError, KeyError) as exc:
                        raise wire.UpstreamFailure("The model engine sent a malformed chunk.",
                                                   code="upstream_malformed") from exc  # fmt: skip
                    if "usage" in out:
                        usage = out["usage"] if relay.include_usage else out.pop("usage")
                    if out["choices"]:
                        relayed = _delta_chars(out)
                        if relayed:
                            chars += relayed
                            meter.text(1)  # counts for the ledger only if usage never comes
                        reason = out["choices"][0].get("finish_reason") or reason
                    elif "usage" not in out:
                        continue  # nothing the client asked for
                    out_batch.append(out)
                if out_batch:
                    yield out_batch
            if usage is None:
                log.warning("upstream for %s sent no usage; estimating it", relay.model)
                usage = _estimated_usage(relay.request, chars)
                if relay.include_usage:
                    yield [{"id": relay.completion_id, "object": "chat.completion.chunk",
                            "created": relay.created, "model": relay.model, "choices": [],
                            "usage": usage}]  # fmt: skip
            tokens = _usage(usage)
            meter.started(tokens.prompt_tokens, tokens.cached_tokens)
            meter.finished(reason, tokens)
        except Exception as exc:
            meter.failed(exc)
            raise
        finally:
            meter.close()
            await batches.aclose()
