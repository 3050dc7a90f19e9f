"""Flash attention on or off (`serve --flash-attn`) for speculation at agents' context sizes.

    .venv/bin/python bench/attention.py [--runs 3] [--claude] [--steps-only | --agents-only]

Two parts, default model, 2 threads:
- steps: what a decode step of n tokens costs against a step of one, at several context
  sizes, on one llama.cpp context per setting (no server). A guess of n-1 tokens pays
  only where the step costs less than the tokens it may yield; this is why (measured
  2026-12-07) speculation gains little at an agent's 8,000-19,000 cells with flash
  attention: llama.cpp's CPU kernel takes 2-63 query rows one by one over the context.
- agents: the recorded Codex request (and with `--claude` Claude Code's, 18,700 tokens:
  ~5 minutes to read per server) and the same request again, as in
  `bench/speculation.py --agents`, on mimoserve with speculation against mimoserve
  without, both up together, for each setting in turn within a run (fresh servers each
  time), timed from sending to the last event with the prompt cached.
Prints each run's lines, then per setting and item the median [range] over the runs of
the ratio to no speculation, and (same item, no speculation) off against on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import speculation
from run import MODELS_DIR, THREADS, free_port, started

from mimoserve.backends.llamacpp.native import Batch, NativeContext, NativeModel
from mimoserve.weights.store import WeightsStore

SETTINGS = ("on", "off")
SPANS = (500, 3000, 8600, 18700)
STEP_SIZES = (1, 8, 16, 32, 64, 128)


def step_costs(gguf: Path, flash_attn: bool) -> dict[int, dict[int, float]]:
    """Seconds of a step of each size at each span (median of a few), on one context
    filled step by step, and (size 0) the seconds the fill took up to that span: prompt
    reading; run on a thread of its own as the engine does."""
    found: dict[int, dict[int, float]] = {}

    def measure() -> None:
        model = NativeModel(gguf)
        ctx = NativeContext(model, n_ctx=max(SPANS) + 2 * max(STEP_SIZES), n_seq=1,
                            n_batch=512, n_threads=int(THREADS),
                            flash_attn=flash_attn)  # fmt: skip
        batch = Batch(512)
        try:
            filled, reading = 0, 0.0
            for span in SPANS:
                began = time.perf_counter()
                while filled < span:
                    batch.clear()
                    for i in range(min(512, span - filled)):
                        batch.add(100 + (filled + i) % 5000, filled + i, 0, False)
                    assert ctx.decode(batch) == 0
                    filled += min(512, span - filled)
                reading += time.perf_counter() - began
                found[span] = {0: reading}
                for n in STEP_SIZES:
                    times = []
                    for _ in range(5 if n == 1 else 3):
                        batch.clear()
                        for i in range(n):
                            batch.add(200 + i, span + i, 0, True)
                        began = time.perf_counter()
                        assert ctx.decode(batch) == 0
                        times.append(time.perf_counter() - began)
                        ctx.remove(0, span)  # the step's cells go: the next starts alike
                    found[span][n] = statistics.median(times)
        finally:
            batch.close()
            ctx.close()
            model.close()

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    return found


def agent_items(claude: bool) -> set[str]:
    names = {"agent codex", "agent codex again"}
    return names | ({"agent claude", "agent claude again"} if claude else set())


Figures = dict[str, dict[str, dict[str, float]]]  # side: item: figures


def agents_once(gguf: Path, work: Path, setting: str, claude: bool) -> Figures:
    command = speculation.mimoserve_command
    n_ctx = 32768 if claude else 16384
    extra = ["--flash-attn", setting]
    spec_port, plain_port = free_port(), free_port()
    with (
        started("mimoserve", [*command(gguf, spec_port, work / "spec", None, n_ctx), *extra],
                spec_port, work / "spec.log", key_from_log=True) as spec,
        started("mimoserve", [*command(gguf, plain_port, work / "plain", 0, n_ctx), *extra],
                plain_port, work / "plain.log", key_from_log=True) as plain,
    ):  # fmt: skip
        ours, theirs = asyncio.run(speculation.workload([spec, plain], agent_items(claude),
                                                        claude=claude))  # fmt: skip
    return {"spec": ours, "plain": theirs}


def figure(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--claude", action="store_true", help="Claude Code's request too")
    parser.add_argument("--steps-only", action="store_true")
    parser.add_argument("--agents-only", action="store_true")
    args = parser.parse_args()
    gguf = WeightsStore(MODELS_DIR).resolve(args.model)
    for setting in SETTINGS if not args.agents_only else ():
        costs = step_costs(gguf, flash_attn=setting == "on")
        for span, by_size in costs.items():
            ratios = " ".join(f"{n}:{seconds / by_size[1]:.1f}" for n, seconds in by_size.items()
                              if n)  # fmt: skip
            print(f"steps flash-attn {setting} span {span}: prompt read to here {by_size[0]:.0f} s;"
                  f" one token {by_size[1] * 1000:.0f} ms; n tokens cost x one: {ratios}",
                  flush=True)  # fmt: skip
    if args.steps_only:
        return
    runs: list[dict[str, Figures]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            found: dict[str, Figures] = {}
            for setting in SETTINGS if run % 2 == 0 else reversed(SETTINGS):
                work = Path(tmp) / f"run{run}-{setting}"
                work.mkdir()
                found[setting] = agents_once(gguf, work, setting, args.claude)
                print(json.dumps({"run": run, "flash_attn": setting, **found[setting]}),
                      flush=True)  # fmt: skip
            runs.append(found)
    ratio: dict[str, list[float]] = defaultdict(list)
    for found in runs:
        for item in sorted(agent_items(args.claude)):
            for setting in SETTINGS:
                spec, plain = found[setting]["spec"][item], found[setting]["plain"][item]
                ratio[f"{item} flash-attn {setting}: speculation / none"].append(
                    spec["tok_s"] / plain["tok_s"])
                if spec["drafted"]:  # (no figure for a run that guessed nothing)
                    ratio[f"{item} flash-attn {setting}: guesses kept"].append(
                        spec["accepted"] / spec["drafted"])
                ratio[f"{item} flash-attn {setting}: speculation tok/s"].append(spec["tok_s"])
            off, on = (found[s]["plain"][item]["tok_s"] for s in ("off", "on"))
            ratio[f"{item} no speculation: flash-attn off / on"].append(off / on)
            off, on = (found[s]["spec"][item]["tok_s"] for s in ("off", "on"))
            ratio[f"{item} speculation: flash-attn off / on"].append(off / on)
    for name, values in ratio.items():
        print(f"{name}: {figure(values)}")


if __name__ == "__main__":
    main()
