"""What crosses the wire to and from an upstream engine, per engine kind. Pure functions.

Requests go out as the client sent them (known fields only), with the engine's model
name, usage always requested when streaming, and `thinking` spelt the engine's way.
Answers come back in the MiMo contract's shape: `reasoning` (vLLM's newer name) becomes
`reasoning_content`, empty and engine-specific fields go, usage gets its details, and
engine error bodies (`{"error": "Unauthorized"}`, `{"object": "error", ...}`,
`{"detail": ...}`) become the contract's error body with a status that says whose fault it is.
"""

from __future__ import annotations

import json
from typing import Any

from mimoserve.errors import InvalidRequestError, MimoError
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import UpstreamSpec

_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
# Engines that read `chat_template_kwargs.enable_thinking` (MiMo's and Qwen's templates).
_TEMPLATE_THINKING = frozenset({"vllm", "sglang", "llama.cpp"})
# Sampling extensions OpenAI itself refuses.
_EXTENSIONS = ("top_k", "min_p", "ignore_eos")
_MAX_ERROR_MESSAGE = 500


class UpstreamFailure(MimoError):
    """The engine failed or could not be reached: another replica may do better."""

    status_code = 503
    error_type = "server_error"
    default_code = "upstream_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


def request_body(
    request: ChatCompletionRequest, spec: UpstreamSpec, model_id: str, raw: bytes | None = None
) -> dict[str, Any]:
    """The engine's body: the client's own JSON when at hand (already validated as
    `request`; parsing it again is cheaper than dumping the model), else the model's."""
    body = (
        json.loads(raw) if raw is not None
        else request.model_dump(mode="json", by_alias=True, exclude_unset=True)
    )  # fmt: skip
    for unknown in request.model_extra or ():
        body.pop(unknown, None)  # ignored (and logged) as on the embedded path
    body["model"] = spec.model or model_id
    if request.stream:
        # Always ask for usage: the ledger needs it; the relay drops it if the client did not ask.
        body["stream_options"] = {"include_usage": True}
    else:
        body.pop("stream_options", None)
    thinking = body.pop("thinking", None)
    if spec.kind == "mimoserve":
        if thinking is not None:
            body["thinking"] = thinking
    elif spec.kind in _TEMPLATE_THINKING and thinking is not None:
        enabled = thinking.get("type") == "enabled"
        body["chat_template_kwargs"] = {"enable_thinking": enabled}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if spec.kind == "openai":
        for name in _EXTENSIONS:
            body.pop(name, None)
        body.pop("max_tokens", None)  # deprecated there, and refused beside the new name
        if limit is not None:
            body["max_completion_tokens"] = limit
    elif limit is not None:
        # llama-cpp-python's server reads only `max_tokens`; the others read either.
        body["max_tokens"] = limit
        body.pop("max_completion_tokens", None)
    return body


def _usage(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    completion_details = raw.get("completion_tokens_details") or {}
    prompt_details = raw.get("prompt_tokens_details") or {}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(raw.get("total_tokens") or prompt + completion),
        "completion_tokens_details": {
            "reasoning_tokens": int(completion_details.get("reasoning_tokens") or 0)
        },
        "prompt_tokens_details": {"cached_tokens": int(prompt_details.get("cached_tokens") or 0)},
    }


def _finish_reason(value: Any) -> str | None:
    if value is None:
        return None
    # vLLM can end with "abort" or "error"; clients know only the contract's reasons.
    return value if value in _FINISH_REASONS else "stop"


def _tool_calls(raw: Any, *, streaming: bool) -> list[dict[str, Any]] | None:
    if not isinstance(raw, list) or not raw:
        return None
    calls = []
    for position, call in enumerate(raw):
        if not isinstance(call, dict):
            raise ValueError("a tool call is not an object")
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), dict):  # some engines send parsed JSON
            function["arguments"] = json.dumps(function["arguments"])
        mapped: dict[str, Any] = {}
        if streaming:
            mapped["index"] = call.get("index", position)
        for field in ("id", "type"):
            if call.get(field):
                mapped[field] = call[field]
        if not streaming:
            mapped.setdefault("type", "function")
        mapped["function"] = {k: v for k, v in function.items()
                              if k in ("name", "arguments") and v is not None}  # fmt: skip
        calls.append(mapped)
    return calls


