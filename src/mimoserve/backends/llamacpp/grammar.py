"""Constraint grammars (GBNF) for the embedded engine, checked before a request is admitted."""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from mimoserve.backends.base import OutputConstraint
from mimoserve.backends.llamacpp.native import NativeModel, grammar_compiles
from mimoserve.errors import InvalidRequestError

# Limits on what a client's schema may ask of the grammar converter: its output grows
# with nesting and with repetition counts, and it runs on a server thread.
MAX_SCHEMA_DEPTH = 32
MAX_REPEAT = 1000
_COUNT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties")
_PATTERN_REPEAT = re.compile(r"\{\s*(\d+)")


def schema_problem(schema: Any) -> str | None:
    """Why a schema cannot be converted safely, or None. Walked without recursion."""
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            return f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels"
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        # The converter fetches `https://` references itself, refused only by an
        # `assert` (gone under `python -O`): only local references are accepted.
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            return f"only local $ref values (starting with '#') are supported, got {ref!r}"
        for key in _COUNT_KEYS:
            count = node.get(key)
            if isinstance(count, int | float) and count > MAX_REPEAT:
                return f"{key} above {MAX_REPEAT} cannot be enforced"
        pattern = node.get("pattern")
        if isinstance(pattern, str) and any(
            int(n) > MAX_REPEAT for n in _PATTERN_REPEAT.findall(pattern)
        ):
            return f"pattern repetition counts above {MAX_REPEAT} cannot be enforced"
        stack.extend((value, depth + 1) for value in node.values())
    return None


def build_grammar(constraint: OutputConstraint | None, model: NativeModel) -> str | None:
    """GBNF for the constraint; built before admission so a bad schema is a 400, not a crash."""
    if constraint is None:
        return None
    error = "llama.cpp rejected the generated grammar"
    problem = None if constraint.schema is None else schema_problem(constraint.schema)
    try:
        if problem is not None:
            grammar, error = None, problem
        elif constraint.schema is None:
            grammar = JSON_GBNF
        else:
            grammar = json_schema_to_gbnf(json.dumps(constraint.schema))
    except Exception as exc:  # the converter raises assorted types for unsupported schemas
        grammar, error = None, str(exc) or type(exc).__name__
    if grammar is None or not grammar_compiles(model, grammar):
        raise InvalidRequestError(
            f"{constraint.source}: the JSON schema cannot be enforced: {error}",
            param=constraint.source,
            code="invalid_schema",
        )
    return grammar
