"""The loaded GGUF: llama.cpp model and context, its tokenizer and its chat template."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from mimoserve.backends.llamacpp.template import CHATML_FALLBACK, ChatTemplate


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int = 4096
    n_threads: int | None = None
    n_batch: int = 512
    max_queue: int = 16


class LoadedModel:
    """Owns the llama.cpp objects; only the engine's single worker thread decodes with them."""

    def __init__(self, config: EngineConfig) -> None:
        threads = config.n_threads or os.cpu_count() or 1
        self.llm: Any = llama_cpp.Llama(
            model_path=str(config.model_path),
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.n_ctx = config.n_ctx
        metadata: dict[str, str] = self.llm.metadata
        self.template_source = metadata.get("tokenizer.chat_template") or CHATML_FALLBACK
        self.bos_text = self._special_text(self.llm.token_bos())
        self.template = ChatTemplate(
            self.template_source,
            bos_token=self.bos_text,
            eos_token=self._special_text(self.llm.token_eos()),
        )
        # llama-cpp-python has no public wrapper for the vocabulary's end-of-generation set
        # (which holds <|im_end|> as well as the EOS token); use the C API on its vocab.
        self._vocab = self.llm._model.vocab
        self._add_bos = bool(self.llm._model.add_bos_token())
        self.end_tokens = [t for t in range(self.llm.n_vocab()) if self.is_end_of_generation(t)]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self.llm.detokenize([token], special=True)).decode("utf-8", "replace")

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.template_source

    def tokenize_prompt(self, prompt: str) -> list[int]:
        # A template that writes the BOS token itself must not get a second one.
        add_bos = self._add_bos and not (self.bos_text and prompt.startswith(self.bos_text))
        tokens: list[int] = self.llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
        return tokens

    def tokenize_text(self, text: str) -> list[int]:
        """Tokens for text the engine writes itself (no BOS, special tags recognised)."""
        tokens: list[int] = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        return tokens

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.llm.detokenize([token]))

    def cached_prefix(self, prompt: list[int]) -> int:
        """How many prompt tokens the KV cache already holds (llama-cpp-python reuses them).

        At least one prompt token is always decoded again to produce fresh logits.
        """
        held = self.llm.input_ids[: self.llm.n_tokens]
        common = 0
        for held_token, prompt_token in zip(held, prompt, strict=False):
            if held_token != prompt_token:
                break
            common += 1
        return min(common, len(prompt) - 1)

    def close(self) -> None:
        self.llm.close()
