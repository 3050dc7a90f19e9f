"""Speculation: the draft sources and the length rule (pure), and the scheduler's
verification on the simulated engine, where a scripted sampler draws from a fixed
distribution with its own random stream, so exactness is checked token for token."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mimoserve.backends.base import SamplingParams
from mimoserve.backends.llamacpp import speculation
from mimoserve.backends.llamacpp.native import step_sizes
from mimoserve.backends.llamacpp.scheduler import MAX_GUESSING_STREAMS
from mimoserve.backends.llamacpp.sequence import DecodeJob, Generated
from mimoserve.backends.llamacpp.speculation import (
    MAX_RUN,
    OWN_RUN,
    PROBE,
    REWRITE_SPAN,
    AcceptanceTable,
    Drafted,
    Kind,
    NgramIndex,
    SequenceDrafts,
    SharedHistory,
    StepShape,
    draft_length,
)
from mimoserve.events import Finished
from mimoserve.parsing.assembler import OutputPlan
from mimoserve.parsing.output import OutputFormat
from tests.backends import fake_engine
from tests.backends.fake_engine import END, VOCAB, Collected, FakeContext

# ---- the sources and the rule ----------------------------------------------------------


def test_an_ngram_finds_the_continuation_of_its_latest_earlier_occurrence() -> None:
    index = NgramIndex()
    index.extend([1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3])
    # The tail [1, 2, 3] itself is not indexed (no continuation yet): the latest earlier one.
    assert index.find([1, 2, 3]) == (8, 3)
    assert index.slice(8, 2) == [5, 7]
    assert index.find([1, 2, 3], after=0) == (3, 3)  # forward: the first at or after 0
    assert index.find([1, 2, 3], after=4) == (8, 3)
    assert index.find([8, 8]) is None


def test_the_longest_ngram_wins() -> None:
    index = NgramIndex(orders=(3, 2))
    index.extend([7, 2, 3, 40, 1, 2, 3, 50])
    assert index.find([1, 2, 3]) == (7, 3)  # the 3-gram, before the 2-gram's later place
    assert index.find([9, 2, 3]) == (7, 2)


def test_the_shared_history_keeps_positions_after_dropping_its_oldest_half() -> None:
    shared = SharedHistory(capacity=64)
    for start in range(0, 200, 10):
        shared.add(list(range(start + 1, start + 11)))
    index = shared.index
    assert len(index.tokens) <= 64
    tail = [193, 194, 195]
    found = index.find(tail)
    assert found is not None and index.slice(found[0], 3) == [196, 197, 198]
    # Documents never run into each other: a draft stops at a boundary.
    found = index.find([198, 199, 200])
    assert found is None or index.slice(found[0], 5) == []


# Qwen2.5-Coder-0.5B's step times on this machine (ms by tokens per step).
CPU_SHAPE = StepShape({1: 19.3, 2: 43.6, 4: 60.4, 8: 85.1, 16: 123.1, 32: 244.7})


def test_a_prediction_is_followed_from_its_start_and_found_again_after_an_edit() -> None:
    prediction = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    drafts = SequenceDrafts.start([1, 2, 3], prediction, None, AcceptanceTable(), max_draft=4)
    guess = drafts.propose(CPU_SHAPE, tokens=1, yielded=1, room=4)
    assert guess is not None and guess.kind == "prediction" and guess.tokens == [10, 11, 12, 13]
    for token in [10, 11, 99, 100]:  # two tokens agree, then the answer departs
        drafts.follow(token)
    assert drafts.followers[0].aligned is False
    for token in [14, 15, 16]:  # ... and rejoins it further on
        drafts.follow(token)
    follower = drafts.followers[0]
    assert follower.guess(drafts.context.tokens[-4:], 3) == [17, 18, 19]
    assert follower.run == 3  # the 3-gram it was found by


def test_agreement_is_counted_while_decoding_without_guesses() -> None:
    drafts = SequenceDrafts.start([5, 6, 7, 8, 9, 1, 2, 3], [], None, AcceptanceTable(), 8)
    own = drafts.followers[0]
    assert own.guess(drafts.context.tokens[-4:], 4) == []  # [1, 2, 3] has no earlier copy
    for token in [5, 6, 7]:
        drafts.follow(token)
    assert own.guess(drafts.context.tokens[-4:], 2) == [8, 9]
    for token in [8, 9]:
        drafts.follow(token)
    assert own.aligned and own.run == 5  # found by the 3-gram [5, 6, 7], then 8 and 9 agreed


def test_the_guess_length_maximises_expected_tokens_per_cost() -> None:
    # One stream: the first guessed token moves the step off the one-token fast path
    # (19 -> 44 ms), so only a long, likely guess pays.
    assert draft_length(0.5, CPU_SHAPE, tokens=1, yielded=1, limit=32).length == 0
    assert draft_length(0.8, CPU_SHAPE, tokens=1, yielded=1, limit=32).length == 0
    long_run = draft_length(0.97, CPU_SHAPE, tokens=1, yielded=1, limit=32).length
    assert 8 <= long_run <= 32
    # Eight streams already in the step: the gain a guess promises is thin, and must be
    # at least MIN_GAIN: only near-certain guesses go in.
    assert draft_length(0.8, CPU_SHAPE, tokens=8, yielded=8, limit=32).length == 0
    assert draft_length(0.995, CPU_SHAPE, tokens=8, yielded=8, limit=32).length > 0
    assert CPU_SHAPE.cost(1) == 1 and CPU_SHAPE.cost(64) > CPU_SHAPE.cost(32)


# Measured on this machine (Qwen2.5-Coder-0.5B, 2 threads): seconds of a step of n tokens
# of one sequence over 0 and 8,192 cells of context.
EMPTY = {1: 0.0146, 2: 0.0346, 4: 0.0458, 8: 0.0624, 16: 0.0780, 32: 0.1540, 64: 0.2677}
AT_8K = {1: 0.0335, 2: 0.0733, 4: 0.1162, 8: 0.1969, 16: 0.3402, 32: 0.6750, 64: 0.7728}


def test_the_step_shape_learns_what_a_long_context_adds_to_each_token() -> None:
    shape = StepShape(EMPTY)
    assert shape.cost(16, span=8192) == pytest.approx(shape.cost(16))  # nothing learnt yet
    for _ in range(3):  # steps the engine ran at 8,192 cells
        for n, seconds in AT_8K.items():
            if n < 64:  # llama.cpp takes another path at 64 here; the rest are linear
                shape.learn(n, 8192, seconds)
    shape.learn(512, 8192, 9.9)  # a prompt chunk: beyond the measured sizes, ignored
    shape.learn(8, 100, 9.9)  # a short span: noise, ignored
    assert shape.per_token_cell == pytest.approx(2.1e-6, rel=0.1)  # ~2.1 ms per 1,000 cells
    for n in (2, 4, 8, 16, 32):
        measured = AT_8K[n] / AT_8K[1]
        assert shape.cost(n, span=8192) == pytest.approx(measured, rel=0.2), n
    assert shape.cost(16) == pytest.approx(EMPTY[16] / EMPTY[1])  # an empty context as before


def test_a_long_context_shortens_or_drops_the_guess() -> None:
    """The Codex replay's case: at 8k cells a guess costs about twice what the empty
    context's measure says; guesses the empty shape would take no longer pay."""
    shape = StepShape(EMPTY)
    for n, seconds in AT_8K.items():
        if n < 64:
            shape.learn(n, 8192, seconds)
    near, far = (draft_length(0.9, shape, tokens=1, yielded=1, limit=32, span=s)
                 for s in (0, 8192))  # fmt: skip
    assert near.length > 0 and far.length < near.length
    assert far.value < near.value


