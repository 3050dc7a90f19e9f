"""Renders chat history with the model's own Jinja chat template (from the GGUF metadata).

Templates are model-supplied code, so they run in Jinja's immutable sandbox, with the
few helpers Hugging Face templates expect (`raise_exception`, `strftime_now`, and a
`tojson` that does not HTML-escape).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mimoserve.backends.base import PromptMessage
from mimoserve.backends.llamacpp.control_text import ControlTextGuard, GuardedPrompt
from mimoserve.parsing.safe_json import NOT_JSON, loads_or_not_json


class TemplateError(Exception):
    """The template refused the conversation (e.g. roles in an order it does not accept)."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _arguments_as_object(arguments: str) -> Any:
    # Templates print `arguments | tojson`; a JSON string would come out double-encoded.
    parsed = loads_or_not_json(arguments)
    return arguments if parsed is NOT_JSON else parsed


def to_template_message(message: PromptMessage) -> dict[str, Any]:
    # Null content (an assistant turn of only tool calls, or of nothing) is rendered as
    # empty text: templates concatenate `content` with strings, and None made that a 500.
    data: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.reasoning_content:
        data["reasoning_content"] = message.reasoning_content
    if message.tool_calls:
        data["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments_as_object(call["function"]["arguments"]),
                },
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        data["tool_call_id"] = message.tool_call_id
    if message.name:
        data["name"] = message.name
    return data


def inline_reasoning(message: PromptMessage) -> PromptMessage:
    """Earlier reasoning, written back as the model wrote it, for templates that drop it."""
    if message.role != "assistant" or not message.reasoning_content:
        return message
    content = f"<think>\n{message.reasoning_content}\n</think>\n\n{message.content or ''}"
    return replace(message, content=content, reasoning_content=None)


class ChatTemplate:
    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        control_texts: Sequence[str] = (),
    ) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not compile: {exc}") from exc
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._control = ControlTextGuard.pattern_for(control_texts)

    def render(
        self,
        messages: Sequence[PromptMessage],
        *,
        tools: Sequence[dict[str, Any]] = (),
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
    ) -> str:
        return self.render_guarded(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        ).text

    def render_guarded(
        self,
        messages: Sequence[PromptMessage],
        *,
        tools: Sequence[dict[str, Any]] = (),
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
    ) -> GuardedPrompt:
        """The prompt in segments: template text, and client text that holds control-token
        markers, which must be tokenized as plain text (see control_text.py)."""
        guard = ControlTextGuard(self._control)
        try:
            rendered = self._template.render(
                messages=guard.escape([to_template_message(m) for m in messages]),
                tools=guard.escape(list(tools)) or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                enable_thinking=enable_thinking,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            # Model-supplied templates assume well-formed turns; whatever they trip over in
            # a client's conversation is that conversation's fault: a 400, never a 500.
            raise TemplateError(f"the chat template cannot render these messages: {exc}") from exc
        return guard.split(rendered)


# A plain ChatML template for GGUFs that carry none.
CHATML_FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
