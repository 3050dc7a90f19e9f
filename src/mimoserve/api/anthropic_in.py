"""Anthropic Messages request -> the canonical chat request. Pure translation.

Mapped exactly: system (string or text blocks; Claude Code's per-call billing header
block is dropped so the rest of the prompt stays a reusable prefix), user and assistant
turns with text, images, tool_use, tool_result and thinking blocks, `role: "system"`
turns, tools, tool_choice (any = required, tool = named), thinking and effort (the MiMo
switch), stop sequences and sampling. `cache_control`, unknown blocks, unknown tool
types and unknown fields are ignored and logged, never refused.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError

from mimoserve.api.body import validation_message
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.anthropic import AnthropicMessage, MessagesRequest
from mimoserve.protocol.chat import ChatCompletionRequest

log = logging.getLogger(__name__)

BILLING_HEADER = "x-anthropic-billing-header:"
_LOW_EFFORT = frozenset({"none", "minimal", "low"})
_HIGH_EFFORT = frozenset({"high", "xhigh", "max"})


def _refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _refuse(f"{param} must be a string", param)
    return value


def system_text(system: str | list[dict[str, Any]] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    texts = []
    for index, block in enumerate(system):
        if block.get("type") != "text":
            log.info("ignoring a system block of type %r", block.get("type"))
            continue
        text = _text(block.get("text"), f"system.{index}.text")
        if text.startswith(BILLING_HEADER):
            continue  # changes on every call: it would defeat prefix reuse
        texts.append(text)
    return "\n\n".join(texts) or None


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _refuse("an image needs a source object", f"{param}.source")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', '')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = _text(source.get("url"), f"{param}.source.url")
    else:
        raise _refuse("an image source must be base64 or url", f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(block: dict[str, Any], param: str) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(
            _text(part.get("text"), f"{param}.content")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    else:
        raise _refuse("tool_result content must be a string or blocks", f"{param}.content")
    return f"Error: {text}" if block.get("is_error") else text


def _user_turn(message: AnthropicMessage, index: int) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for position, block in enumerate(message.content):
        param = f"messages.{index}.content.{position}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block.get("text"), f"{param}.text")})
        elif kind == "image":
            parts.append(_image(block, param))
        elif kind == "tool_result":
            call_id = _text(block.get("tool_use_id"), f"{param}.tool_use_id")
            results.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": _tool_result_text(block, param),
                }
            )
        else:
            log.info("ignoring a user content block of type %r", kind)
    # Tool results answer the assistant's calls, so they come first, as OpenAI orders them.
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _assistant_turn(message: AnthropicMessage, index: int) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for position, block in enumerate(message.content):
        param = f"messages.{index}.content.{position}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text(block.get("text"), f"{param}.text"))
        elif kind == "thinking":  # replayed as reasoning; signatures are never checked
            reasoning.append(_text(block.get("thinking", ""), f"{param}.thinking"))
        elif kind == "tool_use":
            arguments = block.get("input", {})
            calls.append(
                {
                    "id": _text(block.get("id"), f"{param}.id"),
                    "type": "function",
                    "function": {
                        "name": _text(block.get("name"), f"{param}.name"),
                        "arguments": json.dumps(arguments, ensure_ascii=False),
                    },
                }
            )
        else:
            log.info("ignoring an assistant content block of type %r", kind)
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if reasoning:
        turn["reasoning_content"] = "".join(reasoning)
    if calls:
        turn["tool_calls"] = calls
    return turn


def _messages(request: MessagesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = system_text(request.system)
    if system:
        out.append({"role": "system", "content": system})
    for index, message in enumerate(request.messages):
        if message.role == "user":
            out += _user_turn(message, index)
        elif message.role == "assistant":
            out.append(_assistant_turn(message, index))
        else:  # newer Claude Code versions send system turns inside `messages`
            text = (
                message.content
                if isinstance(message.content, str)
                else "\n".join(
                    str(b.get("text", "")) for b in message.content if b.get("type") == "text"
                )
            )
            out.append({"role": "system", "content": text})
    return out


def _tools(request: MessagesRequest) -> list[dict[str, Any]]:
    tools = []
    for index, tool in enumerate(request.tools or ()):
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            log.info(
                "ignoring a tool of type %r (server tools are not available)", tool.get("type")
            )
            continue
        function: dict[str, Any] = {
            "name": _text(tool.get("name"), f"tools.{index}.name"),
            "parameters": tool.get("input_schema") or {"type": "object"},
        }
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(request: MessagesRequest, have_tools: bool) -> Any:
    choice = request.tool_choice
    if choice is None or not have_tools:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise _refuse("tool_choice of type tool needs a name", "tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def _thinking(request: MessagesRequest) -> dict[str, Any] | None:
    effort = request.output_config.effort if request.output_config else None
    thinking = request.thinking
    if thinking is None and effort is None:
        return None  # the model's default
    if thinking is not None and thinking.type == "disabled":
        return {"type": "disabled"}
    if thinking is not None and thinking.type == "enabled":
        return {"type": "enabled", "budget_tokens": thinking.budget_tokens}
    # adaptive, or an effort alone: MiMo's switch is on or off. Low effort is off, high is
    # on; otherwise the model decides, as adaptive asks: the registry's default for it
    # (off for flash, on for pro and omni, as hosted).
    if effort in _LOW_EFFORT:
        return {"type": "disabled"}
    if effort in _HIGH_EFFORT:
        return {"type": "enabled"}
    return None


def to_chat_request(request: MessagesRequest) -> ChatCompletionRequest:
    if request.model_extra:
        log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
    tools = _tools(request)
    body: dict[str, Any] = {
        "model": request.model,
        "messages": _messages(request),
        "max_completion_tokens": request.max_tokens,
        "stream": request.stream,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "stop": request.stop_sequences,
        "tools": tools or None,
        "tool_choice": _tool_choice(request, bool(tools)),
        "thinking": _thinking(request),
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_message(exc, body) from None