# Measured here with flash attention, llama.cpp's CPU default (Qwen2.5-Coder-0.5B, 2
# threads, seconds by step size): over an empty context and after 2,000 cells. From 64
# query rows llama.cpp's kernel is tiled: a step of 64 costs less than a step of 63.
FA_EMPTY = {1: 0.0142, 2: 0.0334, 16: 0.0729, 32: 0.1449, 48: 0.2022, 63: 0.2755,
            64: 0.2502, 65: 0.2887}  # fmt: skip
FA_AT_2000 = {1: 0.0190, 2: 0.0450, 16: 0.1340, 32: 0.2650, 48: 0.3700, 63: 0.4960,
              64: 0.3420, 65: 0.4110}  # fmt: skip


def test_the_step_shape_measured_at_a_span_keeps_the_tile_edge() -> None:
    shape = StepShape(FA_EMPTY, FA_AT_2000, span=2000)
    for n, seconds in FA_AT_2000.items():  # pooled per kernel: close, not exact
        assert shape.cost(n, span=2000) == pytest.approx(seconds / FA_AT_2000[1], rel=0.15)
    for span in (2000, 8000):
        assert shape.cost(64, span) < shape.cost(63, span)
        assert shape.cost(32, span) < shape.cost(64, span) < 2 * shape.cost(32, span)


def test_a_likely_copy_is_guessed_up_to_a_whole_tile() -> None:
    """A long copy at 2,000 cells: one decoding token and 63 guessed fill the tile. A
    shape that knows only the row-by-row kernel's cost (one cost per token and cell
    for every size: the edge unseen) stops far short of it."""
    measured = StepShape(FA_EMPTY, FA_AT_2000, span=2000)
    row_by_row = StepShape(FA_EMPTY)
    for _ in range(3):
        for n in (16, 32, 48, 63):
            row_by_row.learn(n, 2000, FA_AT_2000[n])
    assert draft_length(0.99, measured, tokens=1, yielded=1, limit=64, span=2000).length == 63
    assert draft_length(0.99, row_by_row, tokens=1, yielded=1, limit=64, span=2000).length < 48
    # Just past the tile the step costs more again: never 64 guessed of 64 allowed.
    assert draft_length(0.999, measured, tokens=1, yielded=1, limit=64, span=2000).length == 63


