"""The real coding-agent CLIs against mimoserve: Claude Code (Anthropic Messages) and
Codex (OpenAI Responses), installed from npm (`bash .ci/run` installs them), run
headless with throwaway homes. Against a scripted backend each completes a task that
needs one tool call and its result (create a file); Codex also runs on the real default
model and completes a one-line answer."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.store.sqlite import SqliteDatabase
from mimoserve.store.usage import SqlUsageStore
from mimoserve.weights.catalog import DEFAULT_WEIGHTS
from tests.cli_agents import FINAL_ANSWER, AgentBackend
from tests.e2e.server import pull_test_weights, running_server
from tests.fake_backend import fake_app
from tests.services import uvicorn_in_thread

CLI_DIR = Path(os.environ.get("MIMOSERVE_CLI_DIR", Path.home() / ".cache" / "mimoserve" / "clis"))
TASK = "Create hello.txt containing hi"


def cli(name: str) -> str:
    path = CLI_DIR / "node_modules" / ".bin" / name
    assert path.exists(), f"{path} is missing: `bash .ci/run` installs the agent CLIs from npm"
    return str(path)


def scripted_server(tmp_path: Path, backend: AgentBackend) -> Iterator[tuple[str, str]]:
    database = SqliteDatabase(tmp_path / "db.sqlite")
    key = KeyStore(database).create("agent").secret
    app = fake_app(Settings(home=tmp_path, max_body_bytes=8 << 20), database, backend)
    with uvicorn_in_thread(app) as url:
        yield url, key


def run_claude(
    url: str, key: str, work: Path, home: Path, prompt: str, timeout: int,
    max_output_tokens: int | None = None, may_fail: bool = False,
) -> dict[str, object]:  # fmt: skip
    # Claude Code gives up on a stream after 5 minutes without an event other than
    # `ping` (CLAUDE_STREAM_IDLE_TIMEOUT_MS, at least 300,000), and retries: reading a
    # 19,000-token prompt on 2 cores takes longer than that.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": url,
           "ANTHROPIC_AUTH_TOKEN": key, "ANTHROPIC_MODEL": "mimo-v2-flash",
           "ANTHROPIC_SMALL_FAST_MODEL": "mimo-v2-flash",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CODE_MAX_RETRIES": "0",
           "API_TIMEOUT_MS": str(timeout * 1000), "API_FORCE_IDLE_TIMEOUT": "0",
           "CLAUDE_STREAM_IDLE_TIMEOUT_MS": str(timeout * 1000),
           "DISABLE_AUTOUPDATER": "1"}  # fmt: skip
    if max_output_tokens is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(max_output_tokens)
    result = subprocess.run(
        [cli("claude"), "-p", prompt, "--output-format", "json", "--permission-mode",
         "acceptEdits", "--allowedTools", "Write"],
        cwd=work, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    # `may_fail`: an error Claude Code reports in its result is the caller's to judge.
    assert result.returncode == 0 or may_fail, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_codex(url: str, key: str, work: Path, home: Path, prompt: str, timeout: int) -> str:
    codex_home = home / "codex"
    codex_home.mkdir(parents=True)
    # A provider on this server; no update check (the network beyond loopback is closed).
    (codex_home / "config.toml").write_text(
        'model = "mimo-v2-flash"\nmodel_provider = "mimo"\ncheck_for_update_on_startup = false\n'
        f'[model_providers.mimo]\nname = "mimo"\nbase_url = "{url}/v1"\n'
        'wire_api = "responses"\nenv_key = "MIMO_API_KEY"\n'
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(codex_home),
           "MIMO_API_KEY": key}  # fmt: skip
    last = home / "last-message.txt"
    result = subprocess.run(
        [cli("codex"), "exec", "--skip-git-repo-check", "--ephemeral",
         "--dangerously-bypass-approvals-and-sandbox", "-o", str(last), prompt],
        cwd=work, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return last.read_text()


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    return work, home


def test_claude_code_creates_a_file_through_a_tool_call(
    tmp_path: Path, places: tuple[Path, Path]
) -> None:
    work, home = places
    backend = AgentBackend(calls={"Write": {"file_path": str(work / "hello.txt"), "content": "hi"}})
    for url, key in scripted_server(tmp_path, backend):
        outcome = run_claude(url, key, work, home, TASK, timeout=180)
    assert outcome["subtype"] == "success" and outcome["result"] == FINAL_ANSWER, outcome
    assert (work / "hello.txt").read_text() == "hi"
    assert any(m.role == "tool" for m in backend.seen[-1].messages)  # the result came back


def test_codex_creates_a_file_through_a_tool_call(
    tmp_path: Path, places: tuple[Path, Path]
) -> None:
    work, home = places
    backend = AgentBackend(calls={"exec_command": {"cmd": "printf hi > hello.txt"}})
    for url, key in scripted_server(tmp_path, backend):
        answer = run_codex(url, key, work, home, TASK, timeout=180)
    assert answer.strip() == FINAL_ANSWER
    assert (work / "hello.txt").read_text() == "hi"


def test_codex_on_the_real_default_model_answers(tmp_path: Path, places: tuple[Path, Path]) -> None:
    """Codex's prompt is about 10,000 tokens here: the default model reads it without
    --n-ctx (one KV pool, requests up to the trained context) and answers;
    whatever it answers, Codex must complete."""
    work, home = places
    pull_test_weights(DEFAULT_WEIGHTS)
    # No --n-ctx: a request may use the trained context. One lane keeps the run time
    # predictable (a side request decoding beside it would slow its prompt's reading).
    with running_server(
        tmp_path / "server", "--n-parallel", "1", weights=DEFAULT_WEIGHTS
    ) as server:
        answer = run_codex(server.base_url, server.api_key, work, home,
                           "Reply with one short line: say hello.", timeout=900)  # fmt: skip
    assert answer.strip()


def test_claude_code_on_the_real_default_model_completes_and_reuses_its_prompt(
    tmp_path: Path, places: tuple[Path, Path]
) -> None:
    """Claude Code's prompt is about 19,000 tokens on Qwen's tokenizer: no --n-ctx is
    needed. Its billing header changes on every call and is dropped, so the second run
    reuses the first one's prompt from the prefix cache (read from the usage ledger, not
    timed: this machine is shared). Answers are capped at 64 tokens: at temperature 1
    the small model may ramble for minutes, which tests nothing here. An answer cut at
    the cap ends with stop_reason `max_tokens`, which Claude Code reports as its own
    error (after asking again): that outcome, too, shows it read our stream to its end."""
    work, home = places
    pull_test_weights(DEFAULT_WEIGHTS)
    # No --n-ctx: a request may use the trained context. One lane keeps the run time
    # predictable (a side request decoding beside it would slow its prompt's reading).
    with running_server(
        tmp_path / "server", "--n-parallel", "1", weights=DEFAULT_WEIGHTS
    ) as server:
        for _ in range(2):
            outcome = run_claude(server.base_url, server.api_key, work, home,
                                 "Reply with one short line: say hello.", timeout=1200,
                                 max_output_tokens=64, may_fail=True)  # fmt: skip
            answer = str(outcome["result"]).strip()
            cut = answer.startswith("API Error: Claude's response exceeded the 64 output token")
            assert outcome["subtype"] == "success" and answer, outcome
            assert cut or not outcome["is_error"], outcome
    # The server has stopped: its ledger is flushed.
    records = SqlUsageStore(SqliteDatabase(server.home / "mimoserve.db")).records()
    assert records and all(r.status == 200 for r in records), records  # no retry, no 499
    first, last = records[0], records[-1]
    assert first.prompt_tokens > 15_000, first
    # Only the tail past the earlier prompt is new: the user's turn and, after an answer
    # cut at the cap, that answer and Claude Code's request to go on (about 70 tokens in
    # CI). Without the prefix cache nothing would be cached.
    assert last.cached_tokens >= 0.95 * last.prompt_tokens, (first, last)
