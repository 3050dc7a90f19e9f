"""Helpers that cut a text into pieces in every possible way."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations, pairwise
from typing import TypeVar

T = TypeVar("T", str, bytes)


def every_split(text: T, max_cuts: int = 3) -> Iterator[list[T]]:
    """Every way to cut `text` with up to `max_cuts` cuts (all 2^(n-1) ways when n is small)."""
    positions = range(1, len(text))
    limit = len(text) - 1 if len(text) <= 12 else max_cuts
    for count in range(limit + 1):
        for cuts in combinations(positions, count):
            bounds = (0, *cuts, len(text))
            yield [text[a:b] for a, b in pairwise(bounds)]
