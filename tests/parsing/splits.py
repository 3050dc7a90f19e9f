"""Helpers that cut a text into pieces in every possible way."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations, pairwise
from typing import TypeVar

T = TypeVar("T", str, bytes)


def _bounds(length: int, max_cuts: int) -> Iterator[list[int]]:
    limit = length - 1 if length <= 12 else max_cuts
    for count in range(limit + 1):
        for chosen in combinations(range(1, length), count):
            yield [0, *chosen, length]


def every_split(text: T, max_cuts: int = 3) -> Iterator[list[T]]:
    """Every way to cut `text` with up to `max_cuts` cuts (all 2^(n-1) ways when n is small)."""
    for bounds in _bounds(len(text), max_cuts):
        yield [text[a:b] for a, b in pairwise(bounds)]
