"""A scripted backend for fast service and API tests (in the spirit of simonw/llm's MockModel)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mimoserve.backends.base import Capabilities, ChatRequest, GenerationRequest
from mimoserve.backends.structured import StructuredOutput
from mimoserve.backends.text_request import to_generation_request
from mimoserve.config import Settings
from mimoserve.events import Finished, FinishReason, GenerationEvent, Progress, Started, TokenUsage

if TYPE_CHECKING:
    from fastapi import FastAPI
from mimoserve.errors import MimoError
from mimoserve.store.base import Database


@dataclass
class Script:
    pieces: list[str]
    reason: FinishReason = "stop"
    prompt_tokens: int = 7
    cached_tokens: int = 0
    # Raised after the pieces instead of finishing (a failure mid-stream).
    fail_with: Exception | None = None
    # Raised before the first event (a refusal, e.g. queue full).
    refuse_with: MimoError | None = None
    delay_s: float = 0.0
    # Generation stops after this many pieces until `release` is set: a test sees what
    # reached the client while the engine was still generating, without timing it.
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class ScriptedBackend:
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(context_length=2048))
    weights_name: str = "fake-weights"
    scripts: deque[Script] = field(default_factory=deque)
    requests: list[GenerationRequest] = field(default_factory=list)
    closed_streams: int = 0
    closed: bool = False
    healthy: bool = True

    def enqueue(self, pieces: list[str], **options: object) -> Script:
        script = Script(pieces, **options)  # type: ignore[arg-type]
        self.scripts.append(script)
        return script

    def prepare(self, chat: ChatRequest) -> GenerationRequest:
        # A text engine, like the embedded one: the same request, the same parsers.
        return to_generation_request(chat.request, self.capabilities, chat.entry)

    async def count_tokens(self, prepared: GenerationRequest) -> int:
        return sum(len((m.content or "").split()) + 4 for m in prepared.messages)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self.requests.append(request)
        script = self.scripts.popleft() if self.scripts else Script(["ok"])
        if script.refuse_with is not None:
            raise script.refuse_with
        output = StructuredOutput(request.plan)
        # Like an engine, it stops at `max_tokens` (one piece is one token here).
        limit = request.sampling.max_tokens
        pieces = script.pieces if limit is None else script.pieces[:limit]
        reason = "length" if len(pieces) < len(script.pieces) else script.reason
        try:
            yield Started(script.prompt_tokens, script.cached_tokens)
            for done, piece in enumerate(pieces):
                if done == script.hold_after:
                    await asyncio.to_thread(script.release.wait)
                if script.delay_s:
                    await asyncio.sleep(script.delay_s)
                yield Progress(1)
                for event in output.feed(piece):
                    yield event
            if script.fail_with is not None:
                raise script.fail_with
            for event in output.finish():
                yield event
            usage = TokenUsage(script.prompt_tokens, len(pieces), script.cached_tokens)
            yield Finished(reason, usage)
        finally:
            self.closed_streams += 1

    def load(self) -> tuple[int, int]:
        return (0, 0)

    def kv_cells(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def fake_app(
    settings: Settings, database: Database, backend: ScriptedBackend, *, speech: bool = False
) -> FastAPI:
    """The real app, with its ledger, admin API and usage store on `database`, and every
    model of the test registry served by `backend` (with `speech`, also the `tts` and
    `asr` ids on scripted speech engines)."""
    from mimoserve.app import create_app
    from mimoserve.auth.admin import AdminCredential
    from mimoserve.auth.keys import KeyStore
    from mimoserve.metering.ledger import UsageLedger
    from mimoserve.registry import ModelRegistry
    from mimoserve.store.usage import SqlUsageStore
    from tests.conftest import REGISTRY
    from tests.fake_speech import SPEECH_REGISTRY, speech_backends

    registry = ModelRegistry.from_toml(REGISTRY + (SPEECH_REGISTRY if speech else ""))
    usage = SqlUsageStore(database)
    voices = speech_backends() if speech else {}
    return create_app(
        settings,
        registry=registry,
        backends={entry.id: voices.get(entry.id, backend) for entry in registry.entries()},
        keys=KeyStore(database),
        ledger=UsageLedger(usage),
        admin=AdminCredential(database),
        usage=usage,
    )
