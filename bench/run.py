"""Benchmarks mimoserve against its peers on the same GGUF, prompts and sampling, on 127.0.0.1.

    .venv/bin/python bench/run.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]

Peers (started here, one server at a time: two llama.cpp processes on 2 cores slow
each other ~40x): llama.cpp's `llama-server` built from the pinned sdist's sources, with
--parallel equal to our slot count and continuous batching; llama-cpp-python's own
server. Prints one table per model with ratios, and writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from load import LoadResult, run_load
from peers import llama_server_binary

from mimoserve.weights.catalog import CATALOG
from mimoserve.weights.store import WeightsStore

SLOTS = 8
N_CTX = 2048  # per sequence
MAX_TOKENS = 128
LOADS = (1, 4, 8, 16)
THREADS = str(os.cpu_count() or 2)
PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a big city.",
    "Write a long letter to a friend about your travels.",
]
MODELS_DIR = Path.home() / ".cache" / "mimoserve" / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


@dataclass
class Server:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    headers: dict[str, str] = field(default_factory=dict)


@contextmanager
def started(
    name: str, command: list[str], port: int, log: Path, key_from_log: bool = False,
    probe: str | None = None, env: dict[str, str] | None = None,
) -> Iterator[Server]:  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=None if env is None else {**os.environ, **env})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{log.read_text()[-3000:]}")
            try:
                path = probe or ("/health" if name != "llama-cpp-python" else "/v1/models")
                if httpx.get(base + path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.3)
        headers = {}
        if key_from_log:
            key = re.search(r"mimo-[0-9a-f]{12}_[A-Za-z0-9_-]{43}", log.read_text())
            assert key
            headers = {"api-key": key.group(0)}
        yield Server(name, base, process, headers)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def mimoserve_command(gguf: Path, port: int, home: Path) -> list[str]:
    return [sys.executable, "-m", "mimoserve.cli", "--home", str(home), "serve",
            "--weights", str(gguf), "--port", str(port), "--n-parallel", str(SLOTS),
            "--n-ctx", str(N_CTX), "--max-queue", "64"]  # fmt: skip


def llama_server_command(gguf: Path, port: int) -> list[str]:
    return [str(llama_server_binary()), "-m", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--parallel", str(SLOTS), "-c", str(N_CTX * SLOTS),
            "--kv-unified", "-cb", "-t", THREADS, "-b", "512", "-ub", "512",
            "--jinja", "--no-webui"]  # fmt: skip


def llama_cpp_python_command(gguf: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX),
            "--n_threads", THREADS]  # fmt: skip


@dataclass
class PeerRun:
    loads: dict[int, LoadResult] = field(default_factory=dict)
    rss_at_8: float = float("nan")
    prefix_cold: float = float("nan")
    prefix_warm: float = float("nan")


async def _ttft(server: Server, content: str) -> float:
    from load import chat_body, one_stream

    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=600, headers=server.headers
    ) as client:
        body = chat_body(content, 4, seed=0, model="mimo-v2-flash")
        result = await one_stream(client, body)
    return result.ttft if result.ttft is not None else float("nan")


def measure(server: Server, model: str) -> PeerRun:
    run = PeerRun()
    prefix = "Background notes for the assistant. " + " ".join(
        f"Fact {i}: the value of item {i} is {i * 7 % 13}." for i in range(90)
    )
    run.prefix_cold = asyncio.run(_ttft(server, prefix + "\nQuestion: what is item 3?"))
    run.prefix_warm = asyncio.run(_ttft(server, prefix + "\nQuestion: what is item 5?"))
    for concurrency in LOADS:
        run.loads[concurrency] = asyncio.run(
            run_load(server.base_url, concurrency, PROMPTS, MAX_TOKENS, model, server.headers)
        )
        if concurrency == 8:
            run.rss_at_8 = peak_rss_mb(server.process.pid)
    return run


def run_model(name: str, workdir: Path) -> dict[str, PeerRun]:
    gguf = WeightsStore(MODELS_DIR).resolve(name)
    results: dict[str, PeerRun] = {}
    peers: list[tuple[str, Callable[[int], list[str]], bool]] = [
        ("mimoserve", lambda p: mimoserve_command(gguf, p, workdir / "home"), True),
        ("llama-server", lambda p: llama_server_command(gguf, p), False),
        ("llama-cpp-python", lambda p: llama_cpp_python_command(gguf, p), False),
    ]
    for peer, command, keyed in peers:
        port = free_port()
        print(f"  {name}: {peer} ...", flush=True)
        with started(peer, command(port), port, workdir / f"{peer}.log", keyed) as server:
            results[peer] = measure(server, "mimo-v2-flash")
    return results


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def table(name: str, results: dict[str, PeerRun], single: dict[str, float] | None) -> str:
    lines = [f"### {name}", "",
             "| server | streams | completed | tok/s | TTFT p50 s | TTFT p95 s | ITL p50 ms | ITL p95 ms |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for peer, run in results.items():
        for concurrency, load in run.loads.items():
            lines.append(
                f"| {peer} | {concurrency} | {load.completed}/{concurrency} | {_fmt(load.tokens_per_s, 1)} "
                f"| {_fmt(load.ttft(0.5))} | {_fmt(load.ttft(0.95))} | {_fmt(load.itl(0.5) * 1000, 1)} "
                f"| {_fmt(load.itl(0.95) * 1000, 1)} |"
            )
    ours, theirs = results["mimoserve"], results["llama-server"]
    o8, p8 = ours.loads[8], theirs.loads[8]
    lines += ["", "| ratio (target) | value |", "|---|---|",
              f"| 8 streams tok/s, mimoserve / llama-server (>= 1.0) | {_fmt(o8.tokens_per_s / p8.tokens_per_s)} |",
              f"| 8 streams TTFT p95, mimoserve / llama-server (<= 1.0) | {_fmt(o8.ttft(0.95) / p8.ttft(0.95))} |",
              f"| 8 streams completed, mimoserve | {o8.completed}/8 (llama-cpp-python: {results['llama-cpp-python'].loads[8].completed}/8) |",
              f"| peak RSS at 8 streams, mimoserve / llama-server (<= 1.2) | {_fmt(ours.rss_at_8 / theirs.rss_at_8)} ({_fmt(ours.rss_at_8, 0)} MB vs {_fmt(theirs.rss_at_8, 0)} MB) |",
              f"| prefix reuse: cold TTFT / warm TTFT, mimoserve (>= 5) | {_fmt(ours.prefix_cold / ours.prefix_warm, 1)} ({_fmt(ours.prefix_cold)} s vs {_fmt(ours.prefix_warm)} s; llama-server {_fmt(theirs.prefix_cold / theirs.prefix_warm, 1)}) |"]  # fmt: skip
    if single:
        lines.append(
            f"| single stream decode, mimoserve engine / plain llama.cpp loop (>= 0.95) | "
            f"{_fmt(single['engine'] / single['plain'])} ({_fmt(single['engine'], 1)} vs {_fmt(single['plain'], 1)} tok/s) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"],
                        choices=sorted(CATALOG))  # fmt: skip
    parser.add_argument("--skip-single", action="store_true")
    args = parser.parse_args()
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "llama-cpp-python[server]==0.3.36"], check=True
        )
    llama_server_binary()
    report = [f"Machine: {os.cpu_count()} cores, {THREADS} threads; {SLOTS} slots, n_ctx {N_CTX} per sequence, "
              f"{MAX_TOKENS} completion tokens per stream (ignore_eos), temperature 0.8, top_p 0.95, top_k 40, min_p 0.05.", ""]  # fmt: skip
    for name in args.models:
        with tempfile.TemporaryDirectory() as work:
            results = run_model(name, Path(work))
        single = None
        if not args.skip_single:
            out = subprocess.run([sys.executable, str(Path(__file__).parent / "single_stream.py"), name],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            single = {k: float(v) for k, v in (line.split("=") for line in out.stdout.split())}
        section = table(name, results, single)
        print(section, flush=True)
        report.append(section)
    (Path(__file__).parent / "RESULTS.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
