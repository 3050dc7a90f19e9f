"""The embedded engine in this process (SmolLM2): faults end requests, they never hang them.

No server subprocess runs while this module does (those are module-scoped elsewhere),
so loading a model here does not put two llama.cpp engines on the same cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mimoserve.backends.base import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    PromptMessage,
    SamplingParams,
)
from mimoserve.backends.llamacpp.backend import LlamaCppBackend
from mimoserve.backends.llamacpp.model import EngineConfig
from mimoserve.backends.llamacpp.sequence import SequenceOutput
from mimoserve.errors import EngineError, OverloadedError
from tests.e2e.server import pull_test_weights

pytestmark = pytest.mark.real_model

REQUEST = GenerationRequest(
    (PromptMessage(role="user", content="Count to twenty."),),
    SamplingParams(temperature=0, max_tokens=12),
)


@pytest.fixture(scope="module")
def weights() -> Path:
    return pull_test_weights()


@pytest.fixture
def engine(weights: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(
        EngineConfig(weights, n_ctx=512, n_parallel=1, n_threads=2, max_queue=1), "smollm2"
    )
    yield backend
    asyncio.run(backend.close())


async def collect(backend: LlamaCppBackend) -> list[GenerationEvent]:
    return [event async for event in backend.generate(REQUEST)]


def test_a_failing_step_errors_the_request_and_the_engine_recovers(
    engine: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SequenceOutput.on_token
    monkeypatch.setattr(SequenceOutput, "on_token", lambda self, token: 1 / 0)
    with pytest.raises(EngineError):
        asyncio.run(asyncio.wait_for(collect(engine), 30))
    monkeypatch.setattr(SequenceOutput, "on_token", original)
    events = asyncio.run(asyncio.wait_for(collect(engine), 30))
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 12


def test_queue_beyond_its_bound_is_refused_and_cancelled_waiters_never_run(
    engine: LlamaCppBackend,
) -> None:
    async def scenario() -> None:
        long = GenerationRequest(REQUEST.messages, SamplingParams(temperature=0, max_tokens=200))
        running = engine.generate(long)
        await anext(running)  # admitted and generating
        waiting = engine.generate(REQUEST)
        waiter = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.05)
        assert engine.load() == (1, 1)
        with pytest.raises(OverloadedError):
            await anext(engine.generate(REQUEST))
        waiter.cancel()  # the waiting client goes away before its turn
        await asyncio.gather(waiter, return_exceptions=True)
        await waiting.aclose()
        await running.aclose()
        for _ in range(100):
            if engine.load() == (0, 0):
                break
            await asyncio.sleep(0.02)
        assert engine.load() == (0, 0)

    asyncio.run(asyncio.wait_for(scenario(), 60))
