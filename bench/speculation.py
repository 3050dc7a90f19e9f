"""Speculative decoding: decode speed with guesses against without, and against llama-server
with its n-gram speculation, same GGUF, same threads, one server at a time.

    .venv/bin/python bench/speculation.py [--model qwen2.5-coder-0.5b-instruct] [--runs 3]

Workloads (greedy unless said; decode tok/s = completion tokens after the first / time
from the first streamed token to the last, so prompt reading is left out):
- code edit: each of three 190-230-line source files of this repository (`FILES`) in the
  prompt, asked back whole with one rename (answers capped at 1,400 tokens), greedy and
  at temperature 0.7 (seed 7); the rows "edit (all files)" pool them (all tokens over
  all decode time);
- the same with `prediction` set to the original file (mimoserve only: llama-server has
  no such field; its figure stays the one without);
- the ceiling: the same with `prediction` set to the greedy answer itself, as this server
  just wrote it (mimoserve only): every guess is right, so the steps are as long as the
  guess limit allows and the figure is what any guessing could reach on this engine;
- agent replay: the recorded Codex (Responses) first request, the answer capped at 400
  tokens, timed from sending to the last event with the prompt already cached
  (mimoserve only: llama-server does not speak that door; Claude Code's first request,
  18,700 tokens here, would take ~7 minutes to read per server and run);
- no repetition: an essay from a one-line prompt (400 tokens), one stream and 8 at once
  (aggregate tok/s).
Servers: mimoserve with speculation (default flags) and with `--spec-max-draft 0`, both up
together and given each request in turn (the order alternating), so the shared
machine's slow spells fall on both; then llama-server with `--spec-type ngram-mod` at
its defaults (the issue's best) and with the best settings `--peers` found (ngram-mod
guessing 16-63 and 16-127 tokens), alone. Each run starts every server afresh;
prompts are read once per server before timing.
Prints each run's table, then the medians and ranges over the runs.

    .venv/bin/python bench/speculation.py --peers [--runs 3]

times the code edit alone on llama-server with each n-gram setting in `PEER_SETTINGS`.

    .venv/bin/python bench/speculation.py --agents [--runs 3]

times the recorded agent requests alone, Claude Code's first request too (mimoserve only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
# Files of this repository asked back with one rename each (the issue asks for several
# 150-300-line files); their answers are capped at 1,400 tokens.
FILES = {"weights/store.py": ("WeightsError", "WeightsProblem"),
         "billing/budgets.py": ("Scope", "BudgetScope"),
         "limits/limiter.py": ("RateLimitedError", "RateLimitExceeded")}  # fmt: skip
FIXTURES = ROOT / "tests" / "api" / "fixtures"
# The ceiling's items: the prediction is the answer itself.
ANSWERED = "+answer"
ESSAY = "Write a long essay about the history of the printing press in Europe."
TIMEOUT = httpx.Timeout(1800)
# llama-server's n-gram settings tried for the peer (`--peers`): ngram-mod at its
# defaults (48-64 guessed tokens), held to 63 guessed tokens so its steps fill
# llama.cpp's 64-row attention tile as ours do, and with a lower minimum too; and
# ngram-simple. (One run each of ngram-map-k and ngram-cache, 2026-12-06: 99.2 and
# 57.5 tok/s greedy against ngram-mod's 103.4; left out of the sweep.)
PEER_SETTINGS: dict[str, list[str]] = {
    "ngram-mod": ["ngram-mod"],
    "ngram-mod n-max 63": ["ngram-mod", "--spec-ngram-mod-n-max", "63"],
    "ngram-mod n-min 16 n-max 63": ["ngram-mod", "--spec-ngram-mod-n-min", "16",
                                    "--spec-ngram-mod-n-max", "63"],
    "ngram-mod n-min 16 n-max 127": ["ngram-mod", "--spec-ngram-mod-n-min", "16",
                                     "--spec-ngram-mod-n-max", "127"],
    "ngram-simple": ["ngram-simple"],
}


# The peers: llama-server with ngram-mod at its defaults (the best), and with the
# best settings the sweeps found (`--peers`; bench/speculation-peers-2026-12-06.txt):
# guessing 16-63 tokens (its steps fill llama.cpp's 64-row attention tile), and 16-127
# (two tiles, as ours since the limit went to 127).
PEERS = {"llama-server ngram-mod": PEER_SETTINGS["ngram-mod"],
         "llama-server ngram-mod 16-63": PEER_SETTINGS["ngram-mod n-min 16 n-max 63"],
         "llama-server ngram-mod 16-127": PEER_SETTINGS["ngram-mod n-min 16 n-max 127"]}  # fmt: skip


def edit_prompt(path: str) -> tuple[str, str]:
    source = (ROOT / "src" / "mimoserve" / path).read_text()
    old, new = FILES[path]
    prompt = (f"Here is a Python file:\n\n```python\n{source}```\n\nRename every occurrence of "
              f"`{old}` to `{new}`. Return the whole file, changed, in one code block, and "
              "nothing else.")  # fmt: skip
    return prompt, f"```python\n{source}```"


def chat_body(prompt: str, max_tokens: int, temperature: float, **extra: Any) -> dict[str, Any]:
    return {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": temperature, "seed": 7, "stream": True,
            "stream_options": {"include_usage": True}, **extra}  # fmt: skip


async def _spec_counts(client: httpx.AsyncClient, server: Server) -> tuple[float, float]:
    """mimoserve's drafted and accepted token counters (all models summed)."""
    page = (await client.get(server.base_url + "/metrics")).text
    drafted = accepted = 0.0
    for line in page.splitlines():
        if line.startswith("mimoserve:spec_draft_tokens_total"):
            drafted += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mimoserve:spec_accepted_tokens_total"):
            accepted += float(line.rsplit(" ", 1)[1])
    return drafted, accepted


