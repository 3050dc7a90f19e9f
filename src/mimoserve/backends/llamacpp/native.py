"""Typed handles on llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only the scheduler thread calls into a context; these classes own the native objects
and free them. No model math here: llama.cpp does all of it.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from mimoserve.backends.base import SamplingParams

_NEG_INF = -math.inf


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own logs are debug chatter at our level; errors surface as return codes."""


_logging_silenced = False


def silence_llama_logs() -> None:
    global _logging_silenced  # process-wide by nature: llama.cpp has one log sink
    if not _logging_silenced:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        _logging_silenced = True


class NativeModel:
    def __init__(self, path: Path) -> None:
        silence_llama_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type values


class NativeContext:
    """One context holding every sequence; the KV cache is one pool shared by all of them
    (unified), so sequence ids can share cells."""

    def __init__(
        self,
        model: NativeModel,
        *,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        n_threads: int,
        kv_type: str = "f16",
        flash_attn: bool = True,
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = True
        params.type_k = params.type_v = KV_TYPES[kv_type]
        if kv_type != "f16" and not flash_attn:
            raise ValueError("llama.cpp reads a quantized V cache only through flash attention")
        # Said, not left to llama.cpp's "auto": the choice fixes the V cache's layout
        # (transposed without it), which stored cells must match.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)  # fmt: skip
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.n_vocab = model.n_vocab
        self.n_seq_max = n_seq

    def decode(self, batch: Batch) -> int:
        return int(llama_cpp.llama_decode(self.ptr, batch.native))

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None:
        """Takes `seq` off its cells at positions [start, end); cells no sequence holds
        any more are free."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, start, end)

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Adds `dst` to the cells `src` holds at [start, end): in the unified cache the
        cells are shared, not copied."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, start, end)

    def save(self, seq: int) -> bytearray:
        """llama.cpp's serialisation of the cells `seq` holds (positions, K and V)."""
        size = int(llama_cpp.llama_state_seq_get_size(self.ptr, seq))
        buffer = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(buffer)
        written = int(llama_cpp.llama_state_seq_get_data(self.ptr, view, size, seq))
        del view  # a live ctypes view would pin the buffer's size
        return buffer if written == size else buffer[:written]

    def load(self, seq: int, payload: bytearray) -> bool:
        """Puts saved cells back under `seq` (wherever the pool has free cells); False
        when llama.cpp refuses them (other weights or KV type, torn data, no room)."""
        view = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
        read = int(llama_cpp.llama_state_seq_set_data(self.ptr, view, len(payload), seq))
        del view
        return read == len(payload)

    def logits(self, batch_index: int) -> Any:
        """A copy of the row of logits (numpy), before anything changes it."""
        row = llama_cpp.llama_get_logits_ith(self.ptr, batch_index)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def ban_tokens(self, batch_index: int, tokens: list[int]) -> None:
        logits = llama_cpp.llama_get_logits_ith(self.ptr, batch_index)
        for token in tokens:
            logits[token] = _NEG_INF

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


# Step sizes whose cost speculation measures at start: up to past the longest step the
# guess limit allows, and around llama.cpp's flash-attention tile (64 query rows: from
# there its CPU kernel is tiled). Measured at 2,000 cells (Qwen2.5-Coder-0.5B, 2 cores):
# 32 tokens 265 ms, 63 496 ms, 64 342 ms, 65-72 411 ms (a remainder past the tile), 96
# 532 ms. Within a kernel the cost is near linear in the size: no more sizes needed.
STEP_SIZES = (1, 2, 4, 8, 16, 32, 63, 64, 65, 96)
# The context the step sizes are measured over a second time (what a cell adds to each
# token of a step of that size): long enough to stand out of the noise (a 32-token
# step of the default model takes a quarter longer), short to read (~1 s at start).
SHAPE_SPAN = 512


@dataclass(frozen=True)
class MeasuredShape:
    empty: dict[int, float]  # step size -> seconds, nothing else in the context
    at_span: dict[int, float]  # the same, after `span` cells of its own
    span: int


def step_sizes(max_draft: int) -> tuple[int, ...]:
    """The sizes to measure for a guess limit: those of `STEP_SIZES` a step can reach,
    and the largest step itself (one decoding token and a full guess)."""
    largest = max_draft + 1
    return tuple(sorted({*(n for n in STEP_SIZES if n < largest), largest}))


def measure_step_shape(
    context: NativeContext, batch: Batch, sizes: tuple[int, ...], span: int = SHAPE_SPAN
) -> MeasuredShape:
    """Seconds a step of n tokens of one sequence takes on this machine (the best of a
    few tries), on an empty context and after `span` cells of its own (cells it sees:
    llama.cpp's flash attention skips masked ones), on a scratch context before
    serving. `batch` holds the span in one step. Small steps are short and noisy (over
    512 cells a one-token step's attention is a few ms): they get more tries, for
    about the time of two tries of 16 tokens; over the span, the larger steps get one
    (StepShape pools them per attention kernel)."""
    empty = _step_seconds(context, batch, sizes, at=0, least=2)
    filled = 0
    while filled < span:  # the span's cells, as a prompt is read
        batch.clear()
        for pos in range(filled, min(span, filled + batch.capacity)):
            batch.add(pos % 16, pos, 0, pos == span - 1)
        context.decode(batch)
        filled += batch.size
    at_span = _step_seconds(context, batch, sizes, at=span, least=1)
    context.remove(0)
    batch.clear()
    return MeasuredShape(empty, at_span, span)


def _step_seconds(context: NativeContext, batch: Batch, sizes: tuple[int, ...], at: int,
                  least: int) -> dict[int, float]:  # fmt: skip
    seconds: dict[int, float] = {}
    for n in sizes:
        times = []
        for _ in range(max(least, 16 // n)):
            batch.clear()
            for pos in range(n):
                batch.add(pos % 16, at + pos, 0, True)
            began = time.perf_counter()
            context.decode(batch)
            times.append(time.perf_counter() - began)
            context.remove(0, at)
        seconds[n] = min(times)
    return seconds


class Batch:
    """A reusable llama_batch: tokens of several sequences decoded in one call."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.native = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.size = 0

    def clear(self) -> None:
        self.size = 0
        self.native.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Appends a token; returns its index in the batch (where its logits will be)."""
        i = self.size
        native = self.native
        native.token[i] = token
        native.pos[i] = pos
        native.n_seq_id[i] = 1
        native.seq_id[i][0] = seq_id
        native.logits[i] = logits
        self.size += 1
        native.n_tokens = self.size
        return i

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.native)


class Sampler:
    """One sequence's sampler chain: its own grammar, penalties, cuts, temperature, seed.

    The grammar is kept out of the chain. llama.cpp aborts the whole process (a C++
    exception through ctypes) when a grammar is handed a token it rejects, which happens
    when the only token a grammar allows is the end of generation and that token is
    banned (`ignore_eos`): every candidate is then -inf and the chain picks one anyway.
    With the grammar applied by hand, the sampler sees that nothing is left and says so.
    """

    def __init__(
        self, model: NativeModel, sampling: SamplingParams, *, seed: int, grammar: str | None
    ) -> None:
        self.ptr: Any = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        self._grammar: Any = None
        self._candidates: _Candidates | None = None
        try:
            if grammar is not None:
                self._grammar = _grammar_sampler(model, grammar)
                if not self._grammar:
                    raise ValueError("llama.cpp refused the grammar")
                self._candidates = _Candidates(model.n_vocab)
            self._build(model, sampling, seed)
        except ValueError:
            self.close()
            raise

    @property
    def constrained(self) -> bool:
        return self._grammar is not None

    def _build(self, model: NativeModel, sampling: SamplingParams, seed: int) -> None:
        if sampling.frequency_penalty or sampling.presence_penalty:
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    model.n_vocab, 64, 1.0, sampling.frequency_penalty, sampling.presence_penalty
                )
            )
        if sampling.temperature <= 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        # The order of llama-server's chain: cut (top_k, top_p, min_p), then temperature.
        if sampling.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1:
            self._add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0:
            self._add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: Any) -> None:
        if not sampler:
            raise ValueError("llama.cpp refused a sampler (invalid grammar?)")
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)

    def sample(self, context: NativeContext, batch_index: int) -> int:
        """Free text: llama_sampler_sample also accepts the token into the chain."""
        assert self._grammar is None, "constrained sequences use sample_constrained"
        return int(llama_cpp.llama_sampler_sample(self.ptr, context.ptr, batch_index))

    def sample_constrained(
        self, context: NativeContext, batch_index: int, banned: list[int]
    ) -> int | None:
        """A token the grammar accepts and that is not banned, or None when there is none
        (the grammar is complete and only the banned end of generation could follow)."""
        candidates = self._candidates
        assert candidates is not None and self._grammar is not None
        logits = llama_cpp.llama_get_logits_ith(context.ptr, batch_index)
        candidates.load(logits, banned)
        llama_cpp.llama_sampler_apply(self._grammar, candidates.ref)
        if not candidates.any_left():
            return None
        llama_cpp.llama_sampler_apply(self.ptr, candidates.ref)
        token = candidates.selected_token()
        # Only now, with a token the grammar allowed, is it accepted (grammar, penalties).
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