def test_the_engines_steps_correct_their_kernels_term() -> None:
    """The start-up measure is short and noisy: steps the engine runs over long contexts
    soon outweigh it, each for its own kernel (here, row-by-row steps take twice
    the attention measured; the one-token and tiled steps as measured)."""
    shape = StepShape(FA_EMPTY, FA_AT_2000, span=2000)
    before = {n: shape.cost(n, 8000) for n in (1, 16, 32, 64)}
    extra = {n: (FA_AT_2000[n] - FA_EMPTY[n]) / 2000 for n in (1, 16, 32, 64)}
    for _ in range(5):
        for n in (1, 16, 32, 64):
            twice = 2 if n in (16, 32) else 1
            shape.learn(n, 8000, FA_EMPTY[n] + twice * 8000 * extra[n])
    assert shape.cost(64, 8000) == pytest.approx(before[64], rel=0.1)
    for n in (16, 32):
        grown = (FA_EMPTY[n] + 2 * 8000 * extra[n]) / (FA_EMPTY[1] + 8000 * extra[1])
        assert shape.cost(n, 8000) == pytest.approx(grown, rel=0.15)
        assert shape.cost(n, 8000) > 1.5 * before[n]


def test_one_slow_step_moves_nothing() -> None:
    """Seen in the Codex replay: the first one-token step after idle (threads waking)
    took twice its time; fitted, it made single steps look dear and every guess cheap."""
    shape = StepShape(FA_EMPTY, FA_AT_2000, span=2000)
    measured = shape.per_token_cell
    usual = FA_EMPTY[1] + 8600 * measured
    shape.learn(1, 8600, 2 * usual)
    assert shape.per_token_cell == pytest.approx(measured)
    for _ in range(10):  # ... while the steps that follow are heard
        shape.learn(1, 8600, FA_EMPTY[1] + 8600 * 2 * measured)
    assert shape.per_token_cell == pytest.approx(2 * measured)


def test_slow_one_token_steps_do_not_make_guesses_cheap() -> None:
    """Traced on a fresh server at Codex's 8,575 cells (steps' seconds as recorded): the
    start-up measure put a one-token step's attention 50 % above what the steps then
    took, and the first steps after the prompt was read, and after idle, were slower
    still. Priced from the median of those, 2- and 3-token probes looked worth 1.45x
    and 2.0x a one-token step; they took 2.05x and 2.9x, and the answer came 6 % later."""
    empty = {1: 0.0197, 2: 0.0356, 4: 0.0476, 8: 0.0804, 16: 0.1284, 32: 0.2161,
             63: 0.4245, 64: 0.3963}  # fmt: skip
    at_512 = {n: seconds + n * 512 * (5.1e-6 if n == 1 else 3.3e-6)
              for n, seconds in empty.items()}  # fmt: skip
    shape = StepShape(empty, at_512, span=512)
    for seconds in (0.0891, 0.2501, 0.0496, 0.0486, 0.0487, 0.0486, 0.0528, 0.0769):
        shape.learn(1, 8575, seconds)
    assert shape.cost(2, 8575) == pytest.approx(0.1007 / 0.0486, rel=0.15)
    assert shape.cost(3, 8575) == pytest.approx(0.1408 / 0.0486, rel=0.15)
    # A probe the fresh table rates as likely as its 2-token agreement says: not worth it.
    rate = AcceptanceTable().rate("shared", 2)
    assert draft_length(rate, shape, tokens=1, yielded=1, limit=4, span=8575).length == 0


def test_with_flash_attention_a_guessed_row_attends_like_a_one_token_step() -> None:
    """Traced on a fresh server at Codex's 8,575 cells: the start-up measure over 512
    cells put the row-by-row kernel's cost per cell at 2.6e-6 (3.3e-6 on another
    start; 3.55e-6 learnt later), and 3-token probes priced from it took 2.7-2.9x a
    one-token step. With flash attention each row costs what a one-token step's
    attention costs (within 5 % at 8,600 and 18,700 cells): no cheaper than that."""
    empty = {1: 0.0197, 2: 0.0356, 4: 0.0476, 8: 0.0804, 16: 0.1284, 32: 0.2161,
             63: 0.4245, 64: 0.3963}  # fmt: skip
    at_512 = {n: seconds + n * 512 * (3.4e-6 if n == 1 else 2.6e-6)
              for n, seconds in empty.items()}  # fmt: skip
    flash, plain = (StepShape(empty, at_512, span=512, rows_alone=on) for on in (True, False))
    for shape in (flash, plain):
        for _ in range(8):
            shape.learn(1, 8575, 0.0486)
    assert flash.cost(3, 8575) == pytest.approx(0.1408 / 0.0486, rel=0.1)
    rate = AcceptanceTable().rate("shared", 5)
    assert draft_length(rate, flash, tokens=1, yielded=1, limit=4, span=8575).length == 0
    # Without flash attention rows are multiplied together (cheaper each): as measured.
    assert plain.cost(3, 8575) < 0.85 * flash.cost(3, 8575)
    # The tiled kernel keeps its own cost either way.
    assert flash.cost(64, 8575) == pytest.approx(plain.cost(64, 8575))


def test_a_kernel_nothing_has_shown_borrows_the_nearest() -> None:
    # No measure at a span: what one-token steps teach prices the others until they run.
    shape = StepShape(FA_EMPTY)
    assert shape.cost(32, 8000) == pytest.approx(shape.cost(32))
    shape.learn(1, 8000, 0.0335)
    per_cell = (0.0335 - FA_EMPTY[1]) / 8000
    assert shape.per_token_cell == pytest.approx(per_cell)
    expected = (FA_EMPTY[32] + per_cell * 32 * 8000) / 0.0335
    assert shape.cost(32, 8000) == pytest.approx(expected)
    assert shape.cost(64, 8000) > shape.cost(64)
    # Noise can make a measured size look no slower over the span (it made the scale
    # fit divide by zero in the scheduler thread once): pooled, nothing breaks.
    noisy = StepShape(FA_EMPTY, {**FA_AT_2000, 16: FA_EMPTY[16] * 0.99}, span=2000)
    noisy.learn(16, 3000, 0.2)
    assert noisy.cost(16, 3000) > noisy.cost(16)


