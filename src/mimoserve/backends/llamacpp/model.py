"""The loaded GGUF: tokenizer and chat template (vocabulary only) plus the compute model."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from mimoserve.backends.llamacpp.control_text import GuardedPrompt
from mimoserve.backends.llamacpp.native import NativeModel, silence_llama_logs
from mimoserve.backends.llamacpp.template import CHATML_FALLBACK, ChatTemplate


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    # Longest request (prompt and completion); the model's trained context when unset.
    n_ctx: int | None = None
    n_parallel: int = 4  # sequences decoded together (not a memory split)
    n_threads: int | None = None
    n_batch: int = 512
    max_queue: int = 16
    # KV pool shared by all sequences, in tokens; see `pool_cells`.
    kv_cells: int | None = None
    kv_type: str = "f16"
    flash_attn: bool = True  # off: the V cache is laid out transposed (f16 only)
    spec_max_draft: int = 0  # speculative decoding: most guessed tokens per step (0: off)
    # The tiers under the pool (kv_store.py): where, how much, and whose weights (sha256).
    kv_store_dir: Path | None = None
    kv_disk_bytes: int = 0
    kv_host_bytes: int = 0
    weights_sha256: str | None = None

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    def pool_cells(self, trained_ctx: int) -> int:
        """The pool: at least one request of the longest length, and by default at least
        16,384 tokens, so that several agent-sized conversations fit next to each other."""
        if self.kv_cells is not None:
            return self.kv_cells
        return max(self.max_request(trained_ctx), DEFAULT_POOL_CELLS)

    def max_request(self, trained_ctx: int) -> int:
        longest = self.n_ctx or trained_ctx
        return min(longest, self.kv_cells) if self.kv_cells is not None else longest


DEFAULT_POOL_CELLS = 16_384
# Sequence ids beyond the decoding lanes hold cached prefixes (one per tree node).
PREFIX_HOLDERS = 96


class LoadedModel:
    """Tokenizer, template and weights of one GGUF.

    Tokenizing happens on the event loop while the scheduler decodes, so it uses a
    separate vocabulary-only handle that holds no compute state.
    """

    def __init__(self, config: EngineConfig) -> None:
        silence_llama_logs()
        self.vocab_handle: Any = llama_cpp.Llama(
            model_path=str(config.model_path), vocab_only=True, verbose=False
        )
        metadata: dict[str, str] = self.vocab_handle.metadata
        self.template_source = metadata.get("tokenizer.chat_template") or CHATML_FALLBACK
        self.bos_text = self._special_text(self.vocab_handle.token_bos())
        self.weights = NativeModel(config.model_path)
        self.trained_ctx = int(llama_cpp.llama_model_n_ctx_train(self.weights.ptr))
        self.n_ctx = config.max_request(self.trained_ctx)
        self.template = ChatTemplate(
            self.template_source,
            bos_token=self.bos_text,
            eos_token=self._special_text(self.vocab_handle.token_eos()),
            control_texts=self._control_texts(),
        )
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.weights.vocab))
        self.end_tokens = [t for t in range(self.weights.n_vocab) if self.is_end_of_generation(t)]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self.vocab_handle.detokenize([token], special=True)).decode("utf-8", "replace")

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.template_source

    def _control_texts(self) -> list[str]:
        """The texts of the vocabulary's control tokens (`<|im_start|>`, `<|endoftext|>`...)."""
        vocab = self.weights.vocab
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        return [
            self._special_text(token)
            for token in range(self.weights.n_vocab)
            if llama_cpp.llama_vocab_get_attr(vocab, token) & control
        ]

    def tokenize_prompt(self, prompt: GuardedPrompt) -> list[int]:
        """Template text with its control markers parsed; escaped client text as plain text."""
        # A template that writes the BOS token itself must not get a second one.
        text = prompt.text
        add_bos = self._add_bos and not (self.bos_text and text.startswith(self.bos_text))
        tokens: list[int] = []
        for index, segment in enumerate(prompt.segments):
            tokens += self.vocab_handle.tokenize(
                segment.text.encode(), add_bos=add_bos and index == 0, special=segment.control
            )
        return tokens

    def tokenize_text(self, text: str) -> list[int]:
        """Tokens for text the engine writes itself (no BOS, special tags recognised)."""
        tokens: list[int] = self.vocab_handle.tokenize(text.encode(), add_bos=False, special=True)
        return tokens

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.weights.vocab, token))

    def token_bytes(self, token: int) -> bytes:
        buffer = (ctypes.c_char * 64)()
        n = llama_cpp.llama_token_to_piece(self.weights.vocab, token, buffer, 64, 0, False)
        if n < 0:  # a longer piece than the buffer: ask again with the right size
            buffer = (ctypes.c_char * -n)()
            n = llama_cpp.llama_token_to_piece(self.weights.vocab, token, buffer, -n, 0, False)
        return buffer.raw[:n]

    def close(self) -> None:
        self.vocab_handle.close()
        self.weights.close()
