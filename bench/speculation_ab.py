"""Two versions of mimoserve's speculation, paired: this checkout's and another
checkout's `src` (`--other`, e.g. a `git worktree` of an earlier commit), both servers
up and given each request in turn, the order alternating (`speculation.workload`).

    git worktree add /tmp/old <commit>
    .venv/bin/python bench/speculation_ab.py --other /tmp/old/src --passes 3 \\
        "edit weights/store.py t=0.0 +prediction" ...

Prints, per pass and item, each side's decode tok/s (accepted/drafted) and the ratio
this / other. Items are `speculation.items` names; none given: the greedy edits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import speculation
from run import MODELS_DIR, free_port, started

from mimoserve.weights.store import WeightsStore


def one_pass(gguf: Path, other_src: str, only: set[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "this").mkdir()
        (work / "other").mkdir()
        port_a, port_b = free_port(), free_port()
        command_a = speculation.mimoserve_command(gguf, port_a, work / "this", None)
        command_b = speculation.mimoserve_command(gguf, port_b, work / "other", None)
        with (
            started("mimoserve", command_a, port_a, work / "this.log", key_from_log=True) as this,
            started(
                "mimoserve",
                command_b,
                port_b,
                work / "other.log",
                key_from_log=True,
                env={"PYTHONPATH": other_src},
            ) as other,  # fmt: skip
        ):
            ours, theirs = asyncio.run(speculation.workload([this, other], only=only))
    for name in sorted(ours):
        a, b = ours[name], theirs[name]
        ratio = a["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan")
        print(f"{name}: this {a['tok_s']:.1f} ({a['accepted']}/{a['drafted']}) "
              f"other {b['tok_s']:.1f} ({b['accepted']}/{b['drafted']}) ratio {ratio:.2f}",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", required=True, help="the other checkout's src folder")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("items", nargs="*")
    args = parser.parse_args()
    names = {name for name, _, _ in speculation.items(ours=True)[1]}
    only = set(args.items) or {n for n in names if n.startswith("edit") and n.endswith("t=0.0")}
    unknown = only - names
    if unknown:
        parser.error(f"unknown items: {sorted(unknown)}")
    gguf = WeightsStore(MODELS_DIR).resolve(args.model)
    for _ in range(args.passes):
        one_pass(gguf, args.other, only)


if __name__ == "__main__":
    main()
