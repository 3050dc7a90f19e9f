"""`mimoserve chat`: talk to a model from the terminal, over the same API clients use.

Works against this server, another mimoserve and the hosted MiMo API alike (`--url`,
`--key` or `MIMO_API_KEY`). Answers stream as they arrive; reasoning is shown dimmed,
apart from the answer. Interactive: `/reset` starts over, `/model NAME` switches model,
Ctrl-C stops the current answer (not the session), Ctrl-D or `/exit` leaves. One-shot:
`mimoserve chat "question"`, or text piped on stdin. `--speak FILE` also saves each
answer as speech (wav, mp3, or raw 24 kHz pcm by the file's extension), synthesised by
the server's speech model (`mimo-v2.5-tts` unless `--speech-model` says otherwise).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

HELP = "/reset starts over, /model NAME switches model, /exit leaves (or Ctrl-D)"


@dataclass
class ChatSession:
    url: str
    key: str
    model: str
    system: str | None = None
    thinking: str | None = None  # "on", "off", or None for the model's default
    history: list[dict[str, Any]] = field(default_factory=list)
    speak_to: Path | None = None  # each answer is also saved there as speech
    speech_model: str = "mimo-v2.5-tts"
    voice: str = "mimo_default"

    def reset(self) -> None:
        self.history = []

    def _body(self) -> dict[str, Any]:
        messages = (
            [{"role": "system", "content": self.system}] if self.system else []
        ) + self.history
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if self.thinking is not None:
            body["thinking"] = {"type": "enabled" if self.thinking == "on" else "disabled"}
        return body

    def ask(self, client: httpx.Client, question: str) -> Iterator[tuple[str, str]]:
        """(kind, text) pieces as they arrive: kind is reasoning, content or tool."""
        self.history.append({"role": "user", "content": question})
        answer: list[str] = []
        headers = {"Authorization": f"Bearer {self.key}"}
        with client.stream("POST", f"{self.url}/v1/chat/completions", json=self._body(),
                           headers=headers) as response:  # fmt: skip
            if response.status_code != 200:
                self.history.pop()
                response.read()
                raise ChatError(_error_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise ChatError(str(data["error"].get("message", data["error"])))
                for choice in data.get("choices", ()):
                    delta = choice.get("delta", {})
                    if delta.get("reasoning_content"):
                        yield "reasoning", delta["reasoning_content"]
                    if delta.get("content"):
                        answer.append(delta["content"])
                        yield "content", delta["content"]
                    for call in delta.get("tool_calls") or ():
                        function = call.get("function") or {}
                        if function.get("name"):
                            yield "tool", f"\n[tool call: {function['name']}] "
                        if function.get("arguments"):
                            yield "tool", function["arguments"]
        self.history.append({"role": "assistant", "content": "".join(answer)})

    def speak(self, client: httpx.Client) -> Path | None:
        """The last answer, synthesised into `speak_to` (the format from its extension)."""
        if self.speak_to is None or not self.history or not self.history[-1]["content"]:
            return None
        suffix = self.speak_to.suffix.lower().lstrip(".")
        fmt = {"mp3": "mp3", "pcm": "pcm16", "raw": "pcm16"}.get(suffix, "wav")
        body = {"model": self.speech_model, "audio": {"format": fmt, "voice": self.voice},
                "messages": [{"role": "assistant", "content": self.history[-1]["content"]}]}
        response = client.post(f"{self.url}/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        if response.status_code != 200:
            raise ChatError(f"speaking the answer: {_error_message(response)}")
        audio = response.json()["choices"][0]["message"]["audio"]
        self.speak_to.write_bytes(base64.b64decode(audio["data"]))
        return self.speak_to


class ChatError(Exception):
    pass


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _show(console: Console, pieces: Iterator[tuple[str, str]]) -> None:
    for kind, text in pieces:
        style = "dim" if kind == "reasoning" else ("cyan" if kind == "tool" else None)
        console.print(text, style=style, end="", markup=False, highlight=False, soft_wrap=True)
    console.print()


def _answer(session: ChatSession, client: httpx.Client, question: str, console: Console) -> None:
    _show(console, session.ask(client, question))
    spoken = session.speak(client)
    if spoken is not None:
        console.print(f"(spoken to {spoken})", style="dim", markup=False, soft_wrap=True)


def one_shot(session: ChatSession, question: str, console: Console) -> int:
    with httpx.Client(timeout=None) as client:
        try:
            _answer(session, client, question, console)
        except (ChatError, httpx.HTTPError) as exc:
            console.print(f"error: {exc}", style="red", markup=False)
            return 1
    return 0


def interactive(session: ChatSession, console: Console) -> int:
    from prompt_toolkit import PromptSession

    prompt: PromptSession[str] = PromptSession()
    console.print(f"mimoserve chat with {session.model} at {session.url} ({HELP})", style="dim")
    with httpx.Client(timeout=None) as client:
        while True:
            try:
                line = prompt.prompt(f"{session.model}> ").strip()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                return 0
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                session.reset()
                console.print("(conversation reset)", style="dim")
                continue
            if line.startswith("/model"):
                name = line.removeprefix("/model").strip()
                if name:
                    session.model = name
                console.print(f"(model: {session.model})", style="dim")
                continue
            try:
                _answer(session, client, line, console)
            except KeyboardInterrupt:  # stops this answer; the session goes on
                session.history.pop()
                console.print("\n(stopped)", style="dim")
            except (ChatError, httpx.HTTPError) as exc:
                console.print(f"error: {exc}", style="red", markup=False)


def run(url: str | None, key: str | None, model: str, system: str | None,
        thinking: str | None, question: str | None, speak: Path | None = None,
        speech_model: str = "mimo-v2.5-tts", voice: str = "mimo_default") -> int:  # fmt: skip
    base = (url or os.environ.get("MIMO_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
    key = key or os.environ.get("MIMO_API_KEY", "")
    session = ChatSession(url=base.removesuffix("/v1"), key=key, model=model, system=system,
                          thinking=thinking, speak_to=speak, speech_model=speech_model,
                          voice=voice)  # fmt: skip
    console = Console(highlight=False)
    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read().strip()
    if question:
        return one_shot(session, question, console)
    return interactive(session, console)
