"""Concurrent streaming load against any OpenAI-compatible server, with latency statistics."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class StreamResult:
    ok: bool
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LoadResult:
    concurrency: int
    wall: float
    streams: list[StreamResult]

    @property
    def completed(self) -> int:
        return sum(s.ok for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams if s.ok) / self.wall

    def ttft(self, q: float) -> float:
        return _quantile([s.ttft for s in self.streams if s.ok and s.ttft is not None], q)

    def itl(self, q: float) -> float:
        return _quantile([g for s in self.streams if s.ok for g in s.gaps], q)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def chat_body(prompt: str, max_tokens: int, seed: int, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "top_p": 0.95,
        # llama-server's and llama-cpp-python's defaults, sent to every server so all
        # sample alike.
        "top_k": 40,
        "min_p": 0.05,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every stream generates exactly max_tokens (mimoserve and llama-server honour it;
        # llama-cpp-python's server ignores it), so throughput compares equal work.
        "ignore_eos": True,
    }


async def one_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    result = StreamResult(ok=False)
    start = time.perf_counter()
    last: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"])[:80]
                    return result
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = type(exc).__name__
        return result
    result.ok = True
    result.tokens = usage_tokens if usage_tokens else chunks
    return result


async def run_load(
    base_url: str, concurrency: int, prompts: list[str], max_tokens: int, model: str,
    headers: dict[str, str] | None = None,
) -> LoadResult:  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=600, limits=limits, headers=headers or {}
    ) as client:
        bodies = [
            chat_body(prompts[i % len(prompts)], max_tokens, seed=i, model=model)
            for i in range(concurrency)
        ]
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(client, b) for b in bodies))
        wall = time.perf_counter() - start
    return LoadResult(concurrency, wall, list(streams))