def test_the_sizes_measured_reach_the_longest_step_the_limit_allows() -> None:
    assert step_sizes(64) == (1, 2, 4, 8, 16, 32, 63, 64, 65)
    assert step_sizes(8) == (1, 2, 4, 8, 9)
    assert step_sizes(100)[-3:] == (65, 96, 101)


@pytest.mark.parametrize("flash_attn", [True, False])
def test_a_guess_is_priced_at_the_cells_its_sequence_sees(
    monkeypatch: pytest.MonkeyPatch, flash_attn: bool
) -> None:
    """llama.cpp's flash attention skips other sequences' cells: a short sequence beside
    a long one is priced at its own length, not at the pool's cells in use. Without it
    (`--flash-attn off`) every cell in use is multiplied: priced at those."""
    spans: dict[int, list[int]] = {}
    original = SequenceDrafts.propose

    def propose(self: SequenceDrafts, *args: Any) -> Any:
        spans.setdefault(self.prompt_length, []).append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(SequenceDrafts, "propose", propose)
    scheduler, _ = fake_engine.fake_scheduler(max_draft=8, step_shape=CPU_SHAPE,
                                              pool_cells=1024, seq_ctx=512,
                                              attends_pool=not flash_attn)  # fmt: skip
    try:
        outs = []
        for prompt in ([1 + i % 8 for i in range(300)], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]):
            out = Collected()
            job = DecodeJob(prompt=prompt, sampling=SamplingParams(temperature=0, max_tokens=40,
                            seed=1), emit=out)  # fmt: skip
            out.job = job
            outs.append(out)
            scheduler.submit(job)
        for out in outs:
            out.wait()
    finally:
        scheduler.stop()
    assert spans[300] and min(spans[300]) >= 299  # the cells before its next token
    if flash_attn:
        assert spans[10] and max(spans[10]) < 10 + 40
    else:  # the long one's cells stay in the pool (cached) however the two interleave
        assert spans[10] and min(spans[10]) >= 300


