"""Fleet routing: least outstanding requests against cache-aware routing, on real engines.

    .venv/bin/python bench/routing.py [--runs 3] [--engine mimoserve|llama-server]
                                      [--turns short|tool]

Three engines serve SmolLM2 (one thread each: three engines share this machine's two
cores), mimoserve's embedded engine or llama-server, behind one mimoserve gateway
(`--fleet-routing least-outstanding`, then `cache`), and behind two gateways at once
(cache routing, turns alternating between them), first each learning on its own, then
sharing claims through one Redis (`--redis-url`). 12 agent conversations with 3
distinct ~1,500-token system prompts, 4 turns each, all under way at once; answers are
capped at 16 tokens and go into the next turn. Each turn after the first brings a short
question (`--turns short`, the default) or a ~300-token tool result of its own (`tool`:
what an agent reads back, here lines of a file).

Reported per configuration: prompt tokens computed (prompt - cached, as the engines
count), cache hit rate (cached / prompt), TTFT p50 and p95 (client side), and the
busiest engine's requests against the mean. Engines start afresh for each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/services.py starts Redis

from peers import llama_server_binary
from run import MODELS_DIR, Server, free_port, started
from tests.services import redis_server

from mimoserve.weights.store import WeightsStore

RULES = " ".join(f"Rule {i}: when asked about item {i}, answer with code {i * 7 % 13}."
                 for i in range(76))  # fmt: skip
SYSTEMS = [f"You are coding agent {name}. {RULES}" for name in ("Alder", "Birch", "Cedar")]
CONVERSATIONS, TURNS = 12, 4
TIMEOUT = httpx.Timeout(900)


async def turn(client: httpx.AsyncClient, gateway: Server, messages: list[dict[str, str]]
               ) -> tuple[float, str, dict[str, Any]]:  # fmt: skip
    body = {"model": "mimo-v2-flash", "messages": messages, "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    began, ttft = time.perf_counter(), 0.0
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", gateway.base_url + "/v1/chat/completions", json=body,
                             headers=gateway.headers) as response:  # fmt: skip
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if piece := (choice.get("delta") or {}).get("content"):
                    ttft = ttft or time.perf_counter() - began
                    text.append(piece)
            usage = event.get("usage") or usage
    return ttft or time.perf_counter() - began, "".join(text), usage


def next_turn(turns: str, number: int, step: int) -> str:
    if turns == "short":
        return f"And item {number + step + 1}?"
    return tool_result(number, step)


async def conversation(client: httpx.AsyncClient, gateways: list[Server], number: int,
                       turns: str) -> list[tuple[float, dict[str, Any]]]:  # fmt: skip
    messages = [{"role": "system", "content": SYSTEMS[number % len(SYSTEMS)]},
                {"role": "user", "content": f"Task {number}: what is the code for item {number}?"}]  # fmt: skip
    results = []
    for step in range(TURNS):
        ttft, answer, usage = await turn(client, gateways[step % len(gateways)], messages)
        results.append((ttft, usage))
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": next_turn(turns, number, step)}]  # fmt: skip
    return results


def tool_result(number: int, step: int) -> str:
    """A turn's own text, as an agent's tool call brings back (about 300 tokens)."""
    lines = [f"    total_{number}_{step} += table[{k}] * {number * 31 + step * 7 + k}"
             for k in range(20)]  # fmt: skip
    return (
        f"Tool result (read_file task_{number}/step_{step}.py):\n"
        + "\n".join(lines)
        + (f"\nWhat is the code for item {number + step + 1}?")
    )


async def workload(gateways: list[Server], turns: str) -> list[tuple[float, dict[str, Any]]]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        runs = await asyncio.gather(*(conversation(client, gateways, n, turns)
                                      for n in range(CONVERSATIONS)))  # fmt: skip
    return [r for run in runs for r in run]


def measure(kind: str, routing: str, gateways: int, shared: bool, turns: str, work: Path
            ) -> dict[str, float]:  # fmt: skip
    gguf = WeightsStore(MODELS_DIR).resolve("smollm2-135m-instruct")
    with ExitStack() as stack:
        engines, env = [], {}
        for i in range(3):
            port = free_port()
            if kind == "mimoserve":
                command = [sys.executable, "-m", "mimoserve.cli", "--home", str(work / f"e{i}"),
                           "serve", "--weights", str(gguf), "--port", str(port),
                           "--n-threads", "1", "--n-parallel", "4"]  # fmt: skip
            else:
                command = [str(llama_server_binary()), "-m", str(gguf), "--host", "127.0.0.1",
                           "--port", str(port), "-t", "1", "--parallel", "4", "-c", "32768",
                           "--kv-unified", "--cache-reuse", "256", "--jinja", "--no-webui",
                           "--metrics"]  # fmt: skip
            engine = stack.enter_context(started(kind, command, port, work / f"e{i}.log",
                                                 key_from_log=kind == "mimoserve"))  # fmt: skip
            engines.append(engine)
            env[f"ENGINE_{i}_KEY"] = engine.headers.get("api-key", "none")
        registry = work / "registry.toml"
        registry.write_text('[models.mimo-v2-flash]\nbackend = "upstream"\n' + "".join(
            f'[[models.mimo-v2-flash.upstreams]]\nurl = "{e.base_url}/v1"\n'
            f'kind = "{"mimoserve" if kind == "mimoserve" else "llama.cpp"}"\n'
            f'api_key_env = "ENGINE_{i}_KEY"\n' for i, e in enumerate(engines)))  # fmt: skip
        fronts = []
        sharing = ["--redis-url", stack.enter_context(redis_server(work))] if shared else []
        for g in range(gateways):
            port = free_port()
            fronts.append(stack.enter_context(started(
                "mimoserve", [sys.executable, "-m", "mimoserve.cli", "--home",
                              str(work / f"g{g}"), "serve", "--registry-file", str(registry),
                              "--port", str(port), "--fleet-routing", routing, *sharing],
                port, work / f"g{g}.log", key_from_log=True, env=env)))  # fmt: skip
        began = time.perf_counter()
        results = asyncio.run(workload(fronts, turns))
        elapsed = time.perf_counter() - began
        loads = [counted(e, kind) for e in engines]
    prompt = sum(u.get("prompt_tokens", 0) for _, u in results)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                 for _, u in results)  # fmt: skip
    ttfts = sorted(t for t, _ in results)
    return {
        "computed": prompt - cached, "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[int(0.95 * (len(ttfts) - 1))],
        "ttft_mean": statistics.fmean(ttfts),
        "max_over_mean_load": max(loads) / (sum(loads) / len(loads)) if sum(loads) else 0.0,
        "seconds": elapsed,
    }  # fmt: skip


def counted(engine: Server, kind: str) -> float:
    """The load an engine took: requests served (mimoserve's counter); llama-server counts
    no requests, so its generated tokens stand in (every answer is 16 tokens or fewer)."""
    prefix = (
        "mimoserve:requests_total{" if kind == "mimoserve" else "llamacpp:tokens_predicted_total"
    )
    page = httpx.get(engine.base_url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith(prefix))  # fmt: skip


def config_name(routing: str, gateways: int, shared: bool) -> str:
    return f"{routing} x{gateways}{' redis' if shared else ''}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engine", choices=["mimoserve", "llama-server"], default="mimoserve")
    parser.add_argument("--turns", choices=["short", "tool"], default="short")
    args = parser.parse_args()
    configs = [("least-outstanding", 1, False), ("cache", 1, False), ("cache", 2, False),
               ("cache", 2, True)]  # fmt: skip
    table: dict[str, list[dict[str, float]]] = {config_name(*c): [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for routing, gateways, shared in configs:
                work = Path(tmp) / f"{run}-{routing}-{gateways}-{shared}"
                work.mkdir()
                figures = measure(args.engine, routing, gateways, shared, args.turns, work)
                table[config_name(routing, gateways, shared)].append(figures)
                print(json.dumps({"run": run, "routing": routing, "gateways": gateways,
                                  "redis": shared, **figures}), flush=True)  # fmt: skip

    def cell(name: str, key: str, fmt: str) -> str:
        values = [f[key] for f in table[name]]
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    print(f"\nengines: 3 x {args.engine} (SmolLM2, 1 thread each); turns: {args.turns}; "
          f"{args.runs} runs, median [range]")  # fmt: skip
    print("| routing | gateways | prompt tokens computed | hit rate | TTFT p50 s | TTFT p95 s "
          "| TTFT mean s | all turns done s | busiest / mean |\n"
          "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for routing, gateways, shared in configs:
        key = config_name(routing, gateways, shared)
        print(
            f"| {routing} | {gateways}{' (Redis)' if shared else ''} | "
            f"{cell(key, 'computed', '.0f')} | "
            f"{cell(key, 'hit_rate', '.2f')} | {cell(key, 'ttft_p50', '.2f')} | "
            f"{cell(key, 'ttft_p95', '.2f')} | {cell(key, 'ttft_mean', '.2f')} | "
            f"{cell(key, 'seconds', '.1f')} | {cell(key, 'max_over_mean_load', '.2f')} |"
        )
    for key in ("ttft_p50", "ttft_p95", "ttft_mean", "computed"):
        base = [f[key] for f in table[config_name("least-outstanding", 1, False)]]
        ours = [f[key] for f in table[config_name("cache", 1, False)]]
        ratios = [o / b for o, b in zip(ours, base, strict=True)]
        print(
            f"{key}, cache / least-outstanding (paired by run): "
            f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        )


if __name__ == "__main__":
    main()
