"""Single-stream decode speed: the mimoserve engine vs a plain llama.cpp loop, same library.

    .venv/bin/python bench/single_stream.py NAME   ->  prints "plain=<tok/s> engine=<tok/s>"

Both decode greedily from the same prompt tokens for up to 128 tokens, in this one
process, one after the other; the rate counts decode steps only (prefill excluded).
Five alternating pairs are run; the pair with the median engine/plain ratio is printed,
to dampen a noisy shared machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import llama_cpp

from mimoserve.backends.base import GenerationRequest, PromptMessage, SamplingParams
from mimoserve.backends.llamacpp.backend import LlamaCppBackend
from mimoserve.backends.llamacpp.model import EngineConfig
from mimoserve.backends.llamacpp.native import Batch, NativeContext, NativeModel
from mimoserve.events import ContentDelta, Finished
from mimoserve.weights.store import WeightsStore

TOKENS = 128
MESSAGES = (
    PromptMessage(role="user", content="Write a long story about a dragon who learns to paint."),
)


def plain_loop(model: NativeModel, prompt: list[int]) -> float:
    ctx = NativeContext(model, n_ctx=1024, n_seq=1, n_batch=512, n_threads=2)
    batch = Batch(512)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    for pos, token in enumerate(prompt):
        batch.add(token, pos, 0, pos == len(prompt) - 1)
    ctx.decode(batch)
    index, pos, produced, first = batch.size - 1, len(prompt), 0, 0.0
    while produced < TOKENS:
        token = llama_cpp.llama_sampler_sample(chain, ctx.ptr, index)
        produced += 1
        if produced == 1:
            first = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(model.vocab, token):
            break
        batch.clear()
        index = batch.add(token, pos, 0, True)
        pos += 1
        ctx.decode(batch)
    rate = (produced - 1) / (time.perf_counter() - first)
    llama_cpp.llama_sampler_free(chain)
    batch.close()
    ctx.close()
    return rate


async def engine_run(backend: LlamaCppBackend) -> float:
    request = GenerationRequest(MESSAGES, SamplingParams(temperature=0, max_tokens=TOKENS))
    first: float | None = None
    async for event in backend.generate(request):
        if isinstance(event, ContentDelta) and first is None:
            first = time.perf_counter()
        if isinstance(event, Finished):
            assert first is not None
            return (event.usage.completion_tokens - 1) / (time.perf_counter() - first)
    raise RuntimeError("no answer")


def main() -> None:
    path = WeightsStore(Path.home() / ".cache" / "mimoserve" / "models").resolve(sys.argv[1])
    backend = LlamaCppBackend(EngineConfig(path, n_ctx=1024, n_parallel=1, n_threads=2), "bench")
    prompt = backend._prompt_tokens(GenerationRequest(MESSAGES))
    pairs: list[tuple[float, float]] = []
    for _ in range(5):
        pairs.append((plain_loop(backend._model.weights, prompt), asyncio.run(engine_run(backend))))
    asyncio.run(backend.close())
    plain, engine = sorted(pairs, key=lambda pair: pair[1] / pair[0])[len(pairs) // 2]
    print(f"plain={plain:.2f} engine={engine:.2f}")


if __name__ == "__main__":
    main()
