"""Continuous batching: every running sequence advances in one `llama_decode` per step.

Each step puts into one batch the next token of every decoding sequence and, with the
room left, chunks of prompts still being prefilled, so a long prompt never stalls the
running streams. New requests join between steps; a cancelled one leaves within one
step. Idle slots keep their KV cells: a new request takes the slot whose cached tokens
share the longest prefix with its prompt and decodes only the rest.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mimoserve.backends.base import Finished, Started, TokenUsage
from mimoserve.backends.llamacpp.native import Batch, NativeContext, NativeModel, Sampler
from mimoserve.backends.llamacpp.sequence import DecodeJob, Generated, SequenceOutput, Step
from mimoserve.errors import EngineError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    running: Running | None = None
    last_used: float = 0.0  # when a request last started in this slot


@dataclass(eq=False)
class Running:
    job: DecodeJob
    slot: Slot
    sampler: Sampler
    output: SequenceOutput
    pending: list[int]  # tokens to decode next (prompt rest, last sample, injected text)
    reused: int
    batch_index: int = -1  # where this sequence's logits are in the current batch
    reported: int = 0  # completion tokens already accounted for in emitted deltas


# What a cached token that a new request would overwrite is worth against one it reuses:
# it may be asked for again (the next turn of its conversation), or never.
_OVERWRITE_WEIGHT = 0.25


def _slot_score(slot: Slot, prompt: list[int]) -> tuple[float, float]:
    """Tokens reused minus (weighted) cached tokens destroyed; among equals the least
    recently used slot. A request that shares only the template's header with a cached
    prompt then takes an empty or stale slot instead of evicting that prompt."""
    shared = _common_prefix(slot.cached, prompt)
    destroyed = len(slot.cached) - shared
    return shared - _OVERWRITE_WEIGHT * destroyed, -slot.last_used


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    def __init__(
        self,
        model: NativeModel,
        context: NativeContext,
        *,
        slots: int,
        seq_ctx: int,
        n_batch: int,
        token_bytes: Callable[[int], bytes],
        is_end: Callable[[int], bool],
        end_tokens: list[int],
        forced_close: list[int],
    ) -> None:
        self._model = model
        self._ctx = context
        self._slots = [Slot(seq_id=i) for i in range(slots)]
        self._seq_ctx = seq_ctx
        self._batch = Batch(n_batch)
        self._n_batch = n_batch
        self._token_bytes = token_bytes
        self._is_end = is_end
        self._end_tokens = end_tokens
        self._forced_close = forced_close
        self._waiting: deque[DecodeJob] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._dead = False  # the thread ended on an unexpected error: nothing will run again
        self._thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    # ---- called from the event loop --------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self._dead and not self._stopping and self._thread.is_alive()

    def submit(self, job: DecodeJob) -> None:
        with self._lock:
            if self._dead:
                job.emit(engine_down())
                return
            self._waiting.append(job)
            self._lock.notify()

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def load(self) -> tuple[int, int]:
        # Read without the lock: a momentary view for metrics is all that is needed.
        return len(self._active()), len(self._waiting)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()
        self._batch.close()

    # ---- the scheduler thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # Whatever killed the loop, no job may wait forever: every waiting and running
            # request gets a 503 now, and new ones are refused at once (`alive`).
            log.exception("the scheduler thread died; the engine is down")
            self._end_all(engine_down, dead=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._active():
                    self._lock.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._drop_cancelled()
                if self._active():
                    self._step()
            except Exception:
                # A bug must not kill the thread and leave every client waiting forever.
                log.exception("scheduler step failed")
                self._fail_all("the scheduler step raised")
        self._end_all(lambda: EngineError("the server is shutting down"))

    def _end_all(self, error: Callable[[], Exception], *, dead: bool = False) -> None:
        """Every waiting and running job gets `error()`; with `dead`, no job is taken again
        (set under the lock, so `submit` cannot slip one in after the queue is emptied)."""
        with self._lock:
            self._dead = self._dead or dead
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(error())
        for running in self._active():
            running.job.emit(error())
            self._release(running)

    def _active(self) -> list[Running]:
        return [slot.running for slot in self._slots if slot.running is not None]

    def _admit(self) -> None:
        """Moves waiting jobs into free slots, each into the slot that shares most of its prompt."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                continue
            free = [slot for slot in self._slots if slot.running is None]
            if not free:
                return
            self._waiting.popleft()
            slot = max(free, key=lambda s: _slot_score(s, job.prompt))
            self._start(job, slot)

    def _start(self, job: DecodeJob, slot: Slot) -> None:
        # At least one prompt token is decoded again so the sequence has fresh logits.
        reused = min(_common_prefix(slot.cached, job.prompt), len(job.prompt) - 1)
        self._ctx.forget(slot.seq_id, reused)
        slot.cached = job.prompt[:reused]
        slot.last_used = time.monotonic()
        sampling = job.sampling
        try:
            seed = sampling.seed if sampling.seed is not None else _random_seed()
            sampler = Sampler(self._model, sampling, seed=seed, grammar=job.grammar)
        except ValueError as exc:
            job.emit(EngineError(f"could not set up sampling: {exc}"))
            return
        room = self._seq_ctx - len(job.prompt)
        limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        output = SequenceOutput(job, limit, self._token_bytes, self._is_end, self._forced_close)
        slot.running = Running(job, slot, sampler, output, job.prompt[reused:], reused)
        job.emit(Started(prompt_tokens=len(job.prompt), cached_tokens=reused))

    def _drop_cancelled(self) -> None:
        for running in self._active():
            if running.job.cancelled.is_set():
                log.info("generation cancelled after %d tokens", running.output.completion_tokens)
                self._release(running)

    def _release(self, running: Running) -> None:
        running.sampler.close()
        running.slot.running = None

    def _fill_batch(self) -> list[Running]:
        """Decoding sequences first (one token each), then prompt chunks in arrival order."""
        batch = self._batch
        batch.clear()
        with_logits: list[Running] = []
        active = self._active()
        decoding = [r for r in active if r.output.completion_tokens > 0 and len(r.pending) == 1]
        prefilling = [r for r in active if r not in decoding]
        for running in decoding + prefilling:
            room = self._n_batch - batch.size
            if room <= 0:
                break
            chunk = running.pending[:room]
            slot = running.slot
            for offset, token in enumerate(chunk):
                last = offset == len(chunk) - 1 and len(chunk) == len(running.pending)
                index = batch.add(token, len(slot.cached), slot.seq_id, last)
                slot.cached.append(token)
                if last:
                    running.batch_index = index
                    with_logits.append(running)
            running.pending = running.pending[len(chunk) :]
        return with_logits

    def _step(self) -> None:
        with_logits = self._fill_batch()
        code = self._ctx.decode(self._batch)
        if code != 0:
            self._fail_all(f"llama_decode returned {code}")
            return
        for running in with_logits:
            self._advance(running)

    def _advance(self, running: Running) -> None:
        output = running.output
        sampler = running.sampler
        end_banned = output.must_not_end or running.job.sampling.ignore_eos
        token: int | None
        if sampler.constrained:
            banned = self._end_tokens if end_banned else []
            token = sampler.sample_constrained(self._ctx, running.batch_index, banned)
        else:
            if end_banned:
                self._ctx.ban_tokens(running.batch_index, self._end_tokens)
            token = sampler.sample(self._ctx, running.batch_index)
        # None: the grammar is complete and accepts only the (banned) end: the answer is.
        step = Step(finished="stop") if token is None else output.on_token(token)
        job = running.job
        events = step.events
        if step.finished is not None:
            events += tuple(output.flush())
        job.emit(Generated(events, output.completion_tokens - running.reported))
        running.reported = output.completion_tokens
        if step.finished is not None:
            usage = TokenUsage(
                prompt_tokens=len(job.prompt),
                completion_tokens=output.completion_tokens,
                cached_tokens=running.reused,
                reasoning_tokens=output.reasoning_tokens,
            )
            job.emit(Finished(step.finished, usage, output.stop_sequence))
            self._release(running)
            return
        assert token is not None  # a None token always finishes
        running.pending = ([] if self._is_end(token) else [token]) + list(step.inject)

    def _fail_all(self, reason: str) -> None:
        log.error("engine step failed: %s", reason)
        for running in self._active():
            running.job.emit(EngineError("engine failed while generating"))
            self._ctx.forget(running.slot.seq_id)
            running.slot.cached = []
            self._release(running)


def engine_down() -> OverloadedError:
    return OverloadedError(
        "The engine has stopped; the server must be restarted.",
        retry_after_s=30,
        code="engine_unavailable",
    )


def _random_seed() -> int:
    return secrets.randbits(31)
