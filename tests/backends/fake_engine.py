"""llama.cpp's part of the scheduler, simulated: a KV pool with cells per sequence id (as
the unified cache keeps them), batches, and samplers that write a predictable text.

The scheduler runs on these unchanged (`Scheduler(new_sampler, context, ...)`), so its
memory rules (admission, sharing, eviction, pre-emption), prefix waits, cancellation and
step sizing are tested in milliseconds, without weights.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mimoserve.backends.base import SamplingParams
from mimoserve.backends.llamacpp.kv_tiers import KvTiers
from mimoserve.backends.llamacpp.scheduler import Scheduler
from mimoserve.backends.llamacpp.sequence import DecodeJob, EngineEvent, Generated
from mimoserve.backends.llamacpp.speculation import StepShape
from mimoserve.events import ContentDelta, Finished, Started

VOCAB = 64
END = 0  # the end-of-turn token
LANES = 3


@dataclass
class Cell:
    pos: int
    token: int
    seqs: set[int]


class SimulatedKv:
    """Cells as llama.cpp keeps them: a position, the token computed there, the sequence
    ids that attend to it; a cell no id holds is free. `copy` and `remove` do what
    `llama_memory_seq_cp` and `llama_memory_seq_rm` do on one stream."""

    def __init__(self) -> None:
        self.cells: dict[int, Cell] = {}
        self._ids = itertools.count()

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        for cell in self.cells.values():
            if src in cell.seqs and start <= cell.pos < (end if end >= 0 else 1 << 30):
                cell.seqs.add(dst)

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None:
        stop = end if end >= 0 else 1 << 30
        for key, cell in list(self.cells.items()):
            if seq in cell.seqs and start <= cell.pos < stop:
                cell.seqs.discard(seq)
                if not cell.seqs:
                    del self.cells[key]

    def compute(self, seq: int, tokens: list[int], start: int) -> None:
        for offset, token in enumerate(tokens):
            self.cells[next(self._ids)] = Cell(start + offset, token, {seq})

    def view(self, seq: int) -> list[tuple[int, int]]:
        return sorted((c.pos, c.token) for c in self.cells.values() if seq in c.seqs)


@dataclass
class FakeBatch:
    capacity: int
    entries: list[tuple[int, int, int, bool]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries = []

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        assert len(self.entries) < self.capacity
        self.entries.append((token, pos, seq_id, logits))
        return len(self.entries) - 1

    def close(self) -> None:
        pass


class FakeContext:
    """A pool of `capacity` cells; decoding a batch that does not fit answers 1, as
    llama.cpp does when it finds no slot."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.kv = SimulatedKv()
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self.batches: list[list[tuple[int, int, int, bool]]] = []  # every decoded batch
        self.computed = 0  # tokens computed, over all batches
        self.loads = 0  # sequences put back from a lower tier
        self.saves = 0  # sequences copied out for a lower tier
        self.cells_at_load: list[int] = []  # cells in use as each load began
        self._last: list[tuple[int, int, int, bool]] = []

    def decode(self, batch: Any) -> int:
        assert isinstance(batch, FakeBatch)
        if len(self.kv.cells) + batch.size > self.capacity:
            return 1
        for token, pos, seq, _ in batch.entries:
            # Attention sees exactly the sequence's earlier positions, once each.
            assert [p for p, _ in self.kv.view(seq)] == list(range(pos)), (seq, pos)
            self.kv.compute(seq, [token], pos)
        self.batches.append(list(batch.entries))
        self.computed += batch.size
        self._last = list(batch.entries)
        return 0

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None:
        self.kv.remove(seq, start, end)

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        self.kv.copy(src, dst, start, end)

    def logits(self, batch_index: int) -> Any:
        return np.zeros(VOCAB, dtype=np.float32)

    def save(self, seq: int) -> bytearray:
        """The sequence's cells as (position, token) pairs: what llama.cpp's state holds
        (the computed values) stands in for by the tokens they were computed from."""
        self.saves += 1
        return bytearray(json.dumps(self.kv.view(seq)).encode())

    def load(self, seq: int, payload: bytearray) -> bool:
        try:
            cells = [(int(pos), int(token)) for pos, token in json.loads(payload)]
        except (ValueError, TypeError):
            return False
        if len(self.kv.cells) + len(cells) > self.capacity:
            return False
        self.cells_at_load.append(len(self.kv.cells))
        self.kv.remove(seq)
        for pos, token in cells:
            self.kv.compute(seq, [token], pos)
        self.loads += 1
        return True

    def ban_tokens(self, batch_index: int, tokens: list[int]) -> None:
        pass

    def context_of(self, batch_index: int) -> tuple[int, int, int]:
        """(sequence id, position, token) of a batch entry."""
        token, pos, seq, _ = self._last[batch_index]
        return seq, pos, token


