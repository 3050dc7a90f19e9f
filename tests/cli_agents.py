"""A scripted backend that plays the model for coding-agent CLIs (Claude Code, Codex).

Agents make calls of their own (titles, summaries, checks) besides the task, so answers
are chosen by what a request holds, not by order: a request that offers the file tool
and has no tool result yet gets the call that creates the file; one that carries the
tool's result gets the final answer; anything else gets a short text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from mimoserve.backends.base import GenerationRequest
from mimoserve.events import GenerationEvent
from tests.fake_backend import Script, ScriptedBackend

FINAL_ANSWER = "Done: the file is written."


@dataclass
class AgentBackend(ScriptedBackend):
    # tool name -> arguments that create the file (the first the request offers is used)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[GenerationRequest] = field(default_factory=list)

    def _answer(self, request: GenerationRequest) -> list[str]:
        # With prompted thinking the engine's text starts inside <think>: close it, as a
        # model does, so the answer is visible text.
        think = ["</think>"] if request.thinking.mode == "prompted" else []
        return think + self._pieces(request)

    def _pieces(self, request: GenerationRequest) -> list[str]:
        if any(message.role == "tool" for message in request.messages):
            return [FINAL_ANSWER]
        offered = {tool["function"]["name"] for tool in request.tools}
        for name, arguments in self.calls.items():
            if name in offered:
                call = json.dumps({"name": name, "arguments": arguments})
                return ["<tool_call>\n", call[:20], call[20:], "\n</tool_call>"]
        return ["OK"]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self.seen.append(request)
        self.scripts.appendleft(Script(self._answer(request), prompt_tokens=100))
        async for event in super().generate(request):
            yield event
