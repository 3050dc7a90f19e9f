"""The backend interface: generate a stream of typed events, declare capabilities.

The chat core and the front doors know only this module. Every backend (the embedded
llama.cpp engine, upstream OpenAI-compatible engines) yields the same events:
`Started`, then reasoning and content deltas and tool calls (started, argument pieces,
ended) as they are generated, `Progress` for the tokens they cost, and one `Finished`
with the usage. No event knows a wire format.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

from mimoserve.events import GenerationEvent, KvCells
from mimoserve.parsing.assembler import OutputPlan
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import ModelEntry


def lower_cap(current: int | None, cap: int) -> int:
    """A request's output cap after a budget's `cap`: the lower of the two."""
    return cap if current is None else min(current, cap)


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
    logprobs: int | None = None  # None: none; n: each token's log-probability and n rivals


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
    # How the engine's text becomes events: think blocks, tool-call formats, forced calls.
    plan: OutputPlan = field(default_factory=OutputPlan)
    # The client's predicted output: a guess the engine verifies, never sent as output.
    prediction: str | None = None

    def capped(self, max_tokens: int) -> GenerationRequest:
        """Stops after `max_tokens` completion tokens, or the client's cap if lower."""
        limit = lower_cap(self.sampling.max_tokens, max_tokens)
        return replace(self, sampling=replace(self.sampling, max_tokens=limit))

    def for_choice(self, index: int) -> GenerationRequest:
        """Choice `index` of the client's n: with a seed, its own (seed + index), so the
        choices differ and a rerun repeats them; without, each sequence draws its own."""
        seed = self.sampling.seed
        if index == 0 or seed is None:
            return self
        return replace(self, sampling=replace(self.sampling, seed=seed + index))


@dataclass(frozen=True)
class Capabilities:
    context_length: int
    input_modalities: frozenset[str] = frozenset({"text"})
    tools: bool = False
    constrained_output: bool = False
    logprobs: bool = False  # can report each sampled token's log-probability
    choices: bool = False  # can serve n > 1 (several generations of one prompt)
    audio_output: bool = False  # answers with speech (only doors that carry audio serve it)


class ServedModel(Protocol):
    """What `/v1/models` shows of a model, whoever generates for it."""

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def weights_name(self) -> str: ...


@dataclass(frozen=True)
class ChatRequest:
    """The one internal request: every front door builds it, every backend prepares its
    engine's request from it. Its body is the validated chat completion request, the
    platform's canonical form (other doors translate into it); `raw` is that body as the
    client sent it, when the client spoke this format (an upstream engine gets it as is)."""

    request: ChatCompletionRequest
    entry: ModelEntry
    raw: bytes | None = None


Prepared = TypeVar("Prepared")  # a backend's own request, from `prepare` to `generate`


class Backend(ServedModel, Protocol[Prepared]):
    """Serves one set of weights; several public model ids may share one backend. Its
    prepared request is its own type: the core carries it from `prepare` to `generate`
    without looking inside (it may only ask it to cap its output: `chat.choices`)."""

    def prepare(self, chat: ChatRequest) -> Prepared:
        """The engine's request, checked: what the engine cannot do is a 400 here,
        before the request is admitted against any limit."""
        ...

    async def count_tokens(self, prepared: Prepared) -> int:
        """The prompt's tokens as the engine would count them (or its best estimate)."""
        ...

    def generate(self, prepared: Prepared) -> AsyncGenerator[GenerationEvent, None]:
        """Yields `Started` first, then output events and `Progress`, then exactly one
        `Finished`.

        Errors that concern the request itself (prompt too long, queue full) are raised
        before `Started`, so callers can still answer with a plain HTTP error. Closing
        the iterator early cancels the generation within one token.
        """
        ...

    def load(self) -> tuple[int, int]:
        """(requests generating now, requests waiting for the engine)."""
        ...

    def kv_cells(self) -> KvCells | None:
        """The engine's KV pool, where the engine is ours to see into (else None)."""
        ...

    @property
    def healthy(self) -> bool:
        """False once the engine can no longer generate (requests get 503 at once)."""
        ...

    async def close(self) -> None: ...


def engine_of(backend: Backend[Any]) -> Backend[Any]:
    """The backend that owns the engine: a wrapper (audio through a cascade) names the
    backend it wraps as `inner`, so the engine is counted, watched and closed once."""
    inner = getattr(backend, "inner", None)
    return engine_of(inner) if inner is not None else backend