async def timed(client: httpx.AsyncClient, server: Server, path: str, body: dict[str, Any],
                text: list[str] | None = None) -> dict[str, float]:  # fmt: skip
    """Streams one request: completion tokens, decode tok/s, and drafted/accepted counts
    (llama-server's timings; mimoserve's counters around the request). `text`: gets the
    answer's content deltas (chat completions)."""
    ours = bool(server.headers)
    before = await _spec_counts(client, server) if ours else (0.0, 0.0)
    sent = time.perf_counter()
    first = last = 0.0
    tokens, drafted, accepted = 0, 0, 0
    async with client.stream("POST", server.base_url + path, json=body,
                             headers=server.headers) as response:  # fmt: skip
        assert response.status_code == 200, (await response.aread())[:500]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if text is not None:
                text.extend((c.get("delta") or {}).get("content") or ""
                            for c in event.get("choices") or [])  # fmt: skip
            if _carries_output(event):
                first = first or now
                last = now
            tokens = max(tokens, _output_tokens(event))
            if timings := event.get("timings"):  # llama-server's own counts
                drafted = timings.get("draft_n", drafted)
                accepted = timings.get("draft_n_accepted", accepted)
    if ours:
        after = await _spec_counts(client, server)
        drafted, accepted = int(after[0] - before[0]), int(after[1] - before[1])
    if path != "/v1/chat/completions":
        # The agent doors may hold text back (a possible tool call) and send it late; their
        # prompts are cached by then, so the whole request's time is the decode time.
        first = sent
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"tokens": tokens, "tok_s": rate, "drafted": drafted, "accepted": accepted}


def _prompt_of(body: dict[str, Any]) -> str:
    """What a request's prompt is read from (chat and Messages: messages; Responses: input)."""
    return json.dumps([body.get("system"), body.get("messages"), body.get("input")])


def _carries_output(event: dict[str, Any]) -> bool:
    kind = event.get("type", "")
    if "delta" in kind:  # Anthropic and Responses doors
        return True
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
            return True
    return False


def _output_tokens(event: dict[str, Any]) -> int:
    usage = event.get("usage") or (event.get("response") or {}).get("usage") or {}
    return int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)


Item = tuple[str, str, dict[str, Any]]  # name, path, body


