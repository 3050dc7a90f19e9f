"""Constraint grammars (GBNF) for the embedded engine, checked before a request is admitted."""

from __future__ import annotations

import json

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from mimoserve.backends.base import OutputConstraint
from mimoserve.backends.llamacpp.native import NativeModel, grammar_compiles
from mimoserve.errors import InvalidRequestError


def build_grammar(constraint: OutputConstraint | None, model: NativeModel) -> str | None:
    """GBNF for the constraint; built before admission so a bad schema is a 400, not a crash."""
    if constraint is None:
        return None
    error = "llama.cpp rejected the generated grammar"
    try:
        grammar = (
            JSON_GBNF
            if constraint.schema is None
            else json_schema_to_gbnf(json.dumps(constraint.schema))
        )
    except Exception as exc:  # the converter raises assorted types for unsupported schemas
        grammar, error = None, str(exc)
    if grammar is None or not grammar_compiles(model, grammar):
        raise InvalidRequestError(
            f"{constraint.source}: the JSON schema cannot be enforced: {error}",
            param=constraint.source,
            code="invalid_schema",
        )
    return grammar
