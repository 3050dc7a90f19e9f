"""What `--kv-type q8_0` costs and saves against f16, on the embedded engine.

    .venv/bin/python bench/kv_type.py [--model qwen2.5-coder-0.5b-instruct]

For each KV type, in a fresh process: resident memory of the engine with its pool
(32,768 cells), prompt-reading speed on a ~4,000-token prompt, single-stream decode
speed, and greedy answers to a few prompts, compared with f16's: how many are identical
and where the first differing character is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "Explain what a mutex is in two sentences.",
    "List five prime numbers and say why each is prime.",
    "What does HTTP status 429 mean?",
]


def child(model: str, kv_type: str) -> None:
    from mimoserve.backends.base import GenerationRequest, PromptMessage, SamplingParams
    from mimoserve.backends.llamacpp.backend import LlamaCppBackend
    from mimoserve.backends.llamacpp.model import EngineConfig
    from mimoserve.events import ContentDelta
    from mimoserve.weights.store import WeightsStore

    gguf = WeightsStore(Path.home() / ".cache" / "mimoserve" / "models").resolve(model)
    backend = LlamaCppBackend(
        EngineConfig(gguf, n_parallel=1, kv_cells=32768, kv_type=kv_type), model
    )

    def request(text: str, tokens: int) -> GenerationRequest:
        return GenerationRequest(
            (PromptMessage(role="user", content=text),),
            SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=tokens > 64),
        )

    async def run(req: GenerationRequest) -> tuple[str, float, float]:
        start = time.perf_counter()
        first = None
        text = ""
        async for event in backend.generate(req):
            if isinstance(event, ContentDelta):
                first = first or time.perf_counter()
                text += event.text
        return text, (first or start) - start, time.perf_counter() - (first or start)

    long_prompt = " ".join(f"Step {i}: copy file f{i}.txt to the build folder." for i in range(330))
    _, ttft, _ = asyncio.run(run(request(long_prompt + "\nSummarise.", 1)))
    _, _, decode_s = asyncio.run(run(request("Count upwards from one.", 129)))
    answers = [asyncio.run(run(request(p, 96)))[0] for p in PROMPTS]
    rss = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    print(json.dumps({"prefill_tok_s": 4000 / ttft, "decode_tok_s": 128 / decode_s,
                      "rss_mb": int(rss.group(1)) / 1024 if rss else 0, "answers": answers}))  # fmt: skip
    asyncio.run(backend.close())


def first_difference(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--child", choices=["f16", "q8_0"])
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child)
        return
    results = {}
    for kv_type in ("f16", "q8_0"):
        out = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--child", kv_type],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[kv_type] = json.loads(out.stdout.strip().splitlines()[-1])
    f16, q8 = results["f16"], results["q8_0"]
    same = sum(a == b for a, b in zip(f16["answers"], q8["answers"], strict=True))
    diffs = [first_difference(a, b) for a, b in zip(f16["answers"], q8["answers"], strict=True)]
    print(f"""| kv type | RSS MB | prompt tok/s | decode tok/s |
|---|---|---|---|
| f16 | {f16['rss_mb']:.0f} | {f16['prefill_tok_s']:.0f} | {f16['decode_tok_s']:.1f} |
| q8_0 | {q8['rss_mb']:.0f} | {q8['prefill_tok_s']:.0f} | {q8['decode_tok_s']:.1f} |

q8_0 / f16: RSS {q8['rss_mb'] / f16['rss_mb']:.2f}, prompt {q8['prefill_tok_s'] / f16['prefill_tok_s']:.2f}, decode {q8['decode_tok_s'] / f16['decode_tok_s']:.2f}; greedy answers identical {same}/{len(PROMPTS)}, first differing character {diffs}""")  # fmt: skip


if __name__ == "__main__":
    main()
