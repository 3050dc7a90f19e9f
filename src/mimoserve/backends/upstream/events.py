"""An upstream engine's answer -> the backend events. Pure, one mapper per answer.

Engines already split reasoning, content and tool calls (vLLM's and SGLang's parsers),
so their structured deltas map straight to events, with no re-parsing: `reasoning`
(vLLM's newer name) or `reasoning_content`, `content`, and tool-call deltas by index.
Calls get our numbering (in the order they start) and keep the engine's id.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from mimoserve.backends.structured import new_call_id
from mimoserve.backends.upstream.wire import UpstreamFailure, error_message
from mimoserve.events import (
    AudioDelta,
    ContentDelta,
    Finished,
    FinishReason,
    GenerationEvent,
    Logprobs,
    Progress,
    ReasoningDelta,
    RivalToken,
    TokenLogprob,
    TokenUsage,
    ToolCallDelta,
    ToolCallEnded,
    ToolCallStarted,
)

_CHARS_PER_TOKEN = 4  # for estimates only, when an engine reports no usage
_REASONS: dict[str, FinishReason] = {"length": "length", "content_filter": "content_filter"}


def usage_of(raw: Any) -> TokenUsage | None:
    if not isinstance(raw, Mapping):
        return None
    completion_details = raw.get("completion_tokens_details") or {}
    prompt_details = raw.get("prompt_tokens_details") or {}
    return TokenUsage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        accepted_prediction_tokens=_count(completion_details, "accepted_prediction_tokens"),
        rejected_prediction_tokens=_count(completion_details, "rejected_prediction_tokens"),
        # Speech models (the hosted platform's): audio heard, and seconds heard or spoken.
        audio_tokens=_count(prompt_details, "audio_tokens"),
        audio_seconds=float(_count(raw, "seconds")),
    )


def _count(details: Any, name: str) -> int:
    value = details.get(name) if isinstance(details, Mapping) else None
    return value if isinstance(value, int) and value >= 0 else 0


def logprobs_of(raw: Any, top_logprobs: int) -> list[GenerationEvent]:
    """A choice's `logprobs.content` (OpenAI's shape, which vLLM, SGLang and llama-server
    send) as one event. Entries that are not well formed are left out rather than
    failing an answer whose text is fine; rivals are cut to the `top_logprobs` the
    client asked for (llama-cpp-python adds the sampled token when it is not among them)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("content"), list):
        return []
    tokens = [
        token for item in raw["content"]
        if (token := _token_logprob(item, top_logprobs)) is not None
    ]  # fmt: skip
    return [Logprobs(tuple(tokens))] if tokens else []


def _token_logprob(item: Any, top_logprobs: int) -> TokenLogprob | None:
    rival = _rival(item)
    if rival is None:
        return None
    top = item.get("top_logprobs") or []
    rivals = [r for t in top if (r := _rival(t)) is not None] if isinstance(top, list) else []
    rivals = sorted(rivals, key=lambda r: r.logprob, reverse=True)[:top_logprobs]
    return TokenLogprob(rival.token, rival.token_bytes, rival.logprob, tuple(rivals))


def _rival(item: Any) -> RivalToken | None:
    if not isinstance(item, Mapping):
        return None
    token, logprob, raw_bytes = item.get("token"), item.get("logprob"), item.get("bytes")
    if not isinstance(token, str) or isinstance(logprob, bool):
        return None
    if not isinstance(logprob, int | float) or math.isnan(logprob):
        return None
    if isinstance(raw_bytes, list) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in raw_bytes
    ):
        token_bytes = tuple(raw_bytes)
    else:
        token_bytes = tuple(token.encode())
    return RivalToken(token, token_bytes, float(logprob))