class _Candidates:
    """A reusable llama_token_data_array over the whole vocabulary, filled from logits."""

    def __init__(self, n_vocab: int) -> None:
        self._n = n_vocab
        self._data = np.zeros(
            n_vocab, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)])
        )
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        self.ref = ctypes.byref(self._array)

    def load(self, logits: Any, banned: list[int]) -> None:
        self._data["id"] = self._ids
        self._data["logit"] = np.ctypeslib.as_array(logits, shape=(self._n,))
        self._data["p"] = 0.0
        if banned:
            self._data["logit"][banned] = _NEG_INF
        # Samplers may shrink or re-point the array: reset it every time.
        self._array.data = self._data.ctypes.data_as(llama_cpp.llama_token_data_p)  # type: ignore[assignment]
        self._array.size = self._n
        self._array.selected = -1
        self._array.sorted = False

    def any_left(self) -> bool:
        # The grammar marks rejected tokens -inf in place, in our buffer.
        if ctypes.cast(self._array.data, ctypes.c_void_p).value != self._data.ctypes.data:
            raise RuntimeError("the grammar sampler moved the candidate array")
        return bool(np.isfinite(self._data["logit"][: int(self._array.size)]).any())

    def selected_token(self) -> int:
        selected = int(self._array.selected)
        if not 0 <= selected < int(self._array.size):
            raise RuntimeError("the sampler chain selected no token")
        return int(self._array.data[selected].id)


def _grammar_sampler(model: NativeModel, grammar: str) -> Any:
    """A grammar sampler for GBNF whose start rule is `root` (null when it does not parse)."""
    return llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")


def grammar_compiles(model: NativeModel, grammar: str) -> bool:
    sampler = _grammar_sampler(model, grammar)
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True
