"""`mimoserve chat` driven as a person would: in a pseudo-terminal, and one-shot."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.store.sqlite import SqliteDatabase
from tests.fake_backend import ScriptedBackend, fake_app
from tests.services import uvicorn_in_thread

# `mimoserve chat` runs in a subprocess under a pseudo-terminal: not the unit tier.
pytestmark = pytest.mark.slow


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, ScriptedBackend]]:
    database = SqliteDatabase(tmp_path / "db.sqlite")
    key = KeyStore(database).create("chat").secret
    backend = ScriptedBackend()
    with uvicorn_in_thread(fake_app(Settings(home=tmp_path), database, backend)) as url:
        yield url, key, backend


def chat_command(url: str, key: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mimoserve.cli",
        "chat",
        "--url",
        f"{url}/v1",
        "--key",
        key,
        *extra,
    ]


def test_interactive_session(served: tuple[str, str, ScriptedBackend]) -> None:
    url, key, backend = served
    backend.enqueue(["Hello ", "there."])
    backend.enqueue(["Let me think.", "</think>", "Four."])
    backend.enqueue(["one ", "two ", "three ", "four ", "five "], delay_s=1.0)
    backend.enqueue(["Fresh start."])
    command = chat_command(url, key, "--system", "Be brief.")
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"}  # pexpect's terminal answers no CPR
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=30,
                          dimensions=(40, 120), env=env)  # fmt: skip
    child.expect("mimo-v2-flash>")
    child.sendline("hi")
    child.expect("Hello there.")
    child.expect("mimo-v2-flash>")
    child.sendline("/model mimo-v2-pro")
    child.expect("model: mimo-v2-pro")
    child.sendline("2+2?")
    child.expect("Let me think.")
    assert "\x1b[2m" in str(child.before)  # reasoning is dimmed, apart from the answer
    child.expect("Four.")
    child.expect("mimo-v2-pro>")
    # The earlier turns went with it, and the system prompt first.
    roles = [m.role for m in backend.requests[-1].messages]
    assert roles == ["system", "user", "assistant", "user"]
    child.sendline("count slowly")
    child.expect("one ")
    child.sendintr()  # Ctrl-C: stops this answer, not the session
    child.expect("stopped")
    child.expect("mimo-v2-pro>")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.sendline("again")
    child.expect("Fresh start.")
    assert [m.role for m in backend.requests[-1].messages] == ["system", "user"]
    child.expect("mimo-v2-pro>")
    child.sendcontrol("d")  # Ctrl-D at an empty prompt leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_and_piped(served: tuple[str, str, ScriptedBackend]) -> None:
    url, key, backend = served
    backend.enqueue(["Paris."])
    answer = subprocess.run(chat_command(url, key, "Capital of France?"), capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert answer.returncode == 0 and answer.stdout.strip() == "Paris."
    backend.enqueue(["Piped."])
    piped = subprocess.run(chat_command(url, key, "--thinking", "off"), input="from stdin\n",
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert piped.returncode == 0 and piped.stdout.strip() == "Piped."
    assert backend.requests[-1].messages[-1].content == "from stdin"
    assert backend.requests[-1].thinking.mode == "off"


def test_errors_are_said_plainly(served: tuple[str, str, ScriptedBackend]) -> None:
    url, _, _ = served
    result = subprocess.run(chat_command(url, "wrong-key", "hi"), capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Invalid API key" in result.stdout