def items(ours: bool, claude: bool = False) -> tuple[list[Item], list[Item]]:
    """(requests that read prompts once, timed requests), in order; `claude`: Claude
    Code's recorded first request too."""
    reads: list[Item] = []
    timed_items: list[Item] = []
    for path in FILES:
        prompt, original = edit_prompt(path)
        reads.append(("read", "/v1/chat/completions", chat_body(prompt, 8, 0)))
        for temperature in (0.0, 0.7):
            name = f"edit {path} t={temperature}"
            timed_items.append((name, "/v1/chat/completions", chat_body(prompt, 1400, temperature)))
            if ours and temperature == 0:
                prediction = {"type": "content", "content": original}
                body = chat_body(prompt, 1400, temperature, prediction=prediction)
                timed_items.append((f"{name} +prediction", "/v1/chat/completions", body))
                # (`workload` sets the prediction: the answer the server gave to `name`.)
                body = chat_body(prompt, 1400, temperature)
                timed_items.append((f"{name} {ANSWERED}", "/v1/chat/completions", body))
    if ours:
        # Claude Code's first request only with `--agents`: 18,700 tokens for this
        # tokenizer, about 3 minutes to read on this machine, per server and run.
        agents = [("/v1/responses", "codex_request.json")]
        if claude:
            agents.append(("/v1/messages", "claude_code_request.json"))
        for door, fixture in agents:
            body = json.loads((FIXTURES / fixture).read_text())
            cap = "max_tokens" if door == "/v1/messages" else "max_output_tokens"
            body.update({cap: 400, "temperature": 0, "stream": True})
            body.pop("thinking", None)
            body.pop("reasoning", None)
            reads.append(("read", door, {**body, cap: 8}))
            timed_items.append((f"agent {fixture.split('_')[0]}", door, body))
            # The same request again: the next session of the same client starts alike.
            timed_items.append((f"agent {fixture.split('_')[0]} again", door, body))
    timed_items.append(("essay", "/v1/chat/completions", chat_body(ESSAY, 400, 0)))
    return reads, timed_items


async def eight_streams(client: httpx.AsyncClient, server: Server) -> dict[str, float]:
    began = time.perf_counter()
    streams = await asyncio.gather(*(
        timed(client, server, "/v1/chat/completions", chat_body(f"{ESSAY} ({i})", 200, 0))
        for i in range(8)
    ))  # fmt: skip
    total = sum(s["tokens"] for s in streams)
    return {"tokens": total, "tok_s": total / (time.perf_counter() - began),
            "drafted": sum(s["drafted"] for s in streams) / 8,
            "accepted": sum(s["accepted"] for s in streams) / 8}  # fmt: skip


async def workload(
    servers: list[Server], only: set[str] | None = None, claude: bool = False
) -> list[dict[str, dict[str, float]]]:
    """Every item on each server in turn (the order alternating from item to item), so a
    slow spell of the shared machine falls on both sides of a comparison. `only`: the
    items to run (names), prompts read for those alone."""
    reads, timed_items = items(ours=bool(servers[0].headers), claude=claude)
    timed_items = [*timed_items, ("8 streams", "", {})]
    if only is not None:
        timed_items = [item for item in timed_items if item[0] in only]
        wanted = {_prompt_of(body) for _, _, body in timed_items if body}
        reads = [r for r in reads if _prompt_of(r[2]) in wanted]
    results: list[dict[str, dict[str, float]]] = [{} for _ in servers]
    answers: dict[tuple[int, str], list[str]] = defaultdict(list)  # (server, item): text
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for server in servers:
            # (Not for llama-server: a speculating slot given a request after a short one
            # on the same prompt exits; its decode rate leaves prompt reading out anyway.)
            for _, path, body in reads if server.headers else []:
                await timed(client, server, path, body)
        for turn, (name, path, body) in enumerate(timed_items):
            order = list(enumerate(servers))
            if turn % 2:
                order.reverse()
            for index, server in order:
                if name == "8 streams":
                    results[index][name] = await eight_streams(client, server)
                elif name.endswith(ANSWERED):
                    base = name.removesuffix(f" {ANSWERED}")
                    answer = "".join(answers[index, base])
                    assert answer, f"{name} needs {base} run before it"
                    prediction = {"type": "content", "content": answer}
                    results[index][name] = await timed(client, server, path,
                                                       {**body, "prediction": prediction})  # fmt: skip
                else:
                    results[index][name] = await timed(client, server, path, body,
                                                       answers[index, name])  # fmt: skip
    return results


