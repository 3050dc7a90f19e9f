"""Waiting on a condition instead of sleeping: tests order events by what happened,
never by how long something took, so a loaded machine makes them slower, not red."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Generous: reaching it means the condition will not come, not that the machine is slow.
DEADLINE_S = 30.0


async def until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """Returns as soon as `condition()` holds; fails naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


def until_sync(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """`until` for code outside an event loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)
