"""A hostile key holder against the real engine (SmolLM2 in a server subprocess), beside
an honest client: the attacks that involve the engine (a constraint that would freeze
it, a budget attacked with every choice and no cap) must not stall the honest stream
or overspend. The attacks that need no engine are in tests/api/test_hostile_tenants.py.

The latency bound below is the one the platform states for an honest stream while
another key attacks (`MAX_GAP_S`): generous for a shared 2-core machine, far below what
the attack cost before (27 s to minutes for one token, the whole engine stopped)."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mimoserve.store.sqlite import SqliteDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.e2e.server import KEY_PATTERN, RunningServer, cli, running_server
from tests.waiting import until_sync

MAX_GAP_S = 10.0
BUDGET = 2000
# Nested possibly-empty repetitions: each constrained token used to cost seconds to
# minutes inside llama.cpp's grammar engine, on the one scheduler thread.
FREEZING = {"type": "object", "properties": {"x": {"type": "string",
            "pattern": "^(((a){0,30}){0,30}){0,30}$"}}, "required": ["x"]}  # fmt: skip
USER = [{"role": "user", "content": "Write the letter a many times."}]


@dataclass
class Tenants:
    server: RunningServer
    attacker: str
    honest: str
    home: Path


def _cli(home: Path, *args: str) -> str:
    return subprocess.run(cli("--home", str(home), *args), capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def _new_key(home: Path, name: str) -> str:
    match = KEY_PATTERN.search(_cli(home, "keys", "create", "--name", name))
    assert match is not None
    return match.group(0)


@pytest.fixture(scope="module")
def tenants(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    home = tmp_path_factory.mktemp("hostile")
    attacker, honest = _new_key(home, "attacker"), _new_key(home, "honest")
    key_id = attacker.split("_")[0].removeprefix("mimo-")
    _cli(home, "budgets", "set", "--key", key_id, "--tokens", str(BUDGET), "--period", "none")
    with running_server(home, "--n-ctx", "2048", "--n-parallel", "4") as server:
        yield Tenants(server, attacker, honest, home)


def _honest_stream(
    base_url: str, key: str, arrivals: list[float], started: threading.Event
) -> None:
    body = {"model": "mimo-v2-flash", "messages": USER, "stream": True, "max_tokens": 120,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.Client(base_url=base_url, headers={"api-key": key}, timeout=300) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as response:  # fmt: skip
        for line in response.iter_lines():
            if '"content"' in line:
                arrivals.append(time.monotonic())
                started.set()


ATTACKS: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions",
     {"model": "mimo-v2-flash", "messages": USER, "max_tokens": 8,
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": FREEZING}}},
     "response_format"),
    ("/anthropic/v1/messages",
     {"model": "mimo-v2-flash", "max_tokens": 8, "messages": USER,
      "tools": [{"name": "f", "input_schema": FREEZING}], "tool_choice": {"type": "any"}},
     "tools"),
    ("/v1/responses",
     {"model": "mimo-v2-flash", "input": "Write a.", "max_output_tokens": 16,
      "text": {"format": {"type": "json_schema", "name": "x", "schema": FREEZING}}},
     "text"),
]  # fmt: skip


def test_a_freezing_pattern_is_refused_on_every_door_while_an_honest_stream_flows(
    tenants: Tenants,
) -> None:
    arrivals: list[float] = []
    started = threading.Event()
    honest = threading.Thread(target=_honest_stream, args=(tenants.server.base_url,
                              tenants.honest, arrivals, started))  # fmt: skip
    honest.start()
    assert started.wait(120), "the honest stream never started"
    with httpx.Client(base_url=tenants.server.base_url, timeout=300,
                      headers={"api-key": tenants.attacker}) as client:  # fmt: skip
        for path, body, field in ATTACKS:
            response = client.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
            message = json.dumps(response.json())
            assert "nests repetitions too deeply" in message, message
            assert field in message
    honest.join(300)
    assert len(arrivals) >= 100  # it ran to its end
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) < MAX_GAP_S, f"the honest stream waited {max(gaps):.1f} s for a token"


def test_every_choice_and_no_cap_cannot_spend_past_a_budget_on_the_real_engine(
    tenants: Tenants,
) -> None:
    body = {"model": "mimo-v2-flash", "messages": USER, "n": 8, "ignore_eos": True}
    statuses = []
    with httpx.Client(base_url=tenants.server.base_url, timeout=600,
                      headers={"api-key": tenants.attacker}) as client:  # fmt: skip
        for _ in range(5):
            response = client.post("/v1/chat/completions", json=body)
            statuses.append(response.status_code)
            if response.status_code == 402:
                break
            choices = response.json()["choices"]
            assert len(choices) == 8
            assert all(c["finish_reason"] == "length" for c in choices)  # cut at its hold
    assert statuses[0] == 200 and statuses[-1] == 402, statuses
    usage = SqlUsageStore(SqliteDatabase(tenants.home / "mimoserve.db"))
    key_id = tenants.attacker.split("_")[0].removeprefix("mimo-")

    def attacker_records() -> list[Any]:
        return [r for r in usage.records()
                if r.key_id == key_id and r.api == "chat.completions" and r.status != 400]  # fmt: skip

    until_sync(lambda: len(attacker_records()) == len(statuses), "every attack recorded")
    spent = sum(r.prompt_tokens + r.completion_tokens for r in attacker_records())
    # The stated slack: the prompt tokens the engine read beyond the reservation's
    # estimate (body size / 3), per admitted request.
    admitted = [r for r in attacker_records() if r.status == 200]
    slack = sum(max(0, r.prompt_tokens - len(json.dumps(body)) // 3) for r in admitted)
    assert spent <= BUDGET + slack, (spent, slack)
    assert spent >= BUDGET // 2  # it was served, not refused from the start