def mimoserve_command(gguf: Path, port: int, home: Path, draft: int | None,
                      n_ctx: int = 16384) -> list[str]:  # fmt: skip
    command = [sys.executable, "-m", "mimoserve.cli", "--home", str(home), "serve",
               "--weights", str(gguf), "--port", str(port), "--n-threads", THREADS,
               "--n-parallel", "8", "--n-ctx", str(n_ctx)]  # fmt: skip
    return command + ([] if draft is None else ["--spec-max-draft", str(draft)])


def llama_server_command(gguf: Path, port: int, spec: str, *extra: str) -> list[str]:
    return [str(llama_server_binary()), "-m", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--parallel", "8", "-c", str(8 * 16384), "--kv-unified",
            "-t", THREADS, "--jinja", "--no-webui", "--spec-type", spec, *extra]  # fmt: skip


def peer_sweep(gguf: Path, runs: int) -> None:
    """The code edit (greedy and t=0.7) on llama-server with each setting, a fresh server
    per item, `runs` times in turn: which setting is the peer's best."""
    names = {name for name, _, _ in items(ours=False)[1] if name.startswith("edit")}
    found: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            for setting, args in PEER_SETTINGS.items():
                for name in sorted(names):
                    port = free_port()
                    command = llama_server_command(gguf, port, *args)
                    with started("llama-server", command, port, Path(tmp) / "peer.log") as server:
                        [part] = asyncio.run(workload([server], {name}))
                    found[setting][name].append(part[name]["tok_s"])
                    print(json.dumps({setting: {name: part[name]}}), flush=True)
    for setting, by_name in found.items():
        for name, values in sorted(by_name.items()):
            print(f"llama-server {setting} {name}: {statistics.median(values):.1f} "
                  f"[{min(values):.1f}-{max(values):.1f}] tok/s")  # fmt: skip


