"""Peers the benchmarks measure against, built and started by the benchmark itself.

- llama.cpp's `llama-server`, compiled with cmake from the llama.cpp sources vendored in
  the pinned llama-cpp-python sdist (the same engine code our wheel runs), cached in
  ~/.cache/mimoserve/bench. Benchmark tooling only: not part of the package or CI.
- llama-cpp-python's own server (`python -m llama_cpp.server`), from the same wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(
    os.environ.get("MIMOSERVE_BENCH_CACHE", Path.home() / ".cache" / "mimoserve" / "bench")
)


def _sdist_source() -> Path:
    source = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if (source / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return source
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--dest", str(CACHE), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        check=True,
    )  # fmt: skip
    with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(CACHE, filter="data")
    return source


def llama_server_binary() -> Path:
    """Builds llama-server once (about 10 minutes on 2 cores) and returns its path."""
    build = CACHE / "llama-server-build"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    source = _sdist_source() / "vendor" / "llama.cpp"
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is needed to build llama-server")
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=ON"],
        check=True,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True
    )
    return binary


if __name__ == "__main__":
    print(llama_server_binary())
