"""The tiers under the KV pool (host memory, disk): restarts, more prefixes than the pool,
a pool full of idle prefixes, and the 8-stream throughput, each against a peer measured
in the same run.

    .venv/bin/python bench/kv_tiers.py [--runs 3] [--parts restart,cycle,full,streams]

Default model (Qwen2.5-Coder 0.5B), all cores, one server up at a time:
- restart: the recorded Claude Code first request (Anthropic door, answer capped at one
  token, so the time is the time to the first token), sent to a fresh server; the server
  stopped and started again on the same home; the request again. Ratio: after / cold,
  and the share of the prompt served from cache after the restart.
- cycle: 12 distinct ~3,000-token system prompts (same question after each), cycled
  twice through a pool of 13,000 cells (four of them); the second cycle is timed: mean
  time to first token and hit rate, for mimoserve with its tiers (default flags),
  mimoserve with `--kv-disk-bytes 0` (the pool only), and llama-server with its prompt
  cache in host memory (`--cache-ram`, its default 8 GiB, one slot). With the pool alone
  every request misses (LRU, cycled), so that peer's one cycle is its steady state.
- full: a 6,000-token prompt and a 200-token decode (ignore_eos), with 24,000 cells of
  other prompts sent just before (they would sit in the pool), against the same on an
  empty pool (a fresh server, up at the same time; which target goes first alternates
  between runs): time to first token and decode time per token, ratio full / empty.
  The peer: the same with the tiers off (`--kv-disk-bytes 0`: idle prefixes stay),
  first run only (its fills are computed every time: four minutes).
- streams: 8 streams at once (200 tokens each, short prompts): aggregate tok/s with the
  tiers against without (paired, alternating which goes first).
Prints each run's figures, then medians and ranges.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from peers import llama_server_binary
from run import MODELS_DIR, THREADS, Server, free_port, started

from mimoserve.weights.store import WeightsStore

ROOT = Path(__file__).parent.parent
CLAUDE_CODE = ROOT / "tests" / "api" / "fixtures" / "claude_code_request.json"
TIMEOUT = httpx.Timeout(3600)
CYCLE_PROMPTS = 12
CYCLE_POOL = 13_000
KEY_PATTERN = re.compile(r"mimo-[0-9a-f]{12}_[A-Za-z0-9_-]{43}")  # four ~3,100-token prompts and their answers


def long_text(tokens: int, salt: str) -> str:
    # About 21 tokens per line on Qwen's tokenizer.
    return "\n".join(
        f"Line {i} ({salt}): the build step number {i} copies file f{i}.txt."
        for i in range(tokens // 21)
    )


def mimoserve(gguf: Path, port: int, home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mimoserve.cli", "--home", str(home), "serve",
            "--weights", str(gguf), "--port", str(port), "--n-threads", THREADS,
            "--no-speech", *extra]  # fmt: skip


def llama_server(gguf: Path, port: int, *extra: str) -> list[str]:
    return [str(llama_server_binary()), "-m", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "-t", THREADS, "--jinja", "--no-webui", *extra]  # fmt: skip


async def chat(server: Server, messages: list[dict[str, str]], max_tokens: int,
               **extra: Any) -> dict[str, float]:  # fmt: skip
    """One streamed chat completion: time to first token, decode tok/s, prompt and cached
    tokens (as the server reports them)."""
    body = {"model": "mimo-v2-flash", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **extra}  # fmt: skip
    sent = time.perf_counter()
    first = last = 0.0
    usage: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=TIMEOUT) as client, client.stream(
        "POST", server.base_url + "/v1/chat/completions", json=body, headers=server.headers
    ) as response:
        assert response.status_code == 200, (await response.aread())[:500]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                now = time.perf_counter()
                first = first or now
                last = now
            usage = event.get("usage") or usage
    completion = int(usage.get("completion_tokens", 0))
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft": (first or time.perf_counter()) - sent,
        "tok_s": (completion - 1) / (last - first) if completion > 1 and last > first else 0.0,
        "prompt": float(usage.get("prompt_tokens", 0)),
        "cached": float(details.get("cached_tokens", 0)),
    }


async def claude_code_first_token(server: Server) -> dict[str, float]:
    body = json.loads(CLAUDE_CODE.read_text())
    body.update(model="mimo-v2-flash", max_tokens=1, stream=False)
    body.pop("thinking", None)  # one token: nothing to think about
    sent = time.perf_counter()
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        response = await client.post(server.base_url + "/v1/messages", json=body,
                                     headers=server.headers)  # fmt: skip
    assert response.status_code == 200, response.text[:500]
    usage = response.json()["usage"]
    cached = usage["cache_read_input_tokens"]
    return {"seconds": time.perf_counter() - sent, "prompt": usage["input_tokens"] + cached,
            "cached": cached}  # fmt: skip


def part_restart(gguf: Path, work: Path) -> dict[str, float]:
    home = work / "restart-home"
    shutil.rmtree(home, ignore_errors=True)
    port = free_port()
    with started("mimoserve", mimoserve(gguf, port, home), port, work / "restart-1.log",
                 key_from_log=True) as server:  # fmt: skip
        cold = asyncio.run(claude_code_first_token(server))
        capture = tier_seconds(server, "capture")
        key = server.headers
    # The same home: the key printed at the first start is the key (none printed again).
    with started("mimoserve", mimoserve(gguf, port, home), port,
                 work / "restart-2.log") as server:  # fmt: skip
        server.headers = key
        warm = asyncio.run(claude_code_first_token(server))
        load = tier_seconds(server, "load")
    return {"cold_s": cold["seconds"], "restarted_s": warm["seconds"],
            "ratio": warm["seconds"] / cold["seconds"], "prompt": warm["prompt"],
            "cached_share": warm["cached"] / warm["prompt"], "capture_s": capture,
            "load_s": load}  # fmt: skip


def tier_seconds(server: Server, operation: str) -> float:
    """mimoserve's time spent moving cells (`mimoserve:kv_tier_seconds`), all models."""
    page = httpx.get(server.base_url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith("mimoserve:kv_tier_seconds_total")
               and f'operation="{operation}"' in line)  # fmt: skip


