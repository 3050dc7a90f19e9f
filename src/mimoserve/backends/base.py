"""The backend interface: generate a stream of typed events, declare capabilities.

The API and chat layers know only this module. The embedded llama.cpp engine and,
later, a batching scheduler or an OpenAI-compatible upstream implement it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.95
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    # None: as many as the context leaves room for.
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0


@dataclass(frozen=True)
class PromptMessage:
    """One history message, already normalised: text content, developer folded into system."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None
    reasoning_content: str | None = None
    # OpenAI-shaped tool calls ({"id", "type", "function": {"name", "arguments"}}).
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class OutputConstraint:
    """Constrains decoding to JSON: any object (`schema` None) or one matching `schema`."""

    schema: dict[str, Any] | None = None
    # The request field the schema came from, named in errors ("tools", "response_format").
    source: str = "response_format"


ThinkingMode = Literal["off", "native", "prompted"]


@dataclass(frozen=True)
class Thinking:
    """How this request reasons.

    `native`: the template switches thinking on (`enable_thinking`). `prompted`: the model
    has no such switch, so the engine opens the `<think>` block itself after the
    generation prompt. In both, the engine closes the block once `budget` reasoning
    tokens are spent.
    """

    mode: ThinkingMode = "off"
    budget: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[PromptMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # OpenAI-shaped tool definitions, rendered through the model's own template.
    tools: tuple[dict[str, Any], ...] = ()
    constraint: OutputConstraint | None = None
    thinking: Thinking = field(default_factory=Thinking)


@dataclass(frozen=True)
class Started:
    """The engine admitted the request and knows its prompt (first event of a generation)."""

    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str
    # Completion tokens this piece accounts for (held-back text arrives with a later piece),
    # so a generation cut short still knows what it consumed.
    tokens: int = 0


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: TokenUsage


GenerationEvent = Started | TextDelta | Finished


@dataclass(frozen=True)
class Capabilities:
    context_length: int
    input_modalities: frozenset[str] = frozenset({"text"})
    tools: bool = False
    constrained_output: bool = False


class ServedModel(Protocol):
    """What `/v1/models` shows of a model, whoever generates for it."""

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def weights_name(self) -> str: ...


class Backend(ServedModel, Protocol):
    """Serves one set of weights; several public model ids may share one backend."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yields `Started` (optional, first), text deltas, then exactly one `Finished`.

        Errors that concern the request itself (prompt too long, queue full) are raised
        before the first event, so callers can still answer with a plain HTTP error.
        Closing the iterator early cancels the generation within one token.
        """
        ...

    def load(self) -> tuple[int, int]:
        """(requests generating now, requests waiting for the engine)."""
        ...

    @property
    def healthy(self) -> bool:
        """False once the engine can no longer generate (requests get 503 at once)."""
        ...

    async def close(self) -> None: ...
