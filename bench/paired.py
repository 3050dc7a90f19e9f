"""The 8-stream load on mimoserve and llama-server, measured in alternation.

    .venv/bin/python bench/paired.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 5]

`bench/run.py` measures each server once, minutes apart; on this shared 2-core machine
the load of other tenants moves a server's figure by 10-30 % between such runs (llama-
server's own 8-stream figure went from 33.6 to 42.8 tok/s between two of them), more
than the difference being measured. Here both servers are started with `run.py`'s flags
and stay up (an idle llama.cpp process sleeps, so the one at rest does not slow the
other); each round runs the same 8-stream load on one, then on the other, in alternating
order, and the ratio is taken within the round, so drift slower than a round cancels.
Prints each round's ratio, then the median and the range, and both servers' peak RSS
after the rounds (the second no-regression target).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from load import LoadResult, run_load
from run import (
    MAX_TOKENS,
    MODELS_DIR,
    PROMPTS,
    Server,
    free_port,
    llama_server_command,
    mimoserve_command,
    peak_rss_mb,
    started,
)

from mimoserve.weights.catalog import CATALOG
from mimoserve.weights.store import WeightsStore

STREAMS = 8


def load(server: Server, streams: int = STREAMS) -> LoadResult:
    result = asyncio.run(
        run_load(server.base_url, streams, PROMPTS, MAX_TOKENS, "mimo-v2-flash", server.headers)
    )
    if result.completed != streams:
        errors = {s.error for s in result.streams if not s.ok}
        raise RuntimeError(f"{server.name}: {result.completed}/{streams} completed: {errors}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", choices=sorted(CATALOG))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gguf = WeightsStore(MODELS_DIR).resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        ours_port, theirs_port = free_port(), free_port()
        ours = stack.enter_context(started(
            "mimoserve", mimoserve_command(gguf, ours_port, work / "home"), ours_port,
            work / "mimoserve.log", key_from_log=True))  # fmt: skip
        theirs = stack.enter_context(started(
            "llama-server", llama_server_command(gguf, theirs_port), theirs_port,
            work / "llama-server.log"))  # fmt: skip
        for server in (ours, theirs):  # warm-up: first-use allocations, page cache
            load(server, 2)
        ratios = []
        for round_ in range(args.rounds):
            order = (ours, theirs) if round_ % 2 == 0 else (theirs, ours)
            figures = {server.name: load(server).tokens_per_s for server in order}
            ratio = figures["mimoserve"] / figures["llama-server"]
            ratios.append(ratio)
            print(f"round {round_ + 1}: mimoserve {figures['mimoserve']:.1f} tok/s, "
                  f"llama-server {figures['llama-server']:.1f} tok/s, ratio {ratio:.3f}",
                  flush=True)  # fmt: skip
        rss = {server.name: peak_rss_mb(server.process.pid) for server in (ours, theirs)}
    print(f"{args.model}, {STREAMS} streams of {MAX_TOKENS} tokens, tok/s mimoserve / "
          f"llama-server over {len(ratios)} paired rounds: median {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]; peak RSS mimoserve / llama-server "
          f"{rss['mimoserve'] / rss['llama-server']:.2f} ({rss['mimoserve']:.0f} MB vs "
          f"{rss['llama-server']:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
