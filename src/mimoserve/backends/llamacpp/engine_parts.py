"""What the scheduler needs of llama.cpp, as protocols: a KV context that decodes
batches and keeps cells per sequence, a batch to fill, a sampler per sequence.

`native.py` implements them over llama.cpp; a test implements them over a simulated KV
cache (tests/backends/fake_engine.py), so pre-emption, prefix waits, cancellation and
step sizing run in milliseconds without weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mimoserve.backends.base import SamplingParams


class TokenBatch(Protocol):
    """Tokens of several sequences decoded in one call."""

    @property
    def size(self) -> int: ...

    def clear(self) -> None: ...

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Appends a token; returns its index in the batch (where its logits will be)."""
        ...

    def close(self) -> None: ...


class KvContext(Protocol):
    """One KV pool shared by sequence ids (llama.cpp's unified cache)."""

    @property
    def n_seq_max(self) -> int: ...

    def decode(self, batch: Any) -> int:
        """0 when decoded; 1 when the pool had no cells for the batch; else a failure."""
        ...

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None: ...

    def copy(self, src: int, dst: int, start: int, end: int) -> None: ...

    def logits(self, batch_index: int) -> Any: ...

    def save(self, seq: int) -> bytearray:
        """The cells `seq` holds, serialised (to keep them in a lower tier)."""
        ...

    def load(self, seq: int, payload: bytearray) -> bool:
        """Saved cells back under `seq`; False when they cannot be."""
        ...

    def ban_tokens(self, batch_index: int, tokens: list[int]) -> None: ...


class TokenSampler(Protocol):
    """One sequence's sampler (its own grammar, penalties, seed)."""

    @property
    def constrained(self) -> bool: ...

    def sample(self, context: Any, batch_index: int) -> int: ...

    def sample_constrained(self, context: Any, batch_index: int, banned: list[int]) -> int | None:
        """None when the grammar accepts only the (banned) end: the answer is complete."""
        ...

    def close(self) -> None: ...


# (sampling, seed, grammar or None) -> a sampler; raises ValueError for bad settings.
SamplerFactory = Callable[[SamplingParams, int, str | None], TokenSampler]
BatchFactory = Callable[[int], TokenBatch]
