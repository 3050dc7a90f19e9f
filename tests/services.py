"""Real PostgreSQL and Redis servers for the tests, started on 127.0.0.1 in temp folders.

The binaries come from Debian's packages (`.ci/run` installs them when missing).
Without them a test that needs a server is skipped, unless MIMOSERVE_REQUIRE_SERVICES=1
(set by `.ci/run`, so CI fails instead of passing without them).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest


def _missing(what: str) -> None:
    message = f"{what} is not installed (run .ci/run, which installs it)"
    if os.environ.get("MIMOSERVE_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within 30 s")


def _as_postgres_user() -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package creates a `postgres` user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PostgresCluster:
    """A throwaway cluster that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        if initdb is None:
            _missing("PostgreSQL")
        assert initdb is not None
        self._bin = Path(initdb).parent
        # Its own folder under /tmp: pytest's are private to root, which `postgres` cannot enter.
        self.folder = Path(tempfile.mkdtemp(prefix="mimoserve-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._data = self.folder / "data"
        self._run_as = _as_postgres_user()
        subprocess.run(
            [*self._run_as, initdb, "-D", str(self._data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._server: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._server = subprocess.Popen(
            [*self._run_as, str(self._bin / "postgres"), "-D", str(self._data),
             "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.folder}", "-c", "max_connections=200",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_port(self.port, self._server, "postgres")
        deadline = time.monotonic() + 30  # listening comes before accepting sessions
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            # "fast" closes client sessions now; -w returns once the postmaster is gone
            # (signalling `runuser` would return before that, and a restart would fail).
            subprocess.run(
                [*self._run_as, str(self._bin / "pg_ctl"), "stop", "-D", str(self._data),
                 "-m", "fast", "-w"],
                check=True,
                capture_output=True,
            )  # fmt: skip
            self._server.wait(timeout=30)
            self._server = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[PostgresCluster]:
    """A fresh running cluster, deleted afterwards."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("Redis")
    assert binary is not None
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port, server, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def uvicorn_in_thread(
    app: Any, *, lifespan: Literal["auto", "on", "off"] = "auto"
) -> Iterator[str]:
    """Serves an ASGI app on 127.0.0.1 from a thread; yields its base URL. Leaving the
    block shuts it down gracefully (in-flight requests end, lifespan shutdown runs)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan=lifespan))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