def test_only_steps_of_one_decoding_sequence_teach_the_shape() -> None:
    """A prompt chunk computes logits for its last token alone (cheaper than as many
    guessed tokens, which all need theirs): it must not teach the step shape."""
    taught: list[tuple[int, int]] = []

    class Recording(StepShape):
        def learn(self, tokens: int, span: int, seconds: float) -> None:
            taught.append((tokens, span))
            super().learn(tokens, span, seconds)

    shape = Recording(FA_EMPTY, FA_AT_2000, span=2000)
    scheduler, _ = fake_engine.fake_scheduler(max_draft=8, step_shape=shape, pool_cells=2048,
                                              seq_ctx=1024)  # fmt: skip
    try:
        out = Collected()
        prompt = [1 + (i * 7 + i // 9) % 62 for i in range(700)]  # read in chunks of 64
        job = DecodeJob(prompt=prompt, sampling=SamplingParams(temperature=0, max_tokens=12,
                        seed=3), emit=out)  # fmt: skip
        out.job = job
        scheduler.submit(job)
        out.wait()
    finally:
        scheduler.stop()
    assert taught, "decode steps over the prompt teach"
    assert all(span >= 700 for _, span in taught)  # none of the prompt's own chunks


def test_the_table_learns_from_verifications() -> None:
    table = AcceptanceTable()
    before = table.rate("shared", 2)
    for _ in range(20):
        table.record("shared", 2, accepted=0, rejected=True)
    assert table.rate("shared", 2) < before / 4
    assert table.rate("context", 16) > 0.9 and table.rate("prediction", 0) >= 0.9


# ---- verification in the scheduler -----------------------------------------------------


class ScriptedSampler:
    """Draws from a fixed distribution given the token at the sampled position: mostly
    the next of a short cycle (text worth copying), sometimes any token, with its own
    random stream, one draw per call, as llama.cpp's `dist` sampler. Greedy: always the
    cycle's next."""

    constrained = False

    def __init__(self, seed: int, temperature: float) -> None:
        self._random = random.Random(seed)
        self._greedy = temperature <= 0

    def sample(self, context: Any, batch_index: int) -> int:
        assert isinstance(context, FakeContext)
        _, _, token = context.context_of(batch_index)
        draw = self._random.random()
        if self._greedy or draw < 0.8:
            return 1 + token % 8
        return self._random.randrange(1, VOCAB)

    def sample_constrained(self, context: Any, batch_index: int, banned: list[int]) -> int | None:
        return self.sample(context, batch_index)

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        fake_engine,
        "new_sampler",
        lambda sampling, seed, grammar: ScriptedSampler(seed, sampling.temperature),
    )


def run(
    prompt: list[int], *, max_draft: int, seed: int, temperature: float = 0.8,
    max_tokens: int = 60, prediction: list[int] | None = None, stop: tuple[str, ...] = (),
    n: int = 1,
) -> tuple[list[Collected], FakeContext]:  # fmt: skip
    scheduler, context = fake_engine.fake_scheduler(
        max_draft=max_draft, n_batch=64, step_shape=CPU_SHAPE
    )
    try:
        outs = []
        for choice in range(n):
            out = Collected()
            sampling = SamplingParams(
                temperature=temperature, max_tokens=max_tokens, seed=seed + choice, stop=stop
            )
            job = DecodeJob(prompt=prompt, sampling=sampling, emit=out,
                            prediction=list(prediction or []))  # fmt: skip
            out.job = job
            outs.append(out)
            scheduler.submit(job)
        for out in outs:
            out.wait()
        return outs, context
    finally:
        scheduler.stop()


def tokens_of(out: Collected) -> list[int]:
    return [int(piece) for piece in out.text.strip("<>").split("><")] if out.text else []


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_guesses_change_how_many_steps_never_which_tokens(temperature: float) -> None:
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    kept, steps_saved = 0, 0
    for seed in range(12):
        plain, plain_ctx = run(prompt, max_draft=0, seed=seed, temperature=temperature)
        fast, fast_ctx = run(prompt, max_draft=8, seed=seed, temperature=temperature)
        assert fast[0].text == plain[0].text, seed
        usage = fast[0].wait().usage
        assert usage.completion_tokens == plain[0].wait().usage.completion_tokens
        kept += usage.accepted_draft_tokens
        steps_saved += len(plain_ctx.batches) - len(fast_ctx.batches)
    assert kept > 0 and steps_saved > 0
    if temperature == 0:  # the cycle is copied whole: most steps yield several tokens
        assert len(fast_ctx.batches) * 3 < len(plain_ctx.batches)


def test_stop_strings_n_and_the_end_stay_exact_with_guesses() -> None:
    prompt = [3, 4, 5, 6, 7, 8, 1, 2]
    plain, _ = run(prompt, max_draft=0, seed=5, stop=("<7><8>",), n=2)
    fast, _ = run(prompt, max_draft=8, seed=5, stop=("<7><8>",), n=2)
    for a, b in zip(plain, fast, strict=True):
        assert a.text == b.text and a.wait().reason == b.wait().reason
        assert a.wait().stop_sequence == b.wait().stop_sequence


def test_each_token_arrives_as_its_own_step_in_order() -> None:
    (plain,), _ = run([1, 2, 3, 4, 5, 6, 7, 8], max_draft=0, seed=1, temperature=0)
    (fast,), _ = run([1, 2, 3, 4, 5, 6, 7, 8], max_draft=8, seed=1, temperature=0)

    def shape(out: Collected) -> list[tuple[int, tuple[Any, ...]]]:
        return [(e.tokens, e.events) for e in out.events if isinstance(e, Generated)]

    assert shape(fast) == shape(plain)


def test_a_right_prediction_is_accepted_and_a_wrong_one_changes_nothing() -> None:
    prompt = [9, 10, 11]
    (plain,), plain_ctx = run(prompt, max_draft=0, seed=3, max_tokens=40)
    answer = tokens_of(plain)
    (right,), right_ctx = run(prompt, max_draft=16, seed=3, max_tokens=40, prediction=answer)
    usage = right.wait().usage
    assert right.text == plain.text
    assert usage.accepted_prediction_tokens >= len(answer) // 2
    assert len(right_ctx.batches) < len(plain_ctx.batches)
    wrong = [VOCAB - 2] * 30
    (guessed,), _ = run(prompt, max_draft=16, seed=3, max_tokens=40, prediction=wrong)
    assert guessed.text == plain.text
    assert guessed.wait().usage.rejected_prediction_tokens > 0
    assert guessed.wait().usage.accepted_prediction_tokens == 0


def test_rejected_guesses_leave_no_cells_behind() -> None:
    # The simulated pool asserts on every decode that a sequence attends to exactly its
    # earlier positions, once each: a stale guessed cell would fail the next step.
    (out,), context = run([1, 2, 3, 4, 5, 6, 7, 8], max_draft=8, seed=7, temperature=1.0)
    finished = out.wait()
    assert isinstance(finished, Finished)
    assert finished.usage.draft_tokens > finished.usage.accepted_draft_tokens > 0
    assert not any(t == END for t, *_ in context.batches[-1])


def test_guesses_stay_within_the_context_and_the_tokens_left() -> None:
    # A prompt that fills most of a 256-token context: the answer may use the rest, and
    # no guessed position may pass the context (llama.cpp refuses such a batch).
    prompt = [1 + i % 8 for i in range(200)]
    # Steps that cost little more with more tokens (as on a GPU): guesses as long as allowed.
    flat = StepShape({1: 1.0, 2: 1.05, 64: 1.5})
    scheduler, context = fake_engine.fake_scheduler(
        max_draft=32, step_shape=flat, pool_cells=1024, seq_ctx=256
    )
    try:
        out = Collected()
        sampling = SamplingParams(temperature=0, seed=1)
        # A right prediction longer than what is left: long guesses, up to the end.
        answer = [1 + (prompt[-1] + i) % 8 for i in range(200)]
        job = DecodeJob(prompt=prompt, sampling=sampling, emit=out, prediction=answer)
        out.job = job
        scheduler.submit(job)
        finished = out.wait()
    finally:
        scheduler.stop()
    assert finished.reason == "length" and finished.usage.completion_tokens == 256 - 200
    assert finished.usage.accepted_draft_tokens > 0
    assert max(pos for batch in context.batches for _, pos, _, _ in batch) < 256


def test_the_thinking_budget_closes_the_block_at_the_same_token_with_guesses() -> None:
    def events(max_draft: int) -> tuple[list[Any], Finished]:
        scheduler, _ = fake_engine.fake_scheduler(max_draft=max_draft, step_shape=CPU_SHAPE)
        try:
            out = Collected()
            sampling = SamplingParams(temperature=0, max_tokens=80, seed=2)
            plan = OutputPlan(OutputFormat(think=True, start_in_think=True))
            job = DecodeJob(prompt=[1, 2, 3, 4, 5, 6, 7, 8, 1, 2], sampling=sampling, emit=out,
                            in_think=True, think_budget=20, plan=plan)  # fmt: skip
            out.job = job
            scheduler.submit(job)
            finished = out.wait()
            return [e for g in out.events if isinstance(g, Generated) for e in g.events], finished
        finally:
            scheduler.stop()

    plain, plain_end = events(0)
    guessed, guessed_end = events(32)
    assert guessed == plain
    assert guessed_end.usage.reasoning_tokens == plain_end.usage.reasoning_tokens == 20
    assert guessed_end.usage.accepted_draft_tokens > 0


def test_a_sequence_whose_guesses_miss_stops_guessing_whatever_the_table_says() -> None:
    table = AcceptanceTable()
    for run in range(MAX_RUN + 1):  # other requests taught that agreements are kept
        for _ in range(50):
            table.record("context", run, accepted=16, rejected=False)
    prompt = [*range(100, 200)]
    drafts = SequenceDrafts.start(prompt, [], None, table, max_draft=32)
    guessed = []
    for start in range(100, 190, 10):  # this text agrees for a few tokens, then leaves
        for token in range(start, start + 3):
            drafts.follow(token)
        guess = drafts.propose(CPU_SHAPE, tokens=1, yielded=1, room=32)
        guessed.append(guess is not None)
        if guess is not None:
            drafts.verified(guess, accepted=0)
        drafts.follow(7)
    assert guessed[0] and not any(guessed[-3:])


def test_a_prediction_followed_after_a_miss_is_guessed_again() -> None:
    """The first guess of a prediction missed (the answer's code fence tokenised another
    way); the answer then follows the prediction: after `OWN_RUN` tokens the miss no
    longer holds its guesses back. The same text copied from the prompt stays held
    back: the engine's own sources have no client vouching for them."""

    def lengths(prompt: list[int], prediction: list[int]) -> list[int]:
        drafts = SequenceDrafts.start(prompt, prediction, None, AcceptanceTable(), 64)
        kind: Kind = "prediction" if prediction else "context"
        drafts.follow(299)
        drafts.follow(300)
        drafts.verified(Drafted([301, 302], kind, 2, expected=1.5), accepted=0)
        drafts.follow(7)  # not the guess
        found = []
        for token in range(301, 301 + OWN_RUN + 2):
            drafts.follow(token)
            guess = drafts.propose(CPU_SHAPE, tokens=1, yielded=1, room=64)
            found.append(len(guess.tokens) if guess is not None else 0)
        return found

    predicted = lengths([1, 2, 3], [299, 300, *range(301, 400)])
    assert predicted[0] == 0 and predicted[-1] > 0
    assert lengths([299, 300, *range(301, 400), 1, 2, 3], []) == [0] * (OWN_RUN + 2)


def test_steps_with_more_than_two_decoding_streams_carry_no_guesses() -> None:
    # Measured: with 8 streams, guesses the table rated worth it cost 15 % of throughput.
    def positions_per_sequence(context: Any) -> list[dict[int, int]]:
        steps = []
        for batch in context.batches[1:]:  # after the step that read the prompts
            count: dict[int, int] = {}
            for _, _, seq, _ in batch:
                count[seq] = count.get(seq, 0) + 1
            steps.append(count)
        return steps

    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    _, two = run(prompt, max_draft=8, seed=2, temperature=0, n=MAX_GUESSING_STREAMS)
    assert any(max(step.values()) > 1 for step in positions_per_sequence(two))
    _, three = run(prompt, max_draft=8, seed=2, temperature=0, n=MAX_GUESSING_STREAMS + 1)
    crowded = [s for s in positions_per_sequence(three) if len(s) > MAX_GUESSING_STREAMS]
    assert crowded and all(max(step.values()) == 1 for step in crowded)


# A step costs about the same whatever its size: the guess is as long as its source.
FLAT_SHAPE = StepShape({1: 1.0, 128: 1.1})


def test_a_sequence_probes_before_its_text_has_shown_that_it_copies() -> None:
    """Other requests taught that a short agreement is kept (a file copied back), but
    this answer agrees only through the chat template's tail: its first guess is a
    probe of `PROBE` tokens, however likely the table says it is; then it guesses no
    further than the output has followed the source, until that is MAX_RUN tokens;
    from there a divergence (an edit in the copy) does not bring the probes back."""
    table = AcceptanceTable()
    for run in range(MAX_RUN + 1):
        for _ in range(20):
            table.record("context", run, accepted=64, rejected=False)
    prompt = [1, 2, 3, *range(200, 300), 1, 2]
    drafts = SequenceDrafts.start(prompt, [], None, table, max_draft=64)
    drafts.follow(3)  # the answer's first token: [1, 2, 3] matched, mostly prompt
    lengths: list[int] = []
    while len(lengths) < 4:
        guess = drafts.propose(FLAT_SHAPE, tokens=1, yielded=1, room=64)
        assert guess is not None and guess.kind == "context"
        lengths.append(len(guess.tokens))
        drafts.verified(guess, accepted=len(guess.tokens))
        for token in guess.tokens:
            drafts.follow(token)
    # 1 output token agreed: a probe; then 5, 10 agreed; then 20 >= MAX_RUN: whole.
    assert lengths[:3] == [PROBE, 5, 10] and lengths[3] > MAX_RUN
    drafts.follow(7)  # the output leaves the copy ...
    for token in [203, 204, 205]:  # ... and comes back to it
        drafts.follow(token)
    guess = drafts.propose(FLAT_SHAPE, tokens=1, yielded=1, room=64)
    assert guess is not None and len(guess.tokens) > MAX_RUN


def test_a_prediction_or_a_long_agreement_needs_no_probe() -> None:
    table = AcceptanceTable()
    for _ in range(20):
        table.record("context", MAX_RUN, accepted=64, rejected=False)
    predicted = SequenceDrafts.start([7, 8, 9], list(range(300, 364)), None, table, 64)
    guess = predicted.propose(FLAT_SHAPE, tokens=1, yielded=1, room=64)
    assert guess is not None and guess.kind == "prediction" and len(guess.tokens) > PROBE
    # An output that has followed the prompt for MAX_RUN tokens, its guesses unused (a
    # step without room for them).
    copied = SequenceDrafts.start([*range(400, 480)], [], None, table, 64)
    for token in range(400, 400 + MAX_RUN + 4):
        copied.propose(FLAT_SHAPE, tokens=1, yielded=1, room=64)
        copied.follow(token)
    guess = copied.propose(FLAT_SHAPE, tokens=1, yielded=1, room=64)
    assert guess is not None and guess.kind == "context" and len(guess.tokens) > PROBE


def _copying(prompt: list[int], written: list[int]) -> SequenceDrafts:
    """Drafts for an answer that has written `written` so far."""
    drafts = SequenceDrafts.start(prompt, [], None, AcceptanceTable(), max_draft=64)
    for token in written:
        drafts.propose(FLAT_SHAPE, tokens=1, yielded=1, room=64)  # (guessing moves no place)
        drafts.follow(token)
    return drafts


def test_after_an_edit_the_copy_goes_on_where_it_left_the_source() -> None:
    """The n-gram the output comes back by ([7, 8]) is also earlier in the file, and
    latest in the copy written so far, whose continuation is already passed."""
    source = [*range(100, 110), 7, 8, *range(110, 120), 50, 7, 8, *range(120, 130)]
    drafts = _copying(source, [*range(100, 110), 7, 8, *range(110, 120), 60, 7, 8])
    own = drafts.followers[0]
    assert own.guess(drafts.context.tokens[-4:], 5) == [120, 121, 122, 123, 124]


def test_an_edit_the_answer_made_is_made_again_in_later_guesses_until_it_is_not() -> None:
    """A name (50) renamed to two tokens (60, 61) where the copy first meets it: the
    guesses rename it further on; where the answer keeps the old name, they stop."""
    file = [*range(100, 120), 50, *range(120, 130), 50, *range(130, 140), 50,
            *range(140, 150), 50, *range(150, 160), 50, *range(160, 170)]  # fmt: skip
    drafts = _copying(file, [*range(100, 120), 60, 61, 120, 121])
    own = drafts.followers[0]
    guess = own.guess(drafts.context.tokens[-4:], 22)
    assert guess == [*range(122, 130), 60, 61, *range(130, 140), 60, 61]
    for token in guess:  # the answer writes what was guessed: one agreement throughout
        drafts.follow(token)
    # One agreement throughout, which goes on from the 20 tokens before the edit.
    assert own.aligned and own.run == 20 + len(guess)
    for token in [*range(140, 150), 50]:  # here the answer keeps the name
        drafts.follow(token)
    assert own.aligned
    assert own.guess(drafts.context.tokens[-4:], 13) == [*range(150, 160), 50, 160, 161]


def test_after_a_small_edit_the_copy_is_guessed_as_far_as_before_it() -> None:
    """Other requests taught that a copy followed for long is kept and a two-token
    agreement is not. After a one-token rename 40 tokens into a copy, the copy comes back
    by a 2-gram: the agreement before the edit is the evidence, so the next guess is a
    long one. After a change longer than `REWRITE_SPAN` the output has not shown that
    it goes on copying: the 2-gram alone speaks, and nothing is guessed."""
    table = AcceptanceTable()
    for _ in range(50):
        table.record("context", 2, accepted=0, rejected=True)
        table.record("context", MAX_RUN, accepted=64, rejected=False)
    file = [*range(100, 140), 50, *range(140, 240)]

    def next_guess(written: list[int]) -> int:
        drafts = SequenceDrafts.start(file, [], None, table, max_draft=64)
        for token in written:
            drafts.propose(CPU_SHAPE, tokens=1, yielded=1, room=64)
            drafts.follow(token)
        guess = drafts.propose(CPU_SHAPE, tokens=1, yielded=1, room=64)
        return len(guess.tokens) if guess is not None else 0

    assert next_guess([*range(100, 140), 60, 140, 141]) >= 32
    long_change = [*range(300, 300 + REWRITE_SPAN + 1)]
    assert next_guess([*range(100, 140), *long_change, 140, 141]) == 0


def _guess_lengths(file: list[int], answer: list[int]) -> list[tuple[int, int]]:
    """(guessed, kept) per step of a greedy engine writing `answer` with `file` in its
    prompt, on a fresh table."""
    drafts = SequenceDrafts.start(file, [], None, AcceptanceTable(), max_draft=64)
    drafts.follow(answer[0])
    written, steps = 1, []
    while written < len(answer):
        room = min(64, len(answer) - written - 1)
        guess = drafts.propose(CPU_SHAPE, tokens=1, yielded=1, room=room,
                               span=len(file) + written)  # fmt: skip
        kept = 0
        if guess is not None:
            while kept < len(guess.tokens) and guess.tokens[kept] == answer[written + kept]:
                kept += 1
            drafts.verified(guess, kept)
        steps.append((len(guess.tokens) if guess is not None else 0, kept))
        for token in answer[written : written + kept + 1]:
            drafts.follow(token)
        written += kept + 1
    return steps


def test_a_miss_at_a_small_edit_does_not_hold_the_copy_back() -> None:
    """A 400-token file with one name (50) renamed to two tokens: the guess that meets
    the name misses, and once the copy is found again after it, the next guesses are
    as long as before the edit (the miss was the edit, which the table's rate at a long
    agreement allows for), not a fresh start (traced before: 15-token guesses for the
    rest of the file, the sequence's own record holding the miss against it)."""
    file = [*range(100, 300), 50, *range(300, 500)]
    answer = [t for token in file for t in ((55, 56) if token == 50 else (token,))]
    steps = _guess_lengths(file, answer)
    missed = next(i for i, (guessed, kept) in enumerate(steps) if kept < guessed)
    before = steps[missed - 1][0]
    after = next(guessed for guessed, _ in steps[missed + 1 :] if guessed)
    assert before >= 32 and after >= 32


def test_a_dropped_span_is_dropped_again_and_a_long_change_is_not_learnt() -> None:
    file = [*range(100, 120), 5, 6, *range(120, 130), 5, 6, *range(130, 140)]
    drafts = _copying(file, [*range(100, 120), 120, 121, 122])
    own = drafts.followers[0]
    assert own.guess(drafts.context.tokens[-4:], 12) == [*range(123, 130), *range(130, 135)]
    rewritten = [*range(100, 120), *range(300, 300 + 20), 120, 121]
    drafts = _copying(file, rewritten)
    own = drafts.followers[0]
    assert own.guess(drafts.context.tokens[-4:], 12) == [*range(122, 130), 5, 6, 130, 131]


class CopyingSampler:
    """Writes `answer` (then the end): the token sampled after output position i is
    answer[i + 1], whatever was guessed."""

    constrained = False

    def __init__(self, prompt_length: int, answer: list[int]) -> None:
        self._prompt_length, self._answer = prompt_length, answer

    def sample(self, context: Any, batch_index: int) -> int:
        assert isinstance(context, FakeContext)
        _, position, _ = context.context_of(batch_index)
        written = position + 1 - self._prompt_length  # output tokens before this one
        return self._answer[written] if written < len(self._answer) else END

    def sample_constrained(self, context: Any, batch_index: int, banned: list[int]) -> int | None:
        return self.sample(context, batch_index)

    def close(self) -> None:
        pass


def test_a_repeated_rename_is_guessed_and_the_answer_stays_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file whose name (50) the answer renames to two tokens (55, 56) at each of its
    four places: with rewrites the later places are guessed, in fewer steps than
    without (`REWRITE_SPAN` 0 learns nothing), and the answer is the same."""
    file = [*range(1, 11), 50, *range(11, 21), 50, *range(21, 31), 50, *range(31, 41), 50,
            *range(41, 46)]  # fmt: skip
    answer = [t for token in file for t in ((55, 56) if token == 50 else (token,))]
    prompt = [*file, 60, 61]

    def steps_and_text() -> tuple[int, str]:
        monkeypatch.setattr(fake_engine, "new_sampler",
                            lambda sampling, seed, grammar: CopyingSampler(len(prompt), answer))  # fmt: skip
        scheduler, context = fake_engine.fake_scheduler(max_draft=32, step_shape=FLAT_SHAPE)
        try:
            out = Collected()
            out.job = DecodeJob(prompt=prompt, emit=out,
                                sampling=SamplingParams(temperature=0, max_tokens=100))  # fmt: skip
            scheduler.submit(out.job)
            out.wait()
            return len(context.batches), out.text
        finally:
            scheduler.stop()

    steps, text = steps_and_text()
    assert text == "".join(f"<{t}>" for t in answer)
    monkeypatch.setattr(speculation, "REWRITE_SPAN", 0)
    steps_without, text_without = steps_and_text()
    assert text_without == text and steps < steps_without
