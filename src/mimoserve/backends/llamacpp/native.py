"""Typed handles on llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only the scheduler thread calls into a context; these classes own the native objects
and free them. No model math here: llama.cpp does all of it.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

import llama_cpp

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


class NativeContext:
    """One context holding every sequence; the KV cache is unified across them."""

    def __init__(
        self, model: NativeModel, *, n_ctx: int, n_seq: int, n_batch: int, n_threads: int
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = True
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.n_vocab = model.n_vocab

    def decode(self, batch: Batch) -> int:
        return int(llama_cpp.llama_decode(self.ptr, batch.native))

    def forget(self, seq_id: int, start: int = 0) -> None:
        """Drops a sequence's KV cells from position `start` on."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    def ban_tokens(self, batch_index: int, tokens: list[int]) -> None:
        logits = llama_cpp.llama_get_logits_ith(self.ptr, batch_index)
        for token in tokens:
            logits[token] = _NEG_INF

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


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
    """One sequence's sampler chain: its own grammar, penalties, cuts, temperature, seed."""

    def __init__(
        self, model: NativeModel, sampling: SamplingParams, *, seed: int, grammar: str | None
    ) -> None:
        self.ptr: Any = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        try:
            self._build(model, sampling, seed, grammar)
        except ValueError:
            self.close()
            raise

    def _build(
        self, model: NativeModel, sampling: SamplingParams, seed: int, grammar: str | None
    ) -> None:
        if grammar is not None:
            self._add(llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root"))
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
        # llama_sampler_sample also accepts the token into the chain (grammar, penalties).
        return int(llama_cpp.llama_sampler_sample(self.ptr, context.ptr, batch_index))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


def grammar_compiles(model: NativeModel, grammar: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True