def cycle_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": long_text(3000, f"tenant {i}")},
            {"role": "user", "content": "Which file does step 7 copy?"}]  # fmt: skip


async def cycle(server: Server, rounds: int) -> dict[str, float]:
    """`rounds` cycles over the prompts; figures of the last one."""
    last: list[dict[str, float]] = []
    for _ in range(rounds):
        last = [await chat(server, cycle_messages(i), 8) for i in range(CYCLE_PROMPTS)]
    mean_ttft = statistics.mean(r["ttft"] for r in last)
    hits = sum(r["cached"] for r in last) / sum(r["prompt"] for r in last) if last[0][
        "prompt"] else float("nan")  # fmt: skip
    return {"mean_ttft": mean_ttft, "hit_rate": hits}


def part_cycle(gguf: Path, work: Path) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    found: dict[str, float] = {}
    flags = ("--kv-cells", str(CYCLE_POOL), "--n-ctx", "8192")
    with started("mimoserve", mimoserve(gguf, port, work / "cycle-tiers", *flags), port,
                 work / "cycle-tiers.log", key_from_log=True) as server:  # fmt: skip
        tiers = asyncio.run(cycle(server, 2))
    with started("mimoserve", mimoserve(gguf, port, work / "cycle-pool", *flags,
                 "--kv-disk-bytes", "0"), port, work / "cycle-pool.log",
                 key_from_log=True) as server:  # fmt: skip
        pool = asyncio.run(cycle(server, 1))
    with started("llama-server", llama_server(gguf, port, "-c", str(CYCLE_POOL), "--parallel",
                 "1"), port, work / "cycle-llama.log") as server:  # fmt: skip
        peer = asyncio.run(cycle(server, 2))
    for name, result in (("tiers", tiers), ("pool_only", pool), ("llama_server", peer)):
        found[f"{name}_ttft"] = result["mean_ttft"]
        found[f"{name}_hits"] = result["hit_rate"]
    found["vs_pool_only"] = tiers["mean_ttft"] / pool["mean_ttft"]
    found["vs_llama_server"] = tiers["mean_ttft"] / peer["mean_ttft"]
    return found


async def full_then_target(server: Server, salt: str, fill: bool, stamp: int = 0
                           ) -> dict[str, float]:  # fmt: skip
    if fill:
        for i in range(4):  # 24,000 cells of other prompts
            await chat(server, [{"role": "user", "content": long_text(6000, f"fill {i}")}], 1)
    text = f"Request {stamp}.\n" + long_text(6000, salt)
    return await chat(server, [{"role": "user", "content": text}], 200, ignore_eos=True)


STAMP = int(time.time())
KEYS: dict[Path, dict[str, str]] = {}  # a kept home's key (printed at its first start only)


def _key_in(log: Path) -> dict[str, str]:
    """The key a server printed at its first start, from a log an earlier bench kept."""
    found = KEY_PATTERN.search(log.read_text()) if log.exists() else None
    return {"api-key": found.group(0)} if found else {}


