"""Parsers for the body of one `<tool_call>...</tool_call>` block, in the formats models use.

Each returns None when the body is not a well-formed call to a declared tool, so the
caller can hand the text back as content instead of losing it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from mimoserve.parsing.events import ToolCallParsed
from mimoserve.parsing.safe_json import NOT_JSON, loads_or_not_json

ToolFormat = Literal["hermes", "mimo_xml"]

# name -> JSON schema of the function's parameters (may be empty)
ToolSchemas = Mapping[str, Mapping[str, Any]]


def _dump(arguments: Mapping[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def parse_json_call(data: Any, tools: ToolSchemas) -> ToolCallParsed | None:
    """`{"name": N, "arguments": {...}}` (also `parameters`, or arguments as a JSON string)."""
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = loads_or_not_json(arguments)
    if not isinstance(name, str) or name not in tools or not isinstance(arguments, dict):
        return None
    return ToolCallParsed(name=name, arguments=_dump(arguments))


def parse_hermes(body: str, tools: ToolSchemas) -> ToolCallParsed | None:
    return parse_json_call(loads_or_not_json(body), tools)


_FUNCTION = re.compile(r"^\s*<function=([^>\s]+)>(.*)</function>\s*$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.DOTALL)


def _strip_one_newline(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def convert_parameter(value: str, schema: Mapping[str, Any]) -> Any:
    """MiMo-V2 writes every value as text; the schema says what it really is."""
    kind = schema.get("type")
    # A client's schema: `type` may be anything, a list of anything.
    kinds = {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else {kind}
    if not all(isinstance(k, str | None) for k in kinds):
        kinds = {None}
    if "string" in kinds and len(kinds) == 1:
        return value
    text = value.strip()
    if "null" in kinds and text == "null":
        return None
    if "boolean" in kinds and text.lower() in {"true", "false"}:
        return text.lower() == "true"
    if "integer" in kinds and re.fullmatch(r"-?\d+", text):
        return int(text)
    if "number" in kinds:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return int(number) if number.is_integer() and "." not in text else number
    if kinds & {"object", "array", None}:
        parsed = loads_or_not_json(text)
        if parsed is not NOT_JSON:
            return parsed
    return value


def parse_mimo_xml(body: str, tools: ToolSchemas) -> ToolCallParsed | None:
    match = _FUNCTION.match(body)
    if match is None or match.group(1) not in tools:
        return None
    name, inner = match.group(1), match.group(2)
    properties = tools[name].get("properties")
    if not isinstance(properties, Mapping):  # a client's schema may say anything here
        properties = {}
    arguments: dict[str, Any] = {}
    for param, raw in _PARAMETER.findall(inner):
        schema = properties.get(param)
        arguments[param] = convert_parameter(
            _strip_one_newline(raw), schema if isinstance(schema, Mapping) else {}
        )
    leftover = _PARAMETER.sub("", inner).strip()
    if leftover:
        return None  # text outside any parameter: not a well-formed call
    return ToolCallParsed(name=name, arguments=_dump(arguments))


def parse_tool_body(fmt: ToolFormat, body: str, tools: ToolSchemas) -> ToolCallParsed | None:
    if fmt == "hermes":
        return parse_hermes(body, tools)
    return parse_mimo_xml(body, tools)