def one_run(gguf: Path, work: Path, draft: int | None = None, peers: bool = True,
            agents: bool = False) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Both mimoserve configurations up together (only one decodes at a time; `draft`:
    the speculating one's guess limit, its default when None), then llama-server, a
    fresh one per item (unless `peers` is off). `agents`: the recorded agent requests
    alone (Codex's and Claude Code's), mimoserve alone."""
    only = None
    if agents:
        only = {name for name, _, _ in items(ours=True, claude=True)[1] if name.startswith("agent")}
        peers = False
    table: dict[str, dict[str, dict[str, float]]] = {}
    spec_port, plain_port = free_port(), free_port()
    n_ctx = 32768 if agents else 16384  # Claude Code's request is 18,700 tokens
    with (
        started("mimoserve", mimoserve_command(gguf, spec_port, work / "spec", draft, n_ctx),
                spec_port, work / "spec.log", key_from_log=True) as spec,
        started("mimoserve", mimoserve_command(gguf, plain_port, work / "plain", 0, n_ctx),
                plain_port, work / "plain.log", key_from_log=True) as plain,
    ):  # fmt: skip
        table["mimoserve"], table["mimoserve no-spec"] = asyncio.run(
            workload([spec, plain], only, claude=agents)
        )
    # llama-server (pinned build) with n-gram speculation exits without a word on some
    # request that follows another (seen after a different prompt, and after a short
    # one): every item gets a fresh server.
    groups = [{name} for name, _, _ in items(ours=False)[1]] + [{"8 streams"}]
    print(json.dumps({"mimoserve": table["mimoserve"],
                      "mimoserve no-spec": table["mimoserve no-spec"]}), flush=True)  # fmt: skip
    for peer, args in PEERS.items() if peers else ():
        figures: dict[str, dict[str, float]] = {}
        for group in groups:
            port = free_port()
            command = llama_server_command(gguf, port, *args)
            with started("llama-server", command, port, work / "peer.log") as server:
                [part] = asyncio.run(workload([server], group))
            figures.update(part)
        table[peer] = figures
    print(json.dumps(table), flush=True)
    return table


def pooled_edits(side: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """A side's items with, per edit kind (temperature, prediction), one more item for
    all files together: every token over every second of decoding."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name, figures in side.items():
        for path in FILES:
            if name.startswith(f"edit {path} "):
                groups[name.replace(f"edit {path} ", "edit (all files) ")].append(figures)
    pooled = dict(side)
    for name, parts in groups.items():
        timed = [p for p in parts if p["tok_s"] > 0]
        decoded = sum(p["tokens"] - 1 for p in timed)  # tok_s leaves the first token out
        seconds = sum((p["tokens"] - 1) / p["tok_s"] for p in timed)
        pooled[name] = {"tokens": sum(p["tokens"] for p in parts),
                        "tok_s": decoded / seconds if seconds else 0.0,
                        "drafted": sum(p.get("drafted", 0) for p in parts),
                        "accepted": sum(p.get("accepted", 0) for p in parts)}  # fmt: skip
    return pooled


def report(runs: list[dict[str, dict[str, dict[str, float]]]]) -> None:
    runs = [{side: pooled_edits(figures) for side, figures in run.items()} for run in runs]

    def figure(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    rows: dict[str, list[str]] = defaultdict(list)
    base = "mimoserve no-spec"
    for work in runs[0]["mimoserve"]:
        ours = [r["mimoserve"][work]["tok_s"] for r in runs]
        plain_name = work.split(" +")[0]  # (prediction and answer: against the plain edit)
        plain = [r[base][plain_name]["tok_s"] for r in runs]
        kept = [r["mimoserve"][work] for r in runs]
        rate = [k["accepted"] / k["drafted"] for k in kept if k.get("drafted")]
        cells = [
            f"{statistics.median(ours):.1f}",
            figure([o / p for o, p in zip(ours, plain, strict=True)]),
        ]
        for peer in PEERS:
            theirs = [r.get(peer, {}).get(plain_name, {}).get("tok_s", 0.0) for r in runs]
            cells.append(
                figure([o / t for o, t in zip(ours, theirs, strict=True)]) if all(theirs) else "-"
            )
        cells.append(f"{statistics.median(rate):.0%}" if rate else "-")
        rows[work] = cells
    peers = " | ".join(f"/ {peer}" for peer in PEERS)
    print(f"| workload | mimoserve tok/s | / no speculation | {peers} | guesses kept |")
    print("|---|---|---|" + "---|" * len(PEERS) + "---|")
    for work, cells in rows.items():
        print(f"| {work} | " + " | ".join(cells) + " |")
    for peer in PEERS:
        for work in runs[0].get(peer, {}):
            values = [r[peer][work]["tok_s"] for r in runs]
            print(f"{peer} {work}: {figure(values)} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peers", action="store_true",
                        help="only the code edit on llama-server with each n-gram setting")
    parser.add_argument("--draft", type=int, default=None,
                        help="the speculating server's --spec-max-draft (its default if unset); "
                        "llama-server is then left out")
    parser.add_argument("--agents", action="store_true",
                        help="only the recorded agent requests, Claude Code's first one too "
                        "(18,700 tokens: ~3 minutes to read per server and run)")
    args = parser.parse_args()
    gguf = WeightsStore(MODELS_DIR).resolve(args.model)
    if args.peers:
        peer_sweep(gguf, args.runs)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            work = Path(tmp) / f"run{run}"  # fresh homes: a new server prints a new key
            work.mkdir()
            runs.append(one_run(gguf, work, args.draft, peers=args.draft is None,
                                agents=args.agents))  # fmt: skip
            Path("bench-speculation-runs.json").write_text(json.dumps(runs))
    report(runs)


if __name__ == "__main__":
    main()
