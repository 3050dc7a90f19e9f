"""Schemathesis against the live server (real app and uvicorn, fake backend): every
documented operation, positive and negative requests, no server error and no answer
outside the served OpenAPI document."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import running_process
from tests.services import free_port

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    home = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "tests.fuzz.fake_server", str(home), str(port)]
    with running_process(args, f"{url}/health", home / "server.log") as process:
        key, token = (home / "server.log").read_text().splitlines()[:2]
        yield url, key, token
        assert process.poll() is None, "the server died under fuzzing"


def schemathesis(url: str, header: str, paths: str, examples: int) -> None:
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json",
        "-H", header, "--checks", CHECKS, "--mode", "all", "-n", str(examples),
        "--include-path-regex", paths, "--seed", "20261129", "--request-timeout", "30",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_chat_route_is_documented(fake_server: tuple[str, str, str]) -> None:
    url, _, _ = fake_server
    document = httpx.get(f"{url}/openapi.json").json()
    operation = document["paths"]["/v1/chat/completions"]["post"]
    schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = document["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert {"model", "messages"} <= set(request["required"])
    assert {"stream", "tools", "response_format", "thinking"} <= set(request["properties"])
    assert {"400", "401", "429", "503"} <= set(operation["responses"])


def test_public_routes_under_schemathesis(fake_server: tuple[str, str, str]) -> None:
    url, key, _ = fake_server
    schemathesis(url, f"api-key: {key}", "^/(v1|anthropic|health|ready|metrics)", 150)
    # Still serving normally afterwards.
    answer = httpx.post(f"{url}/v1/chat/completions", headers={"api-key": key}, json={
        "model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert answer.status_code == 200


def test_admin_routes_under_schemathesis(fake_server: tuple[str, str, str]) -> None:
    url, _, token = fake_server
    schemathesis(url, f"Authorization: Bearer {token}", "^/admin", 40)