class AnswerMapper:
    """Feeds engine chunks (or one whole completion); `finish()` ends the answer."""

    def __init__(self, estimate_prompt_tokens: Callable[[], int], *, top_logprobs: int = 0) -> None:
        # Called only when the engine reports no usage: estimating may serialise the request.
        self._estimate_prompt_tokens = estimate_prompt_tokens
        self._top_logprobs = top_logprobs
        self._calls: dict[int, int] = {}  # engine's index -> ours
        self._reason: FinishReason = "stop"
        self._usage: TokenUsage | None = None
        self._chars = 0
        self._stop_sequence: str | None = None

    def chunk(self, data: Any) -> list[GenerationEvent]:
        if not isinstance(data, Mapping):
            raise ValueError("not a chunk")
        if "error" in data or data.get("object") == "error":
            raise UpstreamFailure(f"the engine failed mid-stream: {error_message(data)}",
                                  code="upstream_error")  # fmt: skip
        self._usage = usage_of(data.get("usage")) or self._usage
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            raise ValueError("choices is not a list")
        events: list[GenerationEvent] = []
        for choice in choices[:1]:  # one choice per engine request (wire.request_body)
            if not isinstance(choice, Mapping):
                raise ValueError("a choice is not an object")
            events += self._message(choice.get("delta") or {})
            events += logprobs_of(choice.get("logprobs"), self._top_logprobs)
            self._finish_reason(choice.get("finish_reason"), choice.get("stop_reason"))
        return events

    def completion(self, data: Any) -> list[GenerationEvent]:
        if not isinstance(data, Mapping) or not isinstance(data.get("choices"), list):
            raise ValueError("not a chat completion")
        self._usage = usage_of(data.get("usage"))
        events: list[GenerationEvent] = []
        for choice in data["choices"][:1]:
            message = choice.get("message") if isinstance(choice, Mapping) else None
            if not isinstance(message, Mapping):
                raise ValueError("a choice without a message")
            events += self._message(message)
            events += logprobs_of(choice.get("logprobs"), self._top_logprobs)
            self._finish_reason(choice.get("finish_reason"), choice.get("stop_reason"))
        return events

    def _finish_reason(self, value: Any, stop_reason: Any) -> None:
        if isinstance(value, str):
            # vLLM can end with "abort" or "error"; clients know only the contract's reasons.
            self._reason = _REASONS.get(value, "stop")
        if isinstance(stop_reason, str):  # vLLM names the stop string that matched
            self._stop_sequence = stop_reason

    def _message(self, raw: Mapping[str, Any]) -> list[GenerationEvent]:
        if not isinstance(raw, Mapping):
            raise ValueError("a delta is not an object")
        events: list[GenerationEvent] = []
        reasoning = raw.get("reasoning_content") or raw.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events.append(ReasoningDelta(reasoning))
        content = raw.get("content")
        if isinstance(content, str) and content:
            events.append(ContentDelta(content))
        audio = raw.get("audio")
        if isinstance(audio, Mapping) and isinstance(audio.get("data"), str) and audio["data"]:
            try:
                data = base64.b64decode(audio["data"], validate=True)
            except binascii.Error as exc:
                raise ValueError("audio data is not base64") from exc
            transcript = audio.get("transcript")
            events.append(AudioDelta(data, transcript if isinstance(transcript, str) else ""))
        calls = raw.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ValueError("tool_calls is not a list")
        for position, call in enumerate(calls):
            events += self._call(call, position)
        text = sum(len(e.text) for e in events if isinstance(e, ReasoningDelta | ContentDelta))
        args = sum(len(e.arguments) for e in events if isinstance(e, ToolCallDelta))
        self._chars += text + args
        if events:
            events.insert(0, Progress(1))  # counts only if the engine never sends usage
        return events

    def _call(self, call: Any, position: int) -> list[GenerationEvent]:
        if not isinstance(call, Mapping):
            raise ValueError("a tool call is not an object")
        function = call.get("function") or {}
        if not isinstance(function, Mapping):
            raise ValueError("a tool call's function is not an object")
        index = call.get("index", position)
        events: list[GenerationEvent] = []
        if index not in self._calls:
            self._calls[index] = len(self._calls)
            raw_id = call.get("id")
            call_id = raw_id if isinstance(raw_id, str) and raw_id else new_call_id()
            events.append(
                ToolCallStarted(self._calls[index], call_id, str(function.get("name") or ""))
            )
        arguments = function.get("arguments")
        if isinstance(arguments, Mapping):  # some engines send parsed JSON
            arguments = json.dumps(arguments, ensure_ascii=False)
        if isinstance(arguments, str) and arguments:
            events.append(ToolCallDelta(self._calls[index], arguments))
        return events

    def finish(self) -> list[GenerationEvent]:
        events: list[GenerationEvent] = [ToolCallEnded(ours) for ours in self._calls.values()]
        usage = self._usage or TokenUsage(
            prompt_tokens=self._estimate_prompt_tokens(),
            completion_tokens=math.ceil(self._chars / _CHARS_PER_TOKEN),
            estimated=True,
        )
        return [*events, Finished(self._reason, usage, self._stop_sequence)]
