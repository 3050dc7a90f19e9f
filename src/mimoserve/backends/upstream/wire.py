"""What crosses the wire to and from an upstream engine, per engine kind. Pure functions.

Requests go out as the client sent them (known fields only), with the engine's model
name, usage always requested when streaming, and `thinking` spelt the engine's way.
Answers become events in events.py. Engine error bodies (`{"error": "Unauthorized"}`,
`{"object": "error", ...}`, `{"detail": ...}`) become the contract's error body with a
status that says whose fault it is.
"""

from __future__ import annotations

import json
from typing import Any

from mimoserve.errors import InvalidRequestError, MimoError
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import UpstreamSpec

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
    request: ChatCompletionRequest, spec: UpstreamSpec, model_id: str, raw: bytes | None = None,
    *, choice: int = 0, max_tokens: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The engine's body: the client's own JSON when at hand (already validated as
    `request`; parsing it again is cheaper than dumping the model), else the model's.
    One choice per engine request (`choice` of the client's n): not every engine serves
    n > 1 (llama-server does not), and one answer per request maps to one event stream;
    with a seed, choice i samples with seed + i, as on the embedded engine."""
    body = (
        json.loads(raw) if raw is not None
        else request.model_dump(mode="json", by_alias=True, exclude_unset=True)
    )  # fmt: skip
    for unknown in request.model_extra or ():
        body.pop(unknown, None)  # ignored (and logged) as on the embedded path
    body["model"] = spec.model or model_id
    body.pop("n", None)
    if choice and isinstance(body.get("seed"), int):
        body["seed"] += choice
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
    if max_tokens is not None:  # a budget's cap: the client's own stays if it is lower
        limit = max_tokens if not isinstance(limit, int) else min(limit, max_tokens)
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
