"""What the gateway adds: the same load sent straight to a canned engine, through
mimoserve, and through LiteLLM's proxy, measured in one run on 127.0.0.1.

    .venv/bin/python bench/gateway.py [--duration 5]

Needs `wrk` (Debian: apt-get install wrk) for the non-streaming load; installs
LiteLLM's proxy (`litellm[proxy]`) into ~/.cache/mimoserve/bench/litellm-venv on first
use. Every server runs one worker. Non-streaming: wrk at concurrency 1, 8 and 32
(latency p50/p99 and requests/s). Streaming: an asyncio client with one keep-alive
connection per concurrent stream (as SDKs keep them) that times the first `data:` line
(time to first byte). "added" is the target's figure minus the direct one, from the same run.
Writes bench/GATEWAY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from peers import CACHE
from run import Server, free_port, started

BODY = '{"model":"mimo-v2-flash","messages":[{"role":"user","content":"Hi"}]}'
STREAM_BODY = BODY[:-1] + ',"stream":true}'
CONCURRENCY = (1, 8, 32)
HERE = Path(__file__).parent
# LiteLLM refuses to start without a master key; with one (and no database) it checks
# each request's key against it, as mimoserve checks its keys against SQLite.
LITELLM_KEY = "sk-" + "0123456789abcdef" * 4


@dataclass
class Figures:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0


def litellm_binary() -> Path:
    venv = CACHE / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


# ---- non-streaming: wrk ------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match[2]]


def wrk(server: Server, concurrency: int, duration: int, workdir: Path) -> Figures:
    script = workdir / "post.lua"
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in server.headers.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{BODY}\'\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n{headers}')  # fmt: skip
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "--latency",
         "-s", str(script), f"{server.base_url}/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert p50 and p99 and rps, out
    print(out if "--verbose" in sys.argv else "", end="")
    return Figures(float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)),
                   int(errors.group(1)) if errors else 0)  # fmt: skip


# ---- streaming: time to first byte ---------------------------------------------------------


class _Connection:
    """One keep-alive HTTP/1.1 connection, as SDK clients keep them: requests go out one
    after another, and an answer ends with `[DONE]` and the last (empty) chunk."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def stream(self, request: bytes) -> tuple[float, bool]:
        start = time.perf_counter()
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(request)
        first: float | None = None
        seen = b""
        while not (b"[DONE]" in seen and seen.endswith(b"0\r\n\r\n")):
            chunk = await reader.read(65536)
            if not chunk:  # the server closed the connection: open a new one next time
                writer.close()
                self.streams = None
                break
            seen += chunk
            if first is None and b"data:" in seen:
                first = time.perf_counter() - start
        ok = b" 200 " in seen[:20] and b"[DONE]" in seen
        return (first if first is not None else time.perf_counter() - start), ok


async def _streams(server: Server, concurrency: int, duration: float) -> Figures:
    host, port = server.base_url.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in server.headers.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(STREAM_BODY)}\r\n"
               f"{extra}\r\n{STREAM_BODY}").encode()  # fmt: skip
    ttfb: list[float] = []
    errors = 0
    until = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        connection = _Connection(host, int(port))
        while time.perf_counter() < until:
            first, ok = await connection.stream(request)
            ttfb.append(first)
            errors += not ok

    started_at = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started_at
    ttfb.sort()
    return Figures(len(ttfb) / elapsed, ttfb[len(ttfb) // 2] * 1000,
                   ttfb[min(len(ttfb) - 1, int(len(ttfb) * 0.99))] * 1000, errors)  # fmt: skip


# ---- the three targets ---------------------------------------------------------------------


@contextmanager
def targets(workdir: Path) -> Iterator[dict[str, Server]]:
    upstream_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    registry = workdir / "registry.toml"
    registry.write_text(f'[models.mimo-v2-flash]\nbackend = "upstream"\n'
                        f'[[models.mimo-v2-flash.upstreams]]\nurl = "{upstream_url}"\n'
                        f'kind = "vllm"\nmodel = "canned"\n')  # fmt: skip
    config = workdir / "litellm.yaml"
    config.write_text(f"model_list:\n  - model_name: mimo-v2-flash\n    litellm_params:\n"
                      f"      model: openai/canned\n      api_base: {upstream_url}\n"
                      f"      api_key: none\n")  # fmt: skip
    with ExitStack() as stack:
        direct = stack.enter_context(started(
            "canned engine", [sys.executable, str(HERE / "canned_upstream.py"), str(upstream_port)],
            upstream_port, workdir / "upstream.log", probe="/v1/models"))  # fmt: skip
        gateway = stack.enter_context(started(
            "mimoserve", [sys.executable, "-m", "mimoserve.cli", "--home", str(workdir / "home"),
                          "serve", "--registry-file", str(registry), "--port", str(gateway_port)],
            gateway_port, workdir / "mimoserve.log", key_from_log=True))  # fmt: skip
        litellm = stack.enter_context(started(
            "litellm", [str(litellm_binary()), "--config", str(config), "--host", "127.0.0.1",
                        "--port", str(litellm_port), "--num_workers", "1"],
            litellm_port, workdir / "litellm.log", probe="/health/liveliness",
            env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                 "LITELLM_MASTER_KEY": LITELLM_KEY}))  # fmt: skip
        litellm.headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
        yield {"direct": direct,
               "mimoserve": gateway, "litellm": litellm}  # fmt: skip


def _row(mode: str, c: int, name: str, f: Figures, base: Figures) -> str:
    added = (f"{f.p50_ms - base.p50_ms:+.2f}", f"{f.p99_ms - base.p99_ms:+.2f}")
    if name == "direct":
        added = ("", "")
    return (f"| {mode} | {c} | {name} | {f.rps:,.0f} | {f.p50_ms:.2f} | {f.p99_ms:.2f} | "
            f"{added[0]} | {added[1]} | {f.errors} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/gateway.py needs wrk: apt-get install wrk")
    rows = ["| load | concurrency | target | requests/s | p50 ms | p99 ms | added p50 ms | "
            "added p99 ms | errors |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, targets(Path(tmp)) as servers:
        for c in CONCURRENCY:
            base = None
            for name, server in servers.items():
                figures = wrk(server, c, args.duration, Path(tmp))
                base = base or figures
                rows.append(_row("non-stream", c, name, figures, base))
                print(rows[-1], flush=True)
        for c in CONCURRENCY:
            base = None
            for name, server in servers.items():
                figures = asyncio.run(_streams(server, c, args.duration))
                base = base or figures
                rows.append(_row("stream (time to first byte)", c, name, figures, base))
                print(rows[-1], flush=True)
    table = "\n".join(rows)
    (HERE / "GATEWAY.md").write_text(
        "# Gateway overhead\n\n`.venv/bin/python bench/gateway.py`\n\n"
        "One worker each; a canned engine on 127.0.0.1; 2-core shared machine.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