def part_full(gguf: Path, work: Path, run: int, peer_too: bool) -> dict[str, float]:
    flags = ("--kv-cells", "32768", "--n-ctx", "8192")
    found: dict[str, float] = {}
    configs = [("tiers", ())] + ([("pool_only", ("--kv-disk-bytes", "0"))] if peer_too else [])
    for name, extra in configs:
        # Both servers up together, the targets timed one after the other, in an order
        # that alternates between runs (the shared machine drifts). The fill prompts
        # stay on disk between runs (the tiers' home is kept): only the first run
        # computes them.
        home = work / f"full-{name}"
        known = KEYS.get(home) or _key_in(work / f"full-{name}.log")
        empty_home = work / f"empty-{name}"
        shutil.rmtree(empty_home, ignore_errors=True)
        port, empty_port = free_port(), free_port()
        with started("mimoserve", mimoserve(gguf, port, home, *flags, *extra), port,
                     work / f"full-{name}.log", key_from_log=not known) as server, \
             started("mimoserve", mimoserve(gguf, empty_port, empty_home, *flags, *extra),
                     empty_port, work / f"empty-{name}.log", key_from_log=True) as fresh:  # fmt: skip
            server.headers = known or server.headers
            KEYS[home] = server.headers
            for i in range(4):  # 24,000 cells of other prompts
                asyncio.run(chat(server, [{"role": "user",
                                           "content": long_text(6000, f"fill {i}")}], 1))  # fmt: skip
            timed = {}
            order = [("full", server), ("empty", fresh)]
            for label, target in order if run % 2 == 0 else order[::-1]:
                # A salt of this invocation's own: a kept home must not hold the target.
                salt = f"target {run} {label}"
                timed[label] = asyncio.run(full_then_target(target, salt, False, STAMP))
        full, empty = timed["full"], timed["empty"]
        found[f"{name}_ttft_ratio"] = full["ttft"] / empty["ttft"]
        found[f"{name}_decode_ratio"] = empty["tok_s"] / full["tok_s"]  # time per token
        found[f"{name}_ttft_empty"] = empty["ttft"]
    return found


async def eight(server: Server) -> float:
    began = time.perf_counter()
    results = await asyncio.gather(*[
        chat(server, [{"role": "user", "content": f"Write a story about robot {i}."}], 200,
             ignore_eos=True)
        for i in range(8)
    ])  # fmt: skip
    return 8 * 200 / (time.perf_counter() - began) if results else 0.0


def part_streams(gguf: Path, work: Path, run: int) -> dict[str, float]:
    port = free_port()
    rates: dict[str, float] = {}
    order = [("tiers", ()), ("pool_only", ("--kv-disk-bytes", "0"))]
    for name, extra in order if run % 2 == 0 else order[::-1]:
        home = work / f"streams-{name}-{run}"
        with started("mimoserve", mimoserve(gguf, port, home, "--n-parallel", "8", *extra),
                     port, work / f"streams-{name}.log", key_from_log=True) as server:  # fmt: skip
            asyncio.run(eight(server))  # warm-up
            rates[name] = asyncio.run(eight(server))
    return {"tiers_tok_s": rates["tiers"], "pool_only_tok_s": rates["pool_only"],
            "ratio": rates["tiers"] / rates["pool_only"]}  # fmt: skip


def report(runs: list[dict[str, dict[str, float]]]) -> None:
    gathered: dict[tuple[str, str], list[float]] = defaultdict(list)
    for result in runs:
        for part, figures in result.items():
            for name, value in figures.items():
                gathered[(part, name)].append(value)
    print("\nmedian [min-max] over", len(runs), "runs")
    for (part, name), values in gathered.items():
        print(f"  {part:8} {name:22} {statistics.median(values):10.3f} "
              f"[{min(values):.3f}-{max(values):.3f}] (n={len(values)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", default="restart,cycle,full,streams")
    parser.add_argument("--work", type=Path, default=None, help="kept between runs")
    parser.add_argument("--first-run", type=int, default=1,
                        help="number of the first run (to go on with a kept --work)")  # fmt: skip
    args = parser.parse_args()
    gguf = WeightsStore(MODELS_DIR).resolve(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="kv-tiers-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    runs = []
    for run in range(args.first_run - 1, args.first_run - 1 + args.runs):
        result: dict[str, dict[str, float]] = {}
        for part in parts:
            if part == "restart":
                result[part] = part_restart(gguf, work)
            elif part == "cycle":
                result[part] = part_cycle(gguf, work / f"cycle-{run}")
            elif part == "full":
                result[part] = part_full(gguf, work, run, peer_too=run == 0)
            elif part == "streams":
                result[part] = part_streams(gguf, work, run)
            print(f"run {run + 1} {part}: {json.dumps(result[part])}", flush=True)
        runs.append(result)
    report(runs)


if __name__ == "__main__":
    main()
