"""Draft-free speculative decoding: guesses at a sequence's next tokens, taken from text
it or other requests already hold, for the model to verify in the sequence's next step.

A guess costs one batch position per drafted token; a step that verifies k drafted
tokens costs about what reading k prompt tokens costs (a fraction of a decode step on a
CPU, where each step reads the weights once). The scheduler samples every position in
order with the sequence's own sampler and keeps a drafted token only when it equals the
token sampled there, so the output is exactly what decoding without drafts gives:
drafts change how many tokens one step yields, never which tokens.

Where guesses come from (each is asked; the guess worth most to the step is verified):
1. the client's prediction (OpenAI's `prediction`), followed where the output agrees
   with it and found again by n-gram where it does not;
2. the sequence itself (prompt and output: "prompt lookup"): a file being rewritten, a
   path repeated in a tool call;
3. the recent outputs of every request on this engine, so an agent's repeated tool
   calls and boilerplate are guessed from its earlier turns.
Each source follows the sequence: while the output keeps agreeing with the place its
last guess came from, the next guess continues from there; otherwise it looks for the
longest of the sequence's last n-grams (`ORDERS`) and continues after its latest
occurrence, or, when the output left a copy it had followed, after its first occurrence
in the text that came next (`REJOIN_WINDOW`): an edit moves on through what it copies.
Where the output came back within a few tokens, what it wrote instead is an edit
(`Rewrite`: a name renamed, a word dropped) that the answer probably repeats, so later
guesses make the same change wherever the source holds the replaced tokens again; an
edit the output then does not repeat is forgotten. After a small edit the copy is
guessed as far as before it: the agreement before the edit still counts, and the miss
it caused is not held against the sequence.

How much to guess (`draft_length`): the chance that a guessed token is accepted, given
the ones before it were, is learnt per source and per how long the sequence has agreed
with the source so far (`AcceptanceTable`: a long agreement predicts a longer one), over
all requests of the engine, and corrected by the sequence's own recent acceptance
(text that keeps missing stops being guessed at, whatever other requests taught). The
guess length is the one that maximises the step's expected tokens per second under the
engine's measured cost of a step of n tokens (`StepShape`): on a CPU, a step of one
token takes a fast path (llama.cpp's matrix-vector kernels), a step of two costs about
twice that, and each further token much less, so a guess pays only when it is long and
likely; text with nothing to copy is not guessed at.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

# n-gram lengths a source looks up, longest first.
ORDERS = (4, 3, 2)
# Recent outputs of all requests kept for drafting (tokens; the oldest half goes when full).
SHARED_CAPACITY = 1 << 16
# A document boundary in the shared history: never part of a draft.
_SEPARATOR = -1
# The longest agreement the acceptance table tells apart.
MAX_RUN = 16
# The prior chance that a prediction's next token is accepted, before any agreement.
_PREDICTION_PRIOR = 0.9
# A guess must promise this much more throughput for the step (measured: with 8 streams,
# guesses the table rated barely worth it cost 15 % of their throughput).
MIN_GAIN = 0.15
# A sequence's own record: how much the table's rate weighs against it (in verifications
# of one token), and how fast it forgets (per verification).
_OWN_PRIOR = 4.0
_OWN_DECAY = 0.8
_OWN_FADE = 0.97  # per step: about 30 steps without guessing and the table speaks again
# ... except for a prediction the output has followed this long since: the client vouches
# for it, and one whose first guess missed at the answer's start (the code fence
# tokenised another way) was then followed for 40 tokens without a guess. (Not for the
# engine's own sources: an essay that loops followed itself for 17 tokens, and a
# 105-token guess missed after 5.)
OWN_RUN = 8
# Until a sequence's output has followed one of the engine's own sources for MAX_RUN
# tokens, that source's guesses go no further than the output has followed it, and at
# least PROBE tokens. At the start of an answer the agreement is with the chat template's
# tail, which every answer shares, and in an agent's prompt a tool call's first tokens
# agree with earlier calls, while the table's rate was taught by other requests: a file
# copy teaches 0.98 there, and an agent's next answer got 63-token guesses at its
# 8,600-token context that missed at once (0.7 s each, sixteen one-token steps). A copy
# pays two or three short steps for it once; a divergence later (an edit in the copy)
# costs nothing more. The client's prediction is exempt: the client vouches for it.
PROBE = 4
# How fast the table forgets (per verification), so it follows what the engine serves.
_DECAY = 0.995
# After the output leaves a source it had followed for `EDIT_RUN` tokens, the place it
# comes back to is looked for first within this many tokens after the place it left,
# for as long as it has written no more than that: the latest occurrence of a short
# n-gram in a file being copied is usually the copy itself, a place already passed,
# whose continuation misses again.
REJOIN_WINDOW = 256
EDIT_RUN = 8
# An edit is learnt as a rewrite when it replaces at most this many tokens with at most
# as many; a sequence keeps its latest `MAX_REWRITES`.
REWRITE_SPAN = 16
MAX_REWRITES = 8


class NgramIndex:
    """A token list and, for each n-gram in it, the positions right after it (where its
    continuation starts), in order. An n-gram is indexed only once its continuation
    exists, so the tail of the list never finds itself."""

    def __init__(self, orders: Sequence[int] = ORDERS) -> None:
        self.orders = tuple(sorted(orders, reverse=True))
        self.tokens: list[int] = []
        self.offset = 0  # absolute position of tokens[0] (the shared index drops its head)
        self._after: dict[tuple[int, ...], list[int]] = {}

    @property
    def end(self) -> int:
        return self.offset + len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._append(token)

    def _append(self, token: int) -> None:
        tokens, at = self.tokens, len(self.tokens)
        for n in self.orders:
            if at >= n:
                gram = tuple(tokens[at - n : at])
                if _SEPARATOR not in gram:
                    self._after.setdefault(gram, []).append(self.offset + at)
        tokens.append(token)

    def token_at(self, position: int) -> int | None:
        index = position - self.offset
        return self.tokens[index] if 0 <= index < len(self.tokens) else None

    def slice(self, start: int, count: int) -> list[int]:
        begin = max(0, start - self.offset)
        out = self.tokens[begin : begin + count]
        if _SEPARATOR in out:
            out = out[: out.index(_SEPARATOR)]
        return out

    def find(self, tail: Sequence[int], after: int | None = None) -> tuple[int, int] | None:
        """Where the continuation of the longest indexed n-gram ending `tail` starts (its
        first occurrence at or after `after` when given and there is one, else its
        latest), and that n-gram's length."""
        for n, places in self._places_after(tail):
            if after is not None:
                first = bisect.bisect_left(places, after)
                if first < len(places):
                    return places[first], n
            return places[-1], n
        return None

    def find_within(self, tail: Sequence[int], start: int, stop: int) -> tuple[int, int] | None:
        """Like `find`, for the first continuation between `start` and `stop` (both
        included): the longest n-gram ending `tail` that has one there."""
        for n, places in self._places_after(tail):
            first = bisect.bisect_left(places, start)
            if first < len(places) and places[first] <= stop:
                return places[first], n
        return None

    def _places_after(self, tail: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
        """For each indexed n-gram ending `tail`, longest first: its length and where its
        continuations start."""
        for n in self.orders:
            if len(tail) >= n:
                places = self._after.get(tuple(tail[-n:]))
                if places:
                    yield n, places

    def drop_oldest(self, keep: int) -> None:
        """Keeps the last `keep` tokens (re-indexed: positions stay absolute)."""
        kept = self.tokens[len(self.tokens) - keep :] if keep > 0 else []
        self.offset += len(self.tokens) - len(kept)
        self.tokens, self._after = [], {}
        self.extend(kept)


class SharedHistory:
    """Recent outputs of every request on one engine (the scheduler thread's alone)."""

    def __init__(self, capacity: int = SHARED_CAPACITY) -> None:
        self.index = NgramIndex()
        self._capacity = capacity

    def add(self, output: Sequence[int]) -> None:
        if len(output) < min(self.index.orders) + 1:
            return
        output = output[-self._capacity // 2 :]
        if len(self.index.tokens) + len(output) + 1 > self._capacity:
            self.index.drop_oldest(max(0, self._capacity // 2 - len(output) - 1))
        self.index.extend([*output, _SEPARATOR])


Kind = Literal["prediction", "context", "shared"]


@dataclass(frozen=True)
class Rewrite:
    """An edit the output made to text it was copying: `old` (never empty) became `new`."""

    old: tuple[int, ...]
    new: tuple[int, ...]


@dataclass
class Follower:
    """One sequence's place in one draft source: the position its next guess starts at,
    valid while the sequence keeps agreeing with the source from there; `run` counts the
    tokens it has agreed for (the evidence for the next guess)."""

    kind: Kind
    index: NgramIndex
    cursor: int | None = None  # absolute position in the source's tokens
    aligned: bool = False  # the sequence agrees with the source up to the cursor
    run: int = 0
    trusted: bool = False  # the output has followed it for MAX_RUN tokens (see PROBE)
    # Prediction: resync at the first occurrence after the cursor, not the latest (the
    # answer moves through the prediction in order).
    forward: bool = False
    # The sequence's edits (shared by its followers: an edit is the answer's, whichever
    # source showed it), and the rest of one the output is writing now, before the
    # source goes on at the cursor.
    rewrites: list[Rewrite] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    # Where the output left the source after a long agreement, what it wrote since, and
    # how long it had agreed.
    left_at: int | None = None
    since: list[int] = field(default_factory=list)
    left_run: int = 0
    # Set when the output came back after a small edit (read and cleared by its sequence).
    resumed: bool = False

    def follow(self, token: int) -> None:
        if self.left_at is not None:
            self.since.append(token)
            if len(self.since) > REJOIN_WINDOW:
                self.left_at, self.since = None, []
        if not self.aligned:
            return
        assert self.cursor is not None
        if self._agrees(token):
            self.run += 1
            return
        if self.run >= EDIT_RUN and not self.pending:
            self.left_at, self.since, self.left_run = self.cursor, [token], self.run
        self.aligned, self.run, self.pending = False, 0, []

    def _agrees(self, token: int) -> bool:
        """Moves past `token` when it is the next one of the source (or of the edit being
        written), or the first of an edit known at the cursor."""
        assert self.cursor is not None
        if self.pending:
            if self.pending[0] != token:
                return False
            del self.pending[0]
            return True
        rewrite = self._rewrite_at(self.cursor)
        if self.index.token_at(self.cursor) == token:
            if rewrite is not None:  # kept here: not an edit the answer always makes
                self.rewrites.remove(rewrite)
            self.cursor += 1
            return True
        if rewrite is None:
            return False
        # Its first token or, for a dropped span, the source's token after the span.
        after = self.index.token_at(self.cursor + len(rewrite.old))
        if (rewrite.new[0] if rewrite.new else after) != token:
            return False
        self.cursor += len(rewrite.old)
        if rewrite.new:
            self.pending = list(rewrite.new[1:])
        else:
            self.cursor += 1
        return True

    def guess(self, tail: Sequence[int], count: int) -> list[int]:
        if not self.aligned or self.cursor is None or (
            not self.pending and self.index.token_at(self.cursor) is None
        ):
            found = self._rejoin(tail)
            if found is None:
                self.aligned = False
                return []
            self.cursor, self.run = found
            self.aligned, self.pending = True, []
        if not self.rewrites:
            return self.index.slice(self.cursor, count)
        guess = self.pending[:count]
        position = self.cursor
        while len(guess) < count:
            rewrite = self._rewrite_at(position)
            if rewrite is not None:
                guess.extend(rewrite.new)
                position += len(rewrite.old)
                continue
            token = self.index.token_at(position)
            if token is None or token == _SEPARATOR:
                break
            guess.append(token)
            position += 1
        return guess[:count]

    def _rejoin(self, tail: Sequence[int]) -> tuple[int, int] | None:
        """Where the source goes on after `tail`: near where the output left it when it
        did, learning what it wrote instead; otherwise anywhere (see `NgramIndex.find`)."""
        if self.left_at is not None:
            found = self.index.find_within(tail, self.left_at, self.left_at + REJOIN_WINDOW)
            if found is not None:
                place, run = found
                old = self.index.slice(self.left_at, place - self.left_at)
                # (A document boundary between: not the copy the output left.)
                if len(old) == place - self.left_at and self._learn(old):
                    # A small edit in a copy the output goes on with: the agreement before
                    # it is the evidence for the next guess, not the n-gram it came back
                    # by (traced: each rename's first place cost four or five short steps
                    # of guesses growing from a 2-token agreement).
                    run = max(run, self.left_run)
                    self.resumed = True
                self.left_at, self.since = None, []
                return place, run
        return self.index.find(tail, self.cursor if self.forward else None)

    def _learn(self, old: list[int]) -> bool:
        """The output wrote `since` where the source held `old`: both end in the n-gram it
        came back by; what differs before it is the edit. Whether it was small (at most
        `REWRITE_SPAN` tokens each way): a replacement is then learnt as a rewrite."""
        new = self.since
        same = 0
        while same < min(len(old), len(new)) and old[-1 - same] == new[-1 - same]:
            same += 1
        old, new = old[: len(old) - same], new[: len(new) - same]
        lead = 0
        while lead < min(len(old), len(new)) and old[lead] == new[lead]:
            lead += 1
        old, new = old[lead:], new[lead:]
        if len(old) > REWRITE_SPAN or len(new) > REWRITE_SPAN:
            return False  # a long change is not a repeated edit
        if not old:
            return True  # an insertion: nothing in the source marks where to repeat it
        edit = Rewrite(tuple(old), tuple(new))
        for known in [r for r in self.rewrites if r.old == edit.old]:
            self.rewrites.remove(known)
        self.rewrites.insert(0, edit)
        del self.rewrites[MAX_REWRITES:]
        return True

    def _rewrite_at(self, position: int) -> Rewrite | None:
        first = self.index.token_at(position)
        for rewrite in self.rewrites:
            if rewrite.old[0] == first and all(
                self.index.token_at(position + i) == token
                for i, token in enumerate(rewrite.old[1:], 1)
            ):
                return rewrite
        return None


class AcceptanceTable:
    """For each source and length of agreement so far, decaying counts of guessed tokens
    accepted and of rejections (a verification ends at the first rejected token):
    a = accepted / (accepted + rejections) estimates the chance that the next guessed
    token is accepted, given those before it were. Priors: a long agreement is trusted
    more (1 - 1/(run + 2); a prediction at least 0.9), worth two verifications, so the
    table starts guessing where it probably pays and learns the rest."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Kind, int], list[float]] = {}

    def _entry(self, kind: Kind, run: int) -> list[float]:
        key = (kind, min(run, MAX_RUN))
        entry = self._counts.get(key)
        if entry is None:
            prior = 1 - 1 / (min(run, MAX_RUN) + 2)
            if kind == "prediction":  # the client says the answer repeats it
                prior = max(prior, _PREDICTION_PRIOR)
            entry = self._counts[key] = [2 * prior, 2 * (1 - prior)]
        return entry

    def rate(self, kind: Kind, run: int) -> float:
        accepted, rejections = self._entry(kind, run)
        return accepted / (accepted + rejections)

    def record(self, kind: Kind, run: int, accepted: int, rejected: bool) -> None:
        entry = self._entry(kind, run)
        entry[0] = entry[0] * _DECAY + accepted
        entry[1] = entry[1] * _DECAY + (1 if rejected else 0)


class StepShape:
    """The cost of a decode step of n tokens relative to a step of one, at the context in
    use (`span`: the cells the step's sequence attends over).

    A step costs what it costs on an empty context (`points`, measured on this engine
    before serving, interpolated linearly between sizes and extended beyond the largest
    along its last segment) plus, for each of its tokens, a cost per cell of context
    that depends on the attention kernel llama.cpp picks by the step's size
    (`_KERNEL_EDGES`). Measured here with flash attention (llama.cpp's CPU default;
    Qwen2.5-Coder-0.5B, 2 cores, 3,000 cells): one token goes split over the context
    (22 ms), 2-63 tokens row by row (32 tokens: 329 ms, 63: 618 ms), 64 and more tiled
    (64: 417 ms, 128: 771 ms): a step of 64 costs two thirds of a step of 63.

    Each kernel's cost per token and cell starts from the measure over a short span at
    start (`at_span`, pooled over that kernel's sizes: one size alone is too noisy
    there) and then follows the steps the engine runs (`learn`): the median of the
    last steps' estimates, the measure counting as a few of them (for the one-token
    kernel only until it has a few steps of its own), so it follows the machine's load
    and spans far beyond the measured one, and one slow step (threads waking after
    idle, another process) moves nothing. A kernel nothing has shown yet borrows the
    nearest one's.

    `rows_alone` (flash attention on): the row-by-row kernel's attention per row costs
    at least what a one-token step's does. Measured at 8,600 and 18,700 cells: within
    5 % of each other. Its own estimate comes from the start-up measure over 512 cells
    (attention a tenth of such a step: off by 25 % from one start to the next) until
    guesses run, and the first guesses at an agent's long context were priced from it:
    3-token probes took 2.7-2.9x a one-token step, priced at 2.0-2.2x. The one-token
    step's is learnt from every step."""

    def __init__(self, points: dict[int, float], at_span: dict[int, float] | None = None,
                 span: int = 0, rows_alone: bool = False) -> None:  # fmt: skip
        self._rows_alone = rows_alone
        self._sizes = sorted(points)
        self._seconds = [points[n] for n in self._sizes]
        self._known: dict[int, float] = {}  # asked every step for every length: kept
        # Per kernel: the start-up measure of its cost per token and cell, the estimates
        # of its recent steps, and what the two make (see `_evidence`).
        kernels = len(_KERNEL_EDGES) + 1
        self._measured: list[float | None] = [None] * kernels
        self._seen: list[deque[float]] = [deque(maxlen=_LEARN_WINDOW) for _ in range(kernels)]
        self._per_cell = [0.0] * kernels
        if at_span and span > 0:
            # The measure, pooled per kernel (least squares through the origin: the
            # larger sizes, least noisy, weigh most).
            sums = [[0.0, 0.0] for _ in range(kernels)]
            for n, seconds in at_span.items():
                if n in points:
                    load = n * span
                    sums[_kernel(n)][0] += (seconds - points[n]) * load
                    sums[_kernel(n)][1] += load * load
            for kernel, (product, square) in enumerate(sums):
                if square > 0:
                    self._measured[kernel] = product / square
        self._settle()

    @property
    def per_token_cell(self) -> float:
        """Seconds a cell of context adds to a one-token step."""
        return self._per_cell[0]

    def cost(self, n: int, span: int = 0) -> float:
        one = self._empty(1) + self._per_cell[0] * span
        return (self._empty(n) + self._per_cell[_kernel(n)] * n * span) / one

    def learn(self, tokens: int, span: int, seconds: float) -> None:
        """A step of `tokens` over `span` cells took `seconds`: what it took beyond the
        empty-context measure, per token and cell, is its kernel's evidence. Steps
        larger than the measured sizes (prompt chunks) and short spans (noise) teach
        nothing."""
        if tokens > self._sizes[-1] or span < _LEARN_MIN_SPAN:
            return
        self._seen[_kernel(tokens)].append((seconds - self._empty(tokens)) / (tokens * span))
        self._settle()

    def _evidence(self, kernel: int) -> list[float]:
        """A kernel's recent steps and the measure as `_MEASURE_WEIGHT` more, while the
        window (`_LEARN_WINDOW`) has room for them: real steps soon outvote it."""
        seen, measured = self._seen[kernel], self._measured[kernel]
        if measured is None or (kernel == 0 and len(seen) >= _OWN_STEPS):
            # The one-token step is every guess's yardstick, and its own steps come every
            # step: the measure (over 512 cells, where attention is a tenth of a step)
            # goes once a few are in. Traced at 8,575 cells: it was 50 % high and,
            # counted as four steps, outvoted the real ones together with the slow steps
            # after the prompt's read: 2- and 3-token probes priced at 1.45x and 2.0x a
            # one-token step took 2.05x and 2.9x, the answer 6 % slower.
            return list(seen)
        return [*seen, *[measured] * min(_MEASURE_WEIGHT, _LEARN_WINDOW - len(seen))]

    def _settle(self) -> None:
        evidence = [self._evidence(kernel) for kernel in range(len(self._seen))]
        known = [max(0.0, statistics.median(found)) if found else None for found in evidence]
        for kernel in range(len(known)):
            # Nothing shown for this kernel yet: the nearest one's (the one below first).
            order = sorted(range(len(known)), key=lambda other: (abs(other - kernel), other))
            self._per_cell[kernel] = next((k for k in (known[o] for o in order) if k is not None),
                                          0.0)  # fmt: skip
        if self._rows_alone:
            one, rows = _kernel(1), _kernel(2)
            self._per_cell[rows] = max(self._per_cell[rows], self._per_cell[one])

    def _empty(self, n: int) -> float:
        known = self._known.get(n)
        if known is None:
            known = self._known[n] = _interpolated(self._sizes, self._seconds, n)
        return known


# llama.cpp's CPU flash attention by query rows in the step: one row is split over the
# context, fewer than 64 (GGML_FA_TILE_Q) go row by row, 64 and more tiled.
_KERNEL_EDGES = (2, 64)
# How many of a kernel's recent steps its estimate is the median of, and how many of
# them the start-up measure over a short span counts as (real steps soon outvote it).
_LEARN_WINDOW = 15
_MEASURE_WEIGHT = 4
# One-token steps of its own after which the one-token kernel drops the measure.
_OWN_STEPS = 3


def _kernel(tokens: int) -> int:
    return bisect.bisect_right(_KERNEL_EDGES, tokens)


def _interpolated(sizes: list[int], values: list[float], n: int) -> float:
    """Linear between measured sizes; below the smallest, in proportion to it; beyond the
    largest, along the last segment."""
    if n <= sizes[0] or len(sizes) == 1:
        return values[0] * n / sizes[0]
    for i in range(1, len(sizes)):
        if n <= sizes[i] or i == len(sizes) - 1:
            slope = (values[i] - values[i - 1]) / (sizes[i] - sizes[i - 1])
            return values[i - 1] + slope * (n - sizes[i - 1])
    raise AssertionError("unreachable")


# Spans shorter than this teach the attention term nothing (its share of a step is in the
# noise).
_LEARN_MIN_SPAN = 512


class DraftChoice(NamedTuple):
    length: int  # 0: no guess pays
    value: float  # the step's expected tokens per unit of cost with it
    kept: float  # guessed tokens expected to be kept


def draft_length(rate: float, shape: StepShape, tokens: int, yielded: float, limit: int,
                 span: int = 0) -> DraftChoice:  # fmt: skip
    """The guess length that maximises the step's expected tokens per unit of cost: the
    step so far has `tokens` positions yielding `yielded` tokens; a guess of k adds k
    positions yielding rate + rate**2 + ... + rate**k. Length 0 unless it promises at least
    `MIN_GAIN` more tokens per second: the estimates err, and a guess that misses costs
    every sequence in the step."""
    best = DraftChoice(0, yielded / shape.cost(tokens, span) * (1 + MIN_GAIN), 0.0)
    expected, chance = yielded, 1.0
    for k in range(1, limit + 1):
        chance *= rate
        expected += chance
        value = expected / shape.cost(tokens + k, span)
        if value > best.value:
            best = DraftChoice(k, value, expected - yielded)
    return best


@dataclass
class Drafted:
    """What one verification used: the guess, where it came from, the evidence for it."""

    tokens: list[int]
    kind: Kind
    run: int
    expected: float  # accepted tokens expected of it


@dataclass
class SequenceDrafts:
    """One sequence's draft sources and counts."""

    context: NgramIndex
    followers: list[Follower]
    table: AcceptanceTable
    prompt_length: int
    max_draft: int
    # This sequence's own recent record (decaying): what it adds to the table's rate.
    own_accepted: float = 0.0
    own_rejections: float = 0.0
    # The latest rejection's share of `own_rejections` (faded alike): taken back when it
    # turns out to have been an edit.
    last_miss: float = 0.0
    # Totals for the usage record and the prediction fields of the usage.
    drafted: int = 0
    accepted: int = 0
    prediction_accepted: int = 0
    prediction_rejected: int = 0

    @classmethod
    def start(
        cls,
        prompt: Sequence[int],
        prediction: Sequence[int],
        shared: SharedHistory | None,
        table: AcceptanceTable,
        max_draft: int,
    ) -> SequenceDrafts:
        context = NgramIndex()
        context.extend(prompt)
        followers = []
        rewrites: list[Rewrite] = []
        if prediction:
            index = NgramIndex()
            index.extend(prediction)
            # The answer is expected to start where the prediction starts.
            followers.append(Follower("prediction", index, cursor=0, aligned=True,
                                      forward=True, rewrites=rewrites))  # fmt: skip
        followers.append(Follower("context", context, rewrites=rewrites))
        if shared is not None:
            followers.append(Follower("shared", shared.index, rewrites=rewrites))
        return cls(context, followers, table, len(prompt), max_draft)

    def follow(self, token: int) -> None:
        """A token the sequence now continues with (sampled, accepted or injected)."""
        for follower in self.followers:
            follower.follow(token)
        self.context.extend((token,))

    def output(self) -> list[int]:
        return self.context.tokens[self.prompt_length :]

    def propose(self, shape: StepShape, tokens: int, yielded: float, room: int, span: int = 0
                ) -> Drafted | None:  # fmt: skip
        """A guess of the next tokens worth verifying in a step that has `tokens`
        positions yielding `yielded` tokens so far, over `span` cells, or None."""
        limit = min(self.max_draft, room)
        # The sequence's own record fades step by step, so one that stopped guessing
        # comes back to what the table says (or it would never guess again).
        self.own_accepted *= _OWN_FADE
        self.own_rejections *= _OWN_FADE
        self.last_miss *= _OWN_FADE
        if limit <= 0:
            return None
        tail = self.context.tokens[-max(ORDERS) :]
        # Every source that answers is asked; the guess worth most to the step wins (the
        # client's prediction right after an edit is worth less than a copy the output
        # has agreed with for a while).
        best: Drafted | None = None
        best_value = 0.0
        shown = len(self.context.tokens) - self.prompt_length  # output tokens so far
        for follower in self.followers:
            guess = follower.guess(tail, limit)  # (finding its place sets its run)
            if follower.resumed:
                # The last miss was an edit in a copy the output goes on with: the table's
                # rate at a long agreement counts such edits already; held against the
                # sequence too, it kept the guesses short for the rest of the copy.
                follower.resumed = False
                self.own_rejections = max(0.0, self.own_rejections - self.last_miss)
                self.last_miss = 0.0
            if not guess:
                continue
            agreed = min(follower.run, shown)
            follower.trusted = follower.trusted or agreed >= MAX_RUN
            if follower.kind != "prediction" and not follower.trusted:
                guess = guess[: max(PROBE, agreed)]
            choice = draft_length(self._rate(follower), shape, tokens, yielded, len(guess), span)
            if choice.length == 0 or choice.value <= best_value:
                continue
            kind, run = follower.kind, follower.run
            best = Drafted(guess[: choice.length], kind, run, choice.kept)
            best_value = choice.value
        return best

    def _rate(self, follower: Follower) -> float:
        """The table's rate for this source and agreement, moved by the sequence's own
        recent record (the table's rate counts as `_OWN_PRIOR` verifications): what all
        requests taught, corrected by what this text does."""
        rate = self.table.rate(follower.kind, follower.run)
        if follower.kind == "prediction" and follower.run >= OWN_RUN:
            return rate
        accepted, total = self.own_accepted, self.own_accepted + self.own_rejections
        return (accepted + _OWN_PRIOR * rate) / (total + _OWN_PRIOR)

    def verified(self, drafted: Drafted, accepted: int) -> None:
        rejected = len(drafted.tokens) - accepted
        self.table.record(drafted.kind, drafted.run, accepted, rejected > 0)
        self.own_accepted = self.own_accepted * _OWN_DECAY + accepted
        self.own_rejections = self.own_rejections * _OWN_DECAY + (1 if rejected else 0)
        self.last_miss = 1.0 if rejected else self.last_miss * _OWN_DECAY
        self.drafted += len(drafted.tokens)
        self.accepted += accepted
        if drafted.kind == "prediction":
            self.prediction_accepted += accepted
            self.prediction_rejected += rejected
