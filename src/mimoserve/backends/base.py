"""The backend interface: generate a stream of typed events, declare capabilities.

The chat core and the front doors know only this module. Every backend (the embedded
llama.cpp engine, upstream OpenAI-compatible engines) yields the same events:
`Started`, then reasoning and content deltas and tool calls (started, argument pieces,
ended) as they are generated, `Progress` for the tokens they cost, and one `Finished`
with the usage. No event knows a wire format.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from mimoserve.parsing.assembler import OutputPlan
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import ModelEntry

FinishReason = Literal["stop", "length", "content_filter"]


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

    def capped(self, max_tokens: int) -> GenerationRequest:
        """Stops after `max_tokens` completion tokens, or the client's cap if lower."""
        mine = self.sampling.max_tokens
        limit = max_tokens if mine is None else min(mine, max_tokens)
        return replace(self, sampling=replace(self.sampling, max_tokens=limit))

    def for_choice(self, index: int) -> GenerationRequest:
        """Choice `index` of the client's n: with a seed, its own (seed + index), so the
        choices differ and a rerun repeats them; without, each sequence draws its own."""
        seed = self.sampling.seed
        if index == 0 or seed is None:
            return self
        return replace(self, sampling=replace(self.sampling, seed=seed + index))


@dataclass(frozen=True)
class Started:
    """The engine admitted the request and knows its prompt (first event of a generation)."""

    prompt_tokens: int
    cached_tokens: int = 0
    # The engine's own count of completion tokens generated so far, read or not (None:
    # only what was read is known). A request cut short is billed for what it cost.
    generated: Callable[[], int] | None = field(default=None, compare=False, repr=False)
    # `prompt_tokens` is an estimate (an upstream engine counts only when it answers).
    estimated: bool = False


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    index: int  # 0, 1, ... in the order calls start
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a call's arguments; a call's pieces concatenated are one JSON object."""

    index: int
    arguments: str


@dataclass(frozen=True)
class ToolCallEnded:
    index: int


@dataclass(frozen=True)
class Progress:
    """Completion tokens generated since the last `Progress` (text may still be held
    back), so a generation cut short still knows what it consumed."""

    tokens: int


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False  # the engine did not count them all: the server estimated


@dataclass(frozen=True)
class RivalToken:
    token: str
    token_bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (before sampling settings),
    with the most likely tokens at that step."""

    token: str
    token_bytes: tuple[int, ...]
    logprob: float
    top: tuple[RivalToken, ...] = ()


@dataclass(frozen=True)
class Logprobs:
    """The tokens sampled since the last event, in order (only when asked for)."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: TokenUsage
    stop_sequence: str | None = None  # the client's stop sequence that ended the answer


OutputEvent = ReasoningDelta | ContentDelta | ToolCallStarted | ToolCallDelta | ToolCallEnded
GenerationEvent = Started | OutputEvent | Progress | Logprobs | Finished


@dataclass(frozen=True)
class KvCells:
    """An engine's KV pool, in tokens: held by running sequences (`used`), kept for
    prefixes nobody attends to now (`cached`, evicted on demand), and free."""

    total: int
    used: int
    cached: int
    # Counted since the engine started, reported beside the pool: sequences pre-empted
    # for room, and sequences ended because one constrained token took too long.
    preemptions: int = 0
    constraint_timeouts: int = 0

    @property
    def free(self) -> int:
        return self.total - self.used - self.cached


@dataclass(frozen=True)
class Capabilities:
    context_length: int
    input_modalities: frozenset[str] = frozenset({"text"})
    tools: bool = False
    constrained_output: bool = False
    logprobs: bool = False  # can report each sampled token's log-probability
    choices: bool = False  # can serve n > 1 (several generations of one prompt)


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


class Backend(ServedModel, Protocol):
    """Serves one set of weights; several public model ids may share one backend."""

    def prepare(self, chat: ChatRequest) -> Any:
        """The engine's request, checked: what the engine cannot do is a 400 here,
        before the request is admitted against any limit."""
        ...

    async def count_tokens(self, prepared: Any) -> int:
        """The prompt's tokens as the engine would count them (or its best estimate)."""
        ...

    def generate(self, prepared: Any) -> AsyncGenerator[GenerationEvent, None]:
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
