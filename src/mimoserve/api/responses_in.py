"""OpenAI Responses request -> the canonical chat request. Pure translation.

Input items become turns: messages (input_text, input_image, output_text parts),
function_call and function_call_output, reasoning items (their text replayed as the
next assistant turn's reasoning; encrypted content ignored). Function tools map as
they are; a `custom` tool (Codex's apply_patch) becomes a function taking one string
`input`; a `namespace` tool's functions are flattened; built-in tools (web_search,
...) are dropped and logged. `reasoning.effort: "none"` switches thinking off.
The server is stateless: `previous_response_id` is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mimoserve.api.body import validation_message
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.responses import ResponsesRequest

log = logging.getLogger(__name__)

CUSTOM_INPUT = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
}
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


@dataclass
class Translation:
    request: ChatCompletionRequest
    custom_tools: frozenset[str] = field(default_factory=frozenset)  # answered as custom calls


def _refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _text_parts(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _refuse("content must be a string or a list of parts", param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise _refuse("a text part needs text", f"{param}.{index}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise _refuse("input_image needs an image_url", f"{param}.{index}.image_url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            log.info("ignoring a content part of type %r", kind)
    return parts


class _Turns:
    """Builds the chat turns, merging consecutive calls into one assistant turn."""

    def __init__(self) -> None:
        self.turns: list[dict[str, Any]] = []
        self._reasoning: list[str] = []

    def add(self, turn: dict[str, Any]) -> None:
        if turn["role"] == "assistant" and self._reasoning:
            turn["reasoning_content"] = "".join(self._reasoning)
            self._reasoning = []
        self.turns.append(turn)

    def reasoning(self, text: str) -> None:
        self._reasoning.append(text)

    def call(self, call: dict[str, Any]) -> None:
        last = self.turns[-1] if self.turns else None
        if last is not None and last["role"] == "assistant" and not self._reasoning:
            last.setdefault("tool_calls", []).append(call)
        else:
            self.add({"role": "assistant", "content": None, "tool_calls": [call]})


def _item(turns: _Turns, item: dict[str, Any], param: str) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = _ROLES.get(str(item.get("role")))
        if role is None:
            raise _refuse(f"unknown role {item.get('role')!r}", f"{param}.role")
        parts = _text_parts(item.get("content", ""), f"{param}.content")
        if role == "user":
            turns.add({"role": "user", "content": parts})
        else:
            text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
            turns.add({"role": role, "content": text})
    elif kind in ("function_call", "custom_tool_call"):
        arguments = (
            item.get("arguments")
            if kind == "function_call"
            else json.dumps({"input": item.get("input", "")}, ensure_ascii=False)
        )
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise _refuse(f"a {kind} needs call_id and name", param)
        turns.call(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": str(arguments or "{}")},
            }
        )
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output", "")
        text = (
            output
            if isinstance(output, str)
            else "".join(
                p.get("text", "")
                for p in _text_parts(output, f"{param}.output")
                if p["type"] == "text"
            )
        )
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise _refuse(f"a {kind} needs call_id", f"{param}.call_id")
        turns.add({"role": "tool", "tool_call_id": call_id, "content": text})
    elif kind == "reasoning":
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                turns.reasoning(part["text"])
    else:
        log.info("ignoring an input item of type %r", kind)


def _function(tool: dict[str, Any], param: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str):
        raise _refuse("a function tool needs a name", f"{param}.name")
    function: dict[str, Any] = {
        "name": name,
        "parameters": tool.get("parameters") or {"type": "object"},
    }
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tools(request: ResponsesRequest) -> tuple[list[dict[str, Any]], frozenset[str]]:
    tools: list[dict[str, Any]] = []
    custom: set[str] = set()
    pending = [(tool, f"tools.{index}") for index, tool in enumerate(request.tools or ())]
    while pending:
        tool, param = pending.pop(0)
        kind = tool.get("type")
        if kind == "function":
            tools.append(_function(tool, param))
        elif kind == "custom":
            tools.append(_function({**tool, "parameters": CUSTOM_INPUT}, param))
            custom.add(str(tool.get("name")))
        elif kind == "namespace" and isinstance(tool.get("tools"), list):
            pending += [
                (inner, f"{param}.tools.{i}")
                for i, inner in enumerate(tool["tools"])
                if isinstance(inner, dict)
            ]
        else:
            log.info("ignoring a tool of type %r (built-in tools are not available)", kind)
    return tools, frozenset(custom)


def _tool_choice(request: ResponsesRequest, have_tools: bool) -> Any:
    choice = request.tool_choice
    if choice is None or not have_tools:
        return None
    if isinstance(choice, str):
        return choice if choice in ("auto", "none", "required") else "auto"
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    return "auto"


def _response_format(request: ResponsesRequest) -> dict[str, Any] | None:
    fmt = (request.text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.get("name") or "answer",
                "schema": fmt.get("schema"),
                "strict": fmt.get("strict"),
            },
        }
    return {"type": fmt.get("type")}


def to_chat_request(request: ResponsesRequest) -> Translation:
    if request.previous_response_id is not None:
        raise _refuse(
            "This server is stateless: previous_response_id is not supported; send "
            "the whole conversation in `input`.",
            "previous_response_id",
        )
    if request.model_extra:
        log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
    turns = _Turns()
    if request.instructions:
        turns.add({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        turns.add({"role": "user", "content": request.input})
    else:
        for index, item in enumerate(request.input):
            _item(turns, item, f"input.{index}")
    tools, custom = _tools(request)
    effort = request.reasoning.effort if request.reasoning else None
    body: dict[str, Any] = {
        "model": request.model,
        "messages": turns.turns,
        "max_completion_tokens": request.max_output_tokens,
        "stream": request.stream,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": tools or None,
        "tool_choice": _tool_choice(request, bool(tools)),
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": _response_format(request),
        "thinking": None
        if effort is None
        else {"type": "disabled" if effort == "none" else "enabled"},
    }
    try:
        return Translation(ChatCompletionRequest.model_validate(body), custom)
    except ValidationError as exc:
        raise validation_message(exc, body) from None
