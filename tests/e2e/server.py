"""Starts the real `mimoserve serve` in a subprocess on 127.0.0.1 with the real SmolLM2 model.

Only one engine process may run at a time on this 2-core machine (two llama.cpp
processes spin against each other), so each server is stopped before the next starts
and the test process itself never decodes with a model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.services import free_port

TEST_WEIGHTS = "smollm2-135m-instruct"
KEY_PATTERN = re.compile(r"mimo-[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


def models_dir() -> Path:
    # Shared across runs so the weights are pulled once per machine.
    default = Path.home() / ".cache" / "mimoserve" / "models"
    return Path(os.environ.get("MIMOSERVE_TEST_MODELS_DIR", default))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mimoserve.cli", "--models-dir", str(models_dir()), *args]


def pull_test_weights(name: str = TEST_WEIGHTS) -> Path:
    result = subprocess.run(cli("models", "pull", name), capture_output=True, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class RunningServer:
    base_url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    home: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def running_process(
    args: list[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Starts `args` with its output in `log_path`, waits until `ready_url` answers 200,
    and stops the process afterwards."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=None if env is None else {**os.environ, **env})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{args[:3]} exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[:3]} did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(
    home: Path, *extra: str, weights: str = TEST_WEIGHTS, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    port = free_port()
    log_path = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    args = cli("--home", str(home), "serve", "--weights", weights, "--port", str(port), *extra)
    with running_process(args, f"{base_url}/health", log_path, env) as process:
        # Only a start that finds no key at all prints one (a shared database may have some).
        match = KEY_PATTERN.search(log_path.read_text())
        yield RunningServer(base_url, match.group(0) if match else "", process, log_path, home)
