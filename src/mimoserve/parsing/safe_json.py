"""JSON parsing of text the server did not write (client strings, model output).

`json.loads` raises `RecursionError`, not a decode error, on input nested deeper than
the interpreter's recursion limit (5,000 `[` is enough): callers that only ask "is
this JSON?" must treat that as "no", never let it escape as a 500.
"""

from __future__ import annotations

import json
from typing import Any

NOT_JSON: Any = object()  # sentinel: `null` is valid JSON, so None cannot say "not JSON"


def loads_or_not_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return NOT_JSON
