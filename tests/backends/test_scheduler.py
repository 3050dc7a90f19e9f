"""The scheduler on a simulated engine (fake_engine.py): its memory rules, prefix waits,
cancellation and step sizing, without weights. A few real-engine tests stay in
test_kv_pool.py and test_engine_faults.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mimoserve.backends.llamacpp.scheduler import Scheduler, StepCost
from mimoserve.backends.llamacpp.sequence import MAX_UNREAD_STEPS
from tests.backends.fake_engine import FakeContext, fake_scheduler, job
from tests.waiting import until_sync


@pytest.fixture
def engine() -> Iterator[tuple[Scheduler, FakeContext]]:
    scheduler, context = fake_scheduler()
    yield scheduler, context
    scheduler.stop()


def alone(prompt: list[int], max_tokens: int, seed: int = 0) -> str:
    scheduler, _ = fake_scheduler()
    try:
        decode, out = job(prompt, max_tokens, seed)
        scheduler.submit(decode)
        out.wait()
        return out.text
    finally:
        scheduler.stop()


def test_sequences_decode_together_and_each_gets_its_own_text(
    engine: tuple[Scheduler, FakeContext],
) -> None:
    scheduler, context = engine
    runs = [job([5, 6, 7 + i], 20, seed=i) for i in range(3)]
    for decode, _ in runs:
        scheduler.submit(decode)
    for i, (_, out) in enumerate(runs):
        finished = out.wait()
        assert finished.reason == "length" and finished.usage.completion_tokens == 20
        assert out.text == alone([5, 6, 7 + i], 20, seed=i)
    assert max(len(batch) for batch in context.batches) >= 2  # really batched


def test_a_request_sharing_a_prefix_reuses_the_cached_cells(
    engine: tuple[Scheduler, FakeContext],
) -> None:
    scheduler, context = engine
    prefix = list(range(1, 50))
    first, first_out = job([*prefix, 60], 4)
    scheduler.submit(first)
    first_out.wait()
    computed = context.computed
    second, second_out = job([*prefix, 61], 4)
    scheduler.submit(second)
    second_out.wait()
    assert second_out.started.cached_tokens == len(prefix)
    assert context.computed - computed == 1 + 4 - 1  # its last prompt token, then decoding


def test_a_waiting_request_waits_for_a_prefix_being_read_instead_of_computing_it_again(
    engine: tuple[Scheduler, FakeContext],
) -> None:
    scheduler, context = engine
    prefix = list(range(1, 200))  # longer than a batch: read over several steps
    first, first_out = job([*prefix, 60], 2)
    second, second_out = job([*prefix, 61], 2)
    scheduler.submit(first)
    scheduler.submit(second)
    first_out.wait()
    second_out.wait()
    assert second_out.started.cached_tokens == len(prefix)
    assert context.computed < 2 * len(prefix)  # the shared prefix was computed once


def test_a_full_pool_pre_empts_the_newest_which_resumes_where_it_stopped() -> None:
    # Room for the three prompts and some of their answers, not for all of them.
    scheduler, context = fake_scheduler(pool_cells=120, n_batch=32)
    try:
        runs = [job([10 + i] * 20, 40, seed=i) for i in range(3)]
        for decode, _ in runs:
            scheduler.submit(decode)
        finished = [out.wait() for _, out in runs]
        assert scheduler.preemptions >= 1
        assert all(f.usage.completion_tokens == 40 and f.reason == "length" for f in finished)
        for i, (_, out) in enumerate(runs):
            assert out.text == alone([10 + i] * 20, 40, seed=i)  # as if never interrupted
        assert len(context.kv.cells) <= context.capacity
    finally:
        scheduler.stop()


def test_a_cancelled_sequence_leaves_within_a_step_and_frees_its_lane(
    engine: tuple[Scheduler, FakeContext],
) -> None:
    scheduler, _ = engine
    decode, out = job([1, 2, 3], 10_000)
    scheduler.submit(decode)
    until_sync(lambda: len(out.events) > 3, "the sequence is generating")
    decode.cancelled.set()
    scheduler.wake()
    until_sync(lambda: scheduler.load() == (0, 0), "the lane is free")
    generated = sum(1 for e in out.events if not hasattr(e, "prompt_tokens"))
    assert generated < 10_000
    # The engine takes new work at once.
    again, again_out = job([4, 5], 3)
    scheduler.submit(again)
    assert again_out.wait().usage.completion_tokens == 3


class FixedCost(StepCost):
    """A step costs 0.05 s plus 0.01 s a token: 95 prompt tokens fit in the 1 s budget."""

    def estimate(self) -> tuple[float, float]:
        return 0.05, 0.01


def test_a_long_prompt_is_read_in_chunks_that_keep_a_stream_flowing() -> None:
    scheduler, context = fake_scheduler(pool_cells=2000, n_batch=512, seq_ctx=2000)
    scheduler._step_cost = FixedCost()
    try:
        # A stream, then a 1,200-token prompt while it decodes (its 1,500 steps take far
        # longer than submitting the prompt).
        stream, stream_out = job([1, 2], 1500)
        long, long_out = job(list(range(3, 63)) * 20, 2)
        scheduler.submit(stream)
        scheduler.submit(long)
        long_out.wait()
        stream_out.wait()
        stream_lane = 0
        beside = [b for b in context.batches
                  if any(seq == stream_lane and pos >= 2 for _, pos, seq, _ in b)
                  and any(seq != stream_lane for _, _, seq, _ in b)]  # fmt: skip
        assert beside, "the prompt was read while the stream decoded"
        assert sum(len(b) - 1 for b in beside) >= 1200 - 512  # most of it, beside the stream
        # Each step: the stream's one token and at most (1 s - 0.05 s) / 0.01 s of prompt.
        assert max(len(b) for b in beside) <= 1 + 95
    finally:
        scheduler.stop()


def test_a_sequence_nobody_reads_is_paused_until_its_client_reads(
    engine: tuple[Scheduler, FakeContext],
) -> None:
    scheduler, _ = engine
    decode, out = job([1, 2, 3], 200, reads=False)
    scheduler.submit(decode)
    until_sync(lambda: decode.backlog >= MAX_UNREAD_STEPS, "the backlog filled")
    other, other_out = job([7, 8], 30)
    scheduler.submit(other)
    other_out.wait()  # the engine went on for others meanwhile
    assert decode.generated_tokens == MAX_UNREAD_STEPS  # and not for the unread one
    out.read_from_now_on()
    scheduler.wake()
    assert out.wait().usage.completion_tokens == 200


def test_lanes_held_by_unread_streams_do_not_spin_the_engine() -> None:
    # Both lanes paused by clients that read nothing, a third request waiting for a lane:
    # nothing can move, and the scheduler sleeps instead of stepping in a loop.
    scheduler, context = fake_scheduler(lanes=2)
    try:
        stalled = [job([1, 2, i], 200, reads=False) for i in range(2)]
        for decode, _ in stalled:
            scheduler.submit(decode)
        until_sync(lambda: all(d.backlog >= MAX_UNREAD_STEPS for d, _ in stalled), "paused")
        waiting, waiting_out = job([9, 9], 3)
        scheduler.submit(waiting)
        steps = len(context.batches)
        # The scheduler thread waits on its condition (a spinning one never does).
        until_sync(lambda: len(scheduler._lock._waiters) == 1,  # type: ignore[attr-defined]
                   "the scheduler sleeps while nothing can move")  # fmt: skip
        stalled[0][0].cancelled.set()  # one client leaves: its lane goes to the waiting one
        scheduler.wake()
        assert waiting_out.wait().usage.completion_tokens == 3
        assert len(context.batches) > steps
    finally:
        scheduler.stop()
