"""JSON parsing of text the server did not write (client strings, model output).

`json.loads` raises `RecursionError`, not a decode error, on input nested deeper than
the interpreter's recursion limit (5,000 `[` is enough): callers that only ask "is
this JSON?" must treat that as "no", never let it escape as a 500.
"""

from __future__ import annotations

import json
import math
from typing import Any

NOT_JSON: Any = object()  # sentinel: `null` is valid JSON, so None cannot say "not JSON"


def loads_or_not_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return NOT_JSON


def _finite_or_text(text: str) -> Any:
    number = float(text)
    return number if math.isfinite(number) else text


def loads_for_wire(text: str, fallback: Any) -> Any:
    """A model's JSON text (tool-call arguments) as a value every JSON encoder and UTF-8
    writer takes: `NaN`, `Infinity` and numbers beyond a double (`1e999`) become the text
    they were written as, lone surrogates (`"\\ud800"`) become U+FFFD, and text that is
    not JSON or is nested too deep to encode gives `fallback`. The doors that send
    arguments as objects (Anthropic's `input`, Responses' custom tool `input`) use it, so
    an answer already counted as a 200 is always sent as one."""
    try:
        value = json.loads(text, parse_constant=str, parse_float=_finite_or_text)
        dumped = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return fallback
    try:
        dumped.encode("utf-8")
    except UnicodeEncodeError:
        # Pairs survive the round trip through UTF-16; lone halves become U+FFFD.
        value = json.loads(dumped.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
    return value
