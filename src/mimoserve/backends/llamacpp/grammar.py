"""Request-level inputs of the embedded engine: constraint grammars and prompted reasoning."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from mimoserve.backends.base import OutputConstraint, PromptMessage
from mimoserve.errors import InvalidRequestError


def build_grammar(constraint: OutputConstraint | None) -> Any:
    """A llama.cpp grammar for the constraint; built before admission so a bad schema is a 400."""
    if constraint is None:
        return None
    try:
        if constraint.schema is None:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(json.dumps(constraint.schema), verbose=False)
    except Exception as exc:  # the converter raises assorted types for unsupported schemas
        raise InvalidRequestError(
            f"{constraint.source}: the JSON schema cannot be enforced: {exc}",
            param=constraint.source,
            code="invalid_schema",
        ) from exc


def inline_reasoning(message: PromptMessage) -> PromptMessage:
    """Earlier reasoning, written back as the model wrote it, for templates that drop it."""
    if message.role != "assistant" or not message.reasoning_content:
        return message
    content = f"<think>\n{message.reasoning_content}\n</think>\n\n{message.content or ''}"
    return replace(message, content=content, reasoning_content=None)