class CountingSampler:
    """Writes the token after the one it was fed (1..VOCAB-1, never the end), shifted by
    its seed: a sequence's text is a function of its prompt's last token and its seed,
    so what it writes alone and what it writes pre-empted and resumed must agree."""

    constrained = False

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def sample(self, context: Any, batch_index: int) -> int:
        assert isinstance(context, FakeContext)
        _, _, token = context.context_of(batch_index)
        return 1 + (token + self.seed) % (VOCAB - 1)

    def sample_constrained(self, context: Any, batch_index: int, banned: list[int]) -> int | None:
        return self.sample(context, batch_index)

    def close(self) -> None:
        pass


def new_sampler(sampling: SamplingParams, seed: int, grammar: str | None) -> CountingSampler:
    return CountingSampler(sampling.seed or 0)


def fake_scheduler(
    *,
    pool_cells: int = 256,
    lanes: int = LANES,
    n_batch: int = 64,
    seq_ctx: int = 256,
    max_draft: int = 0,
    step_shape: StepShape | None = None,
    tiers: KvTiers | None = None,
    attends_pool: bool = False,
) -> tuple[Scheduler, FakeContext]:
    context = FakeContext(pool_cells, n_seq_max=lanes + 8)
    scheduler = Scheduler(
        new_sampler, context, lanes=lanes, pool_cells=pool_cells, seq_ctx=seq_ctx,
        n_batch=n_batch, token_bytes=lambda t: f"<{t}>".encode(), is_end=lambda t: t == END,
        end_tokens=[END], forced_close=[VOCAB - 1], new_batch=FakeBatch, max_draft=max_draft,
        step_shape=step_shape, tiers=tiers, attends_pool=attends_pool,
    )  # fmt: skip
    return scheduler, context


class Collected:
    """A job's events, as the scheduler thread emits them; waits on its end. A reader
    that keeps up takes each step as it comes; one that does not (`reads=False`) leaves
    them unread (the engine's backpressure then pauses the sequence)."""

    def __init__(self, reads: bool = True) -> None:
        self.events: list[EngineEvent | BaseException] = []
        self._done = threading.Event()
        self._reads = reads
        self.job: DecodeJob | None = None

    def __call__(self, event: EngineEvent | BaseException) -> None:
        self.events.append(event)
        if self._reads and isinstance(event, Generated) and self.job is not None:
            self.job.taken += 1
        if isinstance(event, Finished | BaseException):
            self._done.set()

    def read_from_now_on(self) -> None:
        """The client starts reading: what waits is taken, and every step after it."""
        self._reads = True
        if self.job is not None:
            self.job.taken = self.job.emitted

    def wait(self, timeout_s: float = 30) -> Finished:
        assert self._done.wait(timeout_s), "the job never ended"
        last = self.events[-1]
        if isinstance(last, BaseException):
            raise last
        assert isinstance(last, Finished)
        return last

    @property
    def started(self) -> Started:
        return next(e for e in self.events if isinstance(e, Started))

    @property
    def text(self) -> str:
        return "".join(
            e.text
            for g in self.events
            if isinstance(g, Generated)
            for e in g.events
            if isinstance(e, ContentDelta)
        )


def job(
    prompt: list[int], max_tokens: int, seed: int = 0, *, reads: bool = True
) -> tuple[DecodeJob, Collected]:
    collected = Collected(reads)
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, seed=seed)
    decode = DecodeJob(prompt=prompt, sampling=sampling, emit=collected)
    collected.job = decode
    return decode, collected