def _message(raw: dict[str, Any], *, streaming: bool) -> dict[str, Any]:
    """A message or a delta in the contract's shape; a delta carries only what it has."""
    reasoning = raw.get("reasoning_content") or raw.get("reasoning")
    mapped: dict[str, Any] = {}
    if raw.get("role") or not streaming:
        mapped["role"] = "assistant"
    content = raw.get("content")
    if content or (not streaming):
        mapped["content"] = content if content else None
    if reasoning:
        mapped["reasoning_content"] = reasoning
    calls = _tool_calls(raw.get("tool_calls"), streaming=streaming)
    if calls:
        mapped["tool_calls"] = calls
        if not streaming and not (content or "").strip():
            mapped["content"] = None
    return mapped


def completion(
    data: Any, *, completion_id: str, model: str, created: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A non-streamed answer in the contract's shape, and its usage (None if the engine
    sent none). Raises ValueError when the body is not a chat completion at all."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ValueError("not a chat completion")
    choices = []
    for position, choice in enumerate(data["choices"]):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise ValueError("a choice without a message")
        choices.append({
            "index": choice.get("index", position),
            "message": _message(message, streaming=False),
            "finish_reason": _finish_reason(choice.get("finish_reason")) or "stop",
        })  # fmt: skip
    usage = _usage(data.get("usage"))
    body = {"id": completion_id, "object": "chat.completion", "created": created,
            "model": model, "choices": choices, "usage": usage}  # fmt: skip
    return body, usage


def chunk(data: Any, *, completion_id: str, model: str, created: int) -> dict[str, Any]:
    """One streamed chunk in the contract's shape (its `usage` kept for the caller to
    strip or pass on). Raises ValueError when it is not a chunk."""
    if not isinstance(data, dict):
        raise ValueError("not a chunk")
    if "error" in data or data.get("object") == "error":
        raise UpstreamFailure(f"the engine failed mid-stream: {error_message(data)}",
                              code="upstream_error")  # fmt: skip
    raw_choices = data.get("choices") or []
    if not isinstance(raw_choices, list):
        raise ValueError("choices is not a list")
    choices = []
    for position, choice in enumerate(raw_choices):
        if not isinstance(choice, dict):
            raise ValueError("a choice is not an object")
        choices.append({
            "index": choice.get("index", position),
            "delta": _message(choice.get("delta") or {}, streaming=True),
            "finish_reason": _finish_reason(choice.get("finish_reason")),  # null as in OpenAI's
        })  # fmt: skip
    out: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk",
                           "created": created, "model": model, "choices": choices}  # fmt: skip
    usage = _usage(data.get("usage"))
    if usage is not None:
        out["usage"] = usage
    return out


def error_message(body: Any) -> str:
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    elif isinstance(body, str):
        message = body
    if not isinstance(message, str):
        message = json.dumps(message) if message is not None else "no details"
    return str(message)[:_MAX_ERROR_MESSAGE]


def error_from_status(status: int, raw: bytes) -> MimoError:
    """The engine answered with an error status.

    The engine's 400s (a prompt over its context, a bad parameter) are the client's to
    fix and pass through as 400. Everything else is ours or the engine's: its 401/403
    (our key for it is wrong), 404 (it does not serve that model), 429 (it is full) and
    5xx are `UpstreamFailure`s, which another replica may not have.
    """
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")
    message = error_message(body)
    if status in (400, 413, 422):
        return InvalidRequestError(f"The model engine refused the request: {message}",
                                   code="upstream_bad_request")  # fmt: skip
    if status in (401, 403):
        return UpstreamFailure(f"The model engine refused our credentials ({status}).",
                               code="upstream_auth_failed")  # fmt: skip
    if status == 404:
        return UpstreamFailure("The model engine does not serve this model (404).",
                               code="upstream_model_missing")  # fmt: skip
    if status == 429:
        return UpstreamFailure("The model engine is overloaded (429).", code="upstream_overloaded")
    return UpstreamFailure(f"The model engine failed ({status}): {message}", code="upstream_error")
