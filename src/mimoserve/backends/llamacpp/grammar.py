"""Constraint grammars (GBNF) for the embedded engine, checked before a request is admitted."""

from __future__ import annotations

import json
import re

# The standard library's own regular-expression parser (what `re.compile` runs): the
# structure of a client's pattern without compiling or running it. Untyped in typeshed.
import re._constants as _c  # type: ignore[import-not-found]
import re._parser as _regex_parser  # type: ignore[import-not-found]
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from mimoserve.backends.base import OutputConstraint
from mimoserve.backends.llamacpp.native import NativeModel, grammar_compiles
from mimoserve.errors import InvalidRequestError

# Limits on what a client's schema may ask of the grammar converter: its output grows
# with nesting and with repetition counts, and it runs on a server thread.
MAX_SCHEMA_DEPTH = 32
MAX_REPEAT = 1000
# What nested repetitions in a `pattern` may weigh (the product of their choices, see
# `nested_weight`). llama.cpp's grammar engine keeps one parse stack per way the text so
# far can be split among possibly-empty repetitions, and advances every one of them for
# every candidate token, on the scheduler thread, where no other stream moves meanwhile.
# Measured with SmolLM2, ten tokens of 'a' (2026-12-06): weight 125 ({0,4} three deep)
# 0.27 s; 343 ({0,6} three deep) 3.0 s; 729 ({0,8} three deep) 34 s; 882
# ((a|b){0,20} twice) 13 s. Single repetitions are not nested and are not weighed
# (`[a-z]{0,255}`: 0.11 s), nor are repetitions in sequence (`a{0,30}` three times: 0.15 s).
MAX_NESTED_WEIGHT = 200
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
        if isinstance(pattern, str):
            if any(int(n) > MAX_REPEAT for n in _PATTERN_REPEAT.findall(pattern)):
                return f"pattern repetition counts above {MAX_REPEAT} cannot be enforced"
            problem = pattern_problem(pattern)
            if problem is not None:
                return problem
        stack.extend((value, depth + 1) for value in node.values())
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why a `pattern` would make each constrained token too costly, or None."""
    try:
        parsed = _regex_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return f"the pattern {pattern[:80]!r} is not a regular expression the server can check"
    try:
        weight = nested_weight(parsed)
    except RecursionError:
        weight = MAX_NESTED_WEIGHT + 1
    if weight > MAX_NESTED_WEIGHT:
        return (
            f"the pattern {pattern[:80]!r} nests repetitions too deeply to enforce (weight"
            f" {weight}, at most {MAX_NESTED_WEIGHT}: the product of the choices of nested"
            " repetitions such as (a{0,8}){0,8})"
        )
    return None


def nested_weight(items: Any) -> int:
    """The heaviest nesting of repetitions in a parsed regular expression: a repetition
    weighs its number of choices (`{2,5}`: 4; unbounded: 2) times what it repeats, an
    alternation the sum of its branches, a sequence its heaviest item; only repetitions
    that contain another repetition count (a lone one is cheap however long)."""
    return max(_weights(items)[1], 1)


_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT)


def _weights(items: Any) -> tuple[int, int, bool]:
    """(weight of the sequence, heaviest nested repetition inside it, whether it holds a
    repetition at all), in one walk."""
    weight, worst, repeats = 1, 0, False
    for op, value in items:
        inner_weight, inner_worst, inner_repeats = 1, 0, False
        if op in _REPEATS:
            low, high, body = value
            body_weight, body_worst, body_repeats = _weights(body)
            choices = 2 if high == _c.MAXREPEAT else high - low + 1
            inner_weight = min(choices * body_weight, 1 << 40)
            nested = body_repeats or body_weight > 1  # another repetition or alternation
            inner_worst = max(body_worst, inner_weight if nested else 0)
            inner_repeats = True
        elif op is _c.SUBPATTERN:
            inner_weight, inner_worst, inner_repeats = _weights(value[-1])
        elif op is _c.ATOMIC_GROUP:
            inner_weight, inner_worst, inner_repeats = _weights(value)
        elif op is _c.BRANCH:
            branches = [_weights(branch) for branch in value[1]]
            inner_weight = sum(w for w, _, _ in branches)
            inner_worst = max(w for _, w, _ in branches)
            inner_repeats = any(r for _, _, r in branches)
        weight = max(weight, inner_weight)
        worst = max(worst, inner_worst)
        repeats = repeats or inner_repeats
    return weight, worst, repeats


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
