"""Agent-sized prompts: mimoserve against llama-server, same GGUF, same threads, one pool.

    .venv/bin/python bench/agents.py [--model qwen2.5-coder-0.5b-instruct] [--skip-24k]

- Agent team: 4 clients share a ~1,500-token system prompt; all 4 send their first turn
  together, then all 4 their second turn (the first answer included). Reported: the
  slowest client's time to first token in each round, and the prompt tokens each server
  computed in round one (the rest it reused from its cache).
- Long prompt: time to first token of an 8,000-token prompt on a fresh server, the ITL
  a running stream sees meanwhile, and (mimoserve, default flags) whether a
  24,000-token prompt is accepted.

llama-server runs with its best flags for this: --kv-unified, --cache-reuse 256 and
its RAM prompt cache (on by default in the pinned version), --parallel 4 over the same
pool size. One server at a time (two llama.cpp processes on 2 cores slow each other).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from peers import llama_server_binary
from run import MODELS_DIR, THREADS, Server, free_port, started

from mimoserve.weights.store import WeightsStore

LANES = 4
# llama-server closes idle keep-alive connections after 5 s; a reused one then fails.
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)
POOL = 32768
ANSWER_TOKENS = 32


def system_prompt() -> str:
    rules = " ".join(
        f"Rule {i}: when the user asks about module m{i}, read src/m{i}.py first, keep its "
        f"public names, and run tests/test_m{i}.py after any change."
        for i in range(38)
    )
    return "You are a coding agent working in a Python repository. " + rules


QUESTIONS = [
    ("Which file do I read before changing module m3?", "And which test do I run after?"),
    ("What should I keep when changing module m17?", "Which file holds it?"),
    ("How do I check a change to module m29?", "And before the change?"),
    ("Where does module m41 live?", "What test covers it?"),
]


@dataclass
class Turn:
    ttft: float = float("nan")
    text: str = ""
    prompt_tokens: int = 0
    computed: int = 0  # prompt tokens the server computed (not reused)
    gaps: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each piece


def body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": "mimo-v2-flash",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream(client: httpx.AsyncClient, payload: dict[str, Any]) -> Turn:
    turn = Turn()
    start = time.perf_counter()
    last: float | None = None
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    now = time.perf_counter()
                    turn.arrivals.append(now)
                    if last is None:
                        turn.ttft = now - start
                    else:
                        turn.gaps.append(now - last)
                    last = now
                    turn.text += piece
            if usage := chunk.get("usage"):
                turn.prompt_tokens = usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                turn.computed = turn.prompt_tokens - cached
            if timings := chunk.get("timings"):  # llama-server's own count
                turn.computed = timings["prompt_n"]
    return turn


async def agent_team(server: Server) -> dict[str, float]:
    system = system_prompt()
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=900, headers=server.headers, limits=FRESH_CONNECTIONS
    ) as client:
        firsts = [
            [{"role": "system", "content": system}, {"role": "user", "content": q}]
            for q, _ in QUESTIONS
        ]
        round1 = await asyncio.gather(*(stream(client, body(m, ANSWER_TOKENS)) for m in firsts))
        seconds = [
            [*m, {"role": "assistant", "content": t.text}, {"role": "user", "content": q2}]
            for m, t, (_, q2) in zip(firsts, round1, QUESTIONS, strict=True)
        ]
        round2 = await asyncio.gather(*(stream(client, body(m, ANSWER_TOKENS)) for m in seconds))
    return {
        "round1_ttft_max": max(t.ttft for t in round1),
        "round2_ttft_max": max(t.ttft for t in round2),
        "round1_computed": sum(t.computed for t in round1),
        "one_prompt": max(t.prompt_tokens for t in round1),
    }


def long_text(tokens: int, salt: str = "") -> str:
    # About 21 tokens per line on both models' tokenizers.
    lines = [
        f"Line {i}{salt}: the build step number {i} copies file f{i}.txt."
        for i in range(tokens // 21)
    ]
    return "Summarise this build log in one line.\n" + "\n".join(lines)


async def long_prompt(server: Server, tokens: int, beside: bool) -> dict[str, float]:
    """TTFT of a long prompt on an idle server; with `beside`, then a second long prompt
    (other text, nothing to reuse) while a stream decodes: the stream's inter-token
    latency meanwhile, and that prompt's TTFT."""
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=1800, headers=server.headers, limits=FRESH_CONNECTIONS
    ) as client:
        alone = await stream(client, body([{"role": "user", "content": long_text(tokens)}], 4))
        result = {"ttft": alone.ttft, "prompt_tokens": alone.prompt_tokens}
        if not beside:
            return result
        counting = body([{"role": "user", "content": "Count from 1 to 1000."}], 1000)
        runner = asyncio.create_task(stream(client, {**counting, "ignore_eos": True}))
        await asyncio.sleep(3)
        started = time.perf_counter()
        crowded = await stream(
            client, body([{"role": "user", "content": long_text(tokens, "b")}], 4)
        )
        read_until = time.perf_counter()
        beside_stream = await runner
    # The runner's gaps while the second prompt was read.
    times = beside_stream.arrivals
    gaps = sorted(b - a for a, b in itertools.pairwise(times) if started <= b <= read_until)
    result.update(
        ttft_beside=crowded.ttft,
        itl_p50_beside=gaps[len(gaps) // 2] if gaps else float("nan"),
        itl_max_beside=gaps[-1] if gaps else float("nan"),
        tokens_beside=len(gaps),
    )
    return result


def mimoserve_command(gguf: Path, port: int, home: Path, default_flags: bool) -> list[str]:
    command = [sys.executable, "-m", "mimoserve.cli", "--home", str(home), "serve",
               "--weights", str(gguf), "--port", str(port), "--n-threads", THREADS]  # fmt: skip
    if not default_flags:
        command += ["--n-parallel", str(LANES), "--kv-cells", str(POOL)]
    return command


def llama_server_command(gguf: Path, port: int) -> list[str]:
    return [str(llama_server_binary()), "-m", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--parallel", str(LANES), "-c", str(POOL), "--kv-unified",
            "--cache-reuse", "256", "-cb", "-t", THREADS, "-b", "512", "-ub", "512",
            "--jinja", "--no-webui"]  # fmt: skip


def measure(
    name: str, command: Callable[[int], list[str]], work: Path, keyed: bool, tokens: int,
    idle_only: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Each part on a fresh server: the long prompt must not find the team's cache."""
    results: dict[str, Any] = {"team": {}}
    parts: list[tuple[str, Callable[[Server], Any]]] = [
        ("long", lambda s: long_prompt(s, tokens, not idle_only))
    ]
    if not idle_only:
        parts.insert(0, ("team", agent_team))
    for part, run in parts:
        port = free_port()
        log = work / f"{name}-{part}.log"
        try:
            with started(name, command(port), port, log, keyed) as server:
                results[part] = asyncio.run(run(server))
        except Exception as exc:  # a peer that fails a part is reported, not fatal
            print(f"{name} {part}: {exc!r}\n{log.read_text()[-2000:]}", flush=True)
            results[part] = {}
    print(json.dumps({name: results}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--skip-24k", action="store_true")
    parser.add_argument("--idle-long-only", action="store_true",
                        help="only the long prompt on an idle server (no team, no 24k)")  # fmt: skip
    args = parser.parse_args()
    gguf = WeightsStore(MODELS_DIR).resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours = measure("mimoserve", lambda p: mimoserve_command(gguf, p, work / f"home{p}", False),
                       work, True, args.long_tokens, args.idle_long_only)  # fmt: skip
        theirs = measure("llama-server", lambda p: llama_server_command(gguf, p), work, False,
                         args.long_tokens, args.idle_long_only)  # fmt: skip
        accepted = "skipped"
        if not (args.skip_24k or args.idle_long_only):
            port = free_port()
            command = mimoserve_command(gguf, port, work / "home24", True)
            with started("mimoserve", command, port, work / "m24.log", True) as server:
                result = asyncio.run(long_prompt(server, 24000, False))
                accepted = f"yes ({result['prompt_tokens']} tokens, TTFT {result['ttft']:.0f} s)"
    nan = float("nan")
    o, t = (defaultdict(lambda: nan, r["team"]) for r in (ours, theirs))
    ol, tl = (defaultdict(lambda: nan, r["long"]) for r in (ours, theirs))
    print(json.dumps({"mimoserve": ours, "llama-server": theirs}, indent=1))
    print(f"""
| ratio (target) | value |
|---|---|
| agent team, round 1 slowest TTFT, mimoserve / llama-server (<= 0.4) | {o['round1_ttft_max'] / t['round1_ttft_max']:.2f} ({o['round1_ttft_max']:.1f} s vs {t['round1_ttft_max']:.1f} s) |
| agent team, round 2 slowest TTFT, mimoserve / llama-server (<= 1.0) | {o['round2_ttft_max'] / t['round2_ttft_max']:.2f} ({o['round2_ttft_max']:.2f} s vs {t['round2_ttft_max']:.2f} s) |
| agent team, round 1 prompt tokens computed / one prompt, mimoserve (<= 1.3) | {o['round1_computed'] / o['one_prompt']:.2f} ({o['round1_computed']} of 4 x {o['one_prompt']}; llama-server {t['round1_computed']}) |
| {ol['prompt_tokens']}-token prompt TTFT on an idle server, mimoserve / llama-server (<= 1.0) | {ol['ttft'] / tl['ttft']:.2f} ({ol['ttft']:.1f} s vs {tl['ttft']:.1f} s) |
| same length, read while a stream decodes: TTFT, mimoserve / llama-server | {ol['ttft_beside'] / tl['ttft_beside']:.2f} ({ol['ttft_beside']:.1f} s vs {tl['ttft_beside']:.1f} s) |
| that stream's inter-token latency meanwhile, p50 / max | mimoserve {ol['itl_p50_beside'] * 1000:.0f} / {ol['itl_max_beside'] * 1000:.0f} ms ({ol['tokens_beside']} tokens); llama-server {tl['itl_p50_beside'] * 1000:.0f} / {tl['itl_max_beside'] * 1000:.0f} ms ({tl['tokens_beside']} tokens) |
| 24,000-token prompt with default flags, mimoserve | {accepted} |
""")  # fmt: skip


if __name__ == "__main__":
    main()
