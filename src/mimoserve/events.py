"""The neutral vocabulary every layer speaks: what a generation yields (typed events),
what it used, how it ended, and what an engine reports of itself.

Imports nothing of the project, so `metering`, `backends`, `chat` and the doors can all
depend on it without depending on each other. Every backend yields, in order: one
`Started`; reasoning and content deltas and tool calls (started, argument pieces, ended)
as they are generated, with `Progress` for the tokens they cost and `Logprobs` when
asked; one `Finished` with the usage. No event knows a wire format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "content_filter"]


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
class AudioDelta:
    """Synthesised speech, already in the requested format (the first piece of a wav
    carries its header); `transcript` is the text this piece speaks, where known."""

    data: bytes
    transcript: str = ""


@dataclass(frozen=True)
class HeardSegment:
    """Where in the audio a stretch of transcript was heard (seconds from the start);
    its text also comes as a `ContentDelta`. For timed transcripts (srt, vtt)."""

    start: float
    end: float
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
    # Speculation: tokens guessed and verified, and how many of them the sampler chose;
    # of those, the ones the client's `prediction` supplied.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # Speech: prompt tokens that were audio, seconds of audio heard or spoken, and
    # characters spoken (what speech is priced by).
    audio_tokens: int = 0
    audio_seconds: float = 0.0
    characters: int = 0


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


OutputEvent = (
    ReasoningDelta
    | ContentDelta
    | AudioDelta
    | HeardSegment
    | ToolCallStarted
    | ToolCallDelta
    | ToolCallEnded
)
GenerationEvent = Started | OutputEvent | Progress | Logprobs | Finished


@dataclass(frozen=True)
class ReplicaRoutingCounts:
    """What fleet routing counted for one upstream replica (for /metrics)."""

    replica: str
    routed: int
    predicted_hits: int  # routed where it was expected to hold part of the prompt
    prompt_tokens: int  # as the engine reported them
    cached_tokens: int
    reliability: float


@dataclass(frozen=True)
class KvTierStats:
    """Where prompt tokens that were not computed came from, counted since start: the
    pool itself, host memory or disk (the tiers under it), and the disk tier's state."""

    pool_hits: int = 0
    pool_tokens: int = 0
    host_hits: int = 0
    host_tokens: int = 0
    disk_hits: int = 0
    disk_tokens: int = 0
    disk_bytes: int = 0
    disk_entries: int = 0
    host_bytes: int = 0
    stores: int = 0
    store_failures: int = 0
    store_seconds: float = 0.0  # writing (the writer thread)
    capture_seconds: float = 0.0  # copying cells out of the pool (the scheduler thread)
    load_failures: int = 0
    load_seconds: float = 0.0  # reading and putting cells back (the scheduler thread)
    spilled_cells: int = 0  # idle cached cells that left the pool for a lower tier


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
    tiers: KvTierStats | None = None  # the host and disk tiers, when the engine has them

    @property
    def free(self) -> int:
        return self.total - self.used - self.cached
