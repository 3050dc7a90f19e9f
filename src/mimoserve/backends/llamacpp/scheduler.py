"""Continuous batching over one KV pool, with shared prompt prefixes.

Each step puts into one batch the next token of every decoding sequence and, with the
room left, chunks of prompts still being read, so a long prompt never stalls the
running streams. New requests join between steps; a cancelled one leaves within one
step.

Memory: every sequence draws cells from one pool (llama.cpp's unified KV cache).
`--n-parallel` lanes (sequence ids) decode together; what they computed stays in a
prefix tree (`prefix_cache.py`) after they leave, so a new request reuses the longest
cached prefix and computes only the rest, and requests that share a system prompt hold
it once. A request whose prefix another one is reading right now waits for it rather
than computing it twice. Admission is optimistic: a request starts when its prompt
fits; when the pool fills up mid-generation, unreferenced cached prefixes are evicted
(least recently used) and then the newest sequence is pre-empted: its cells go to the
cache and it resumes later where it stopped (recomputing whatever was evicted
meanwhile), so a running stream never fails for lack of memory.

Speculation (`speculation.py`): beside its next token, a decoding sequence may put a
guess of the tokens after it into the same batch; every position is sampled in order
with the sequence's own sampler and a guessed token is kept only when it equals the
token sampled there, so one step may yield several tokens, always the ones decoding
without guesses gives. Rejected guesses' cells are removed at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mimoserve.backends.llamacpp.engine_parts import (
    BatchFactory,
    KvContext,
    SamplerFactory,
    TokenSampler,
)
from mimoserve.backends.llamacpp.kv_tiers import KvTiers
from mimoserve.backends.llamacpp.logprobs import log_softmax, token_logprob
from mimoserve.backends.llamacpp.prefix_cache import Node, PrefixCache, common_prefix
from mimoserve.backends.llamacpp.sequence import (
    MAX_UNREAD_STEPS,
    DecodeJob,
    Generated,
    SequenceOutput,
    Step,
)
from mimoserve.backends.llamacpp.speculation import (
    AcceptanceTable,
    Drafted,
    SequenceDrafts,
    SharedHistory,
    StepShape,
)
from mimoserve.errors import EngineError, OverloadedError
from mimoserve.events import Finished, FinishReason, KvCells, Started, TokenLogprob, TokenUsage

log = logging.getLogger(__name__)

# A waiting request holds back while a running one reads a prefix they share, if that
# saves it at least this many tokens of compute.
_MIN_SHARED_WAIT = 32
# llama.cpp answers this when it found no KV cells for a batch.
_NO_KV_SLOT = 1
# While streams decode, a step carries at most this much prompt work (seconds): the
# inter-token latency they see while a long prompt is read. Without streams to keep
# flowing, prompts go in whole batches.
_STEP_BUDGET_S = 1.0
_MIN_PROMPT_SHARE = 32
# The second line behind the pattern check (grammar.py): a sequence whose grammar takes
# longer than this to pick one token is ended after it (finish_reason `length`), so a
# costly constraint stalls the other streams for at most about this long, once.
CONSTRAINT_STEP_LIMIT_S = 2.0
# Guesses go into steps with at most this many decoding sequences. Measured on this
# CPU: 8 essay streams lost 15 % of their throughput to guesses the cost model rated
# worth it (78 % kept); one or two streams copying text gain about 2x.
MAX_GUESSING_STREAMS = 2


class StepCost:
    """Seconds a step takes as a line in its token count (fixed + per token), fitted
    over recent steps. Small steps cost far more per token than big ones on a CPU
    (a fixed part per step: the weights are read once per step whatever its size)."""

    def __init__(self, window: int = 24) -> None:
        self._points: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        self._points.append((tokens, seconds))

    def estimate(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token); (0, 0) before the first step. With steps
        of one size only, all of a step's time is taken as per-token (cautious)."""
        if not self._points:
            return 0.0, 0.0
        sizes = [n for n, _ in self._points]
        times = [t for _, t in self._points]
        mean_n, mean_t = sum(sizes) / len(sizes), sum(times) / len(times)
        if len(set(sizes)) < 2:
            return 0.0, mean_t / mean_n
        spread = sum((n - mean_n) ** 2 for n in sizes)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in self._points) / spread
        if slope <= 0:
            return 0.0, mean_t / mean_n
        return max(0.0, mean_t - slope * mean_n), slope


@dataclass(eq=False)
class Running:
    """One request from admission to its end, including while it waits pre-empted."""

    job: DecodeJob
    order: int  # admission order: the newest is pre-empted first
    sampler: TokenSampler | None = None  # set when it first starts
    output: SequenceOutput | None = None
    lane: int | None = None  # the sequence id it decodes on, None while waiting
    fed: list[int] = field(default_factory=list)  # tokens whose cells the lane holds
    pending: list[int] = field(default_factory=list)  # tokens to decode next
    shared: int = 0  # of `fed`, how many are cells of the prefix tree
    holding: Node | None = None  # deepest tree node it attends to (locked)
    cached_once: bool = False  # its prompt went into the tree (when it was read)
    reused: int = 0  # prompt tokens it did not compute (reported as cached)
    loaded: tuple[int, str] = (0, "")  # of those, how many came from a lower tier, and which
    batch_index: int = -1  # where this sequence's logits are in the current batch
    reported: int = 0  # completion tokens already accounted for in emitted deltas
    drafts: SequenceDrafts | None = None  # its draft sources (speculation on)
    guess: Drafted | None = None  # drafted tokens in this step's batch, after `fed`'s last
    draft_indices: list[int] = field(default_factory=list)  # their logits in the batch

    @property
    def tokens(self) -> list[int]:
        return self.fed + self.pending

    @property
    def private(self) -> int:
        return len(self.fed) - self.shared

    @property
    def reading_prompt(self) -> bool:
        return self.output is None or self.output.completion_tokens == 0


class Scheduler:
    def __init__(
        self,
        new_sampler: SamplerFactory,
        context: KvContext,
        *,
        lanes: int,
        pool_cells: int,
        seq_ctx: int,
        n_batch: int,
        token_bytes: Callable[[int], bytes],
        is_end: Callable[[int], bool],
        end_tokens: list[int],
        forced_close: list[int],
        new_batch: BatchFactory,
        max_draft: int = 0,
        step_shape: StepShape | None = None,
        tiers: KvTiers | None = None,
        attends_pool: bool = False,
    ) -> None:
        self._new_sampler = new_sampler
        self._ctx = context
        self._lanes: list[Running | None] = [None] * lanes
        self._pool_cells = pool_cells
        # With lower tiers, the last sequence id is theirs: cells are loaded under it, then
        # handed to the prefix tree.
        holders = context.n_seq_max - (1 if tiers is not None else 0)
        self._cache = PrefixCache(context, holder_ids=range(lanes, holders))
        self._tiers = tiers
        if tiers is not None:
            tiers.attach(context, self._cache, scratch_seq=holders)
        self._seq_ctx = seq_ctx
        self._batch = new_batch(n_batch)
        self._n_batch = n_batch
        self._token_bytes = token_bytes
        self._is_end = is_end
        self._end_tokens = end_tokens
        self._forced_close = forced_close
        self._waiting: deque[Running] = deque()
        self._admissions = itertools.count()
        self._lock = threading.Condition()
        self._stopping = False
        self._dead = False  # the thread ended on an unexpected error: nothing will run again
        self.preemptions = 0
        self.constraint_timeouts = 0  # sequences ended for a grammar step too slow
        self.constraint_step_limit_s = CONSTRAINT_STEP_LIMIT_S
        self._step_cost = StepCost()
        # Speculation: at most this many drafted tokens per sequence and step (0: off).
        self._max_draft = max_draft if step_shape is not None else 0
        self._shape = step_shape
        # Without flash attention llama.cpp multiplies every query row by every pool cell
        # in use (other sequences' masked): a step's attention grows with the pool's
        # cells, not the sequence's own.
        self._attends_pool = attends_pool
        self._shared = SharedHistory() if self._max_draft > 0 else None
        self._acceptance = AcceptanceTable()
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
            self._waiting.append(Running(job, order=next(self._admissions), pending=job.prompt))
            self._lock.notify()

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def load(self) -> tuple[int, int]:
        # Read without the lock: a momentary view for metrics is all that is needed.
        return len(self._active()), len(self._waiting)

    def kv_cells(self) -> KvCells:
        """A momentary view of the pool (read without the lock, for metrics)."""
        cache = self._cache
        return KvCells(
            total=self._pool_cells,
            used=self._private_cells() + cache.locked_cells,
            cached=cache.cells - cache.locked_cells,
            preemptions=self.preemptions,
            constraint_timeouts=self.constraint_timeouts,
            tiers=self._tiers.stats() if self._tiers is not None else None,
        )

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()
        self._batch.close()
        if self._tiers is not None:
            self._tiers.close()

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
                if self._active() and not self._step():
                    # Every running sequence waits for its client to read (and a waiting
                    # request, if any, for a lane they hold): sleep until a client reads,
                    # leaves or a request arrives (each wakes us) instead of spinning.
                    with self._lock:
                        if not self._stopping:
                            self._lock.wait(timeout=0.5)
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
        for running in waiting:
            running.job.emit(error())
            self._close(running)
        for running in self._active():
            running.job.emit(error())
            self._release(running)

    def _active(self) -> list[Running]:
        return [running for running in self._lanes if running is not None]

    def _private_cells(self) -> int:
        """Cells the running sequences hold outside the prefix tree."""
        return sum(r.private for r in self._active())

    def free_cells(self) -> int:
        return self._pool_cells - self._cache.cells - self._private_cells()

    # ---- admission ---------------------------------------------------------------------

    def _admit(self) -> None:
        """Starts waiting requests in arrival order (pre-empted ones first) while a lane
        is free and the pool has room for their prompts."""
        for running in list(self._waiting):
            if running.job.cancelled.is_set():
                self._waiting.remove(running)
                self._close(running)
                continue
            lane = self._free_lane()
            if lane is None:
                return
            if self._prefix_being_read(running):
                continue  # it starts once that prefix is in the cache
            if self._start(running, lane):
                self._waiting.remove(running)
            elif not self._active():
                # An empty pool cannot hold it: waiting would spin forever. (Prompts
                # longer than the longest request are refused before they get here.)
                self._waiting.remove(running)
                running.job.emit(EngineError("the request does not fit in the KV pool"))
                self._close(running)
            else:
                return  # no room yet: nothing behind it jumps the queue for memory

    def _free_lane(self) -> int | None:
        for lane, running in enumerate(self._lanes):
            if running is None:
                return lane
        return None

    def _prefix_being_read(self, waiting: Running) -> bool:
        tokens = waiting.tokens
        cached = self._cache.match(tokens).length
        for running in self._active():
            if running.reading_prompt and not running.cached_once:
                shared = common_prefix(running.tokens, tokens)
                if shared - cached >= _MIN_SHARED_WAIT:
                    return True
        return False

    def _start(self, running: Running, lane: int) -> bool:
        """Puts a request on a lane, sharing its longest cached prefix. False when the
        pool has no room for the rest of its tokens yet."""
        tokens = running.tokens
        if self._tiers is not None:
            # Idle prefixes leave first, so that what this request loads and computes
            # takes the low cells they held (llama.cpp attends up to the highest cell in
            # use: a prompt loaded above them kept every later step slow, 1.4x measured).
            # Then cells a lower tier holds beyond what the pool has come back (into the
            # tree), so the match below finds them; for a pre-empted sequence too (its
            # prompt may have left the pool while it waited).
            self._tiers.spill_idle(sparing=tokens)
            loaded = self._tiers.bring_back(tokens, self._make_room)
            if running.sampler is None:
                running.loaded = loaded
        match = self._cache.match(tokens)
        # At least one token is decoded again so the sequence has fresh logits.
        reuse = min(match.length, len(tokens) - 1)
        deepest = match.nodes[-1] if reuse > 0 else None
        self._cache.lock(deepest)  # what it will share must survive the room-making
        # Room for its tokens and, beside running sequences, up to one batch more, so
        # that it is not pre-empted again at once by those decoding.
        headroom = min(self._n_batch, self._pool_cells - len(tokens)) if self._active() else 0
        if not self._make_room(len(tokens) - reuse + max(headroom, 0), protect=None):
            self._cache.unlock(deepest)
            return False
        if running.sampler is None:
            error = self._first_start(running, reuse)
            if error is not None:
                self._cache.unlock(deepest)
                running.job.emit(error)
                return True  # refused: it no longer waits
        self._ctx.remove(lane)
        self._cache.attach(lane, match, reuse)
        running.lane, running.holding, running.shared = lane, deepest, reuse
        running.fed, running.pending = tokens[:reuse], tokens[reuse:]
        self._lanes[lane] = running
        return True

    def _first_start(self, running: Running, reuse: int) -> Exception | None:
        job = running.job
        sampling = job.sampling
        try:
            seed = sampling.seed if sampling.seed is not None else _random_seed()
            running.sampler = self._new_sampler(sampling, seed, job.grammar)
        except ValueError as exc:
            return EngineError(f"could not set up sampling: {exc}")
        room = self._seq_ctx - len(job.prompt)
        limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        running.output = SequenceOutput(
            job, limit, self._token_bytes, self._is_end, self._forced_close
        )
        running.reused = reuse
        if self._tiers is not None:
            self._tiers.count_reuse(reuse, *running.loaded)
        if self._max_draft > 0:
            running.drafts = SequenceDrafts.start(
                job.prompt, job.prediction, self._shared, self._acceptance, self._max_draft
            )
        job.emit(Started(prompt_tokens=len(job.prompt), cached_tokens=reuse))
        return None

    # ---- memory ------------------------------------------------------------------------

    def _make_room(self, cells: int, protect: Running | None) -> bool:
        """Frees cells until `cells` are free: cached prefixes first (least recently used),
        then, when `protect` is given, by pre-empting the newest other sequences. A
        newcomer (`protect` None) never pre-empts anyone: it waits."""
        short = cells - self.free_cells()
        if short > 0:
            self._cache.evict(short)
        while self.free_cells() < cells and protect is not None:
            victims = [r for r in self._active() if r is not protect]
            if not victims:
                break
            self._preempt(max(victims, key=lambda r: r.order))
            short = cells - self.free_cells()
            if short > 0:
                self._cache.evict(short)
        return self.free_cells() >= cells

    def _preempt(self, running: Running) -> None:
        """Takes a sequence off its lane; what it computed stays cached (evictable), and it
        waits at the head of the queue to resume with its sampler and output as they are."""
        self.preemptions += 1
        log.info(
            "pre-empting a sequence after %d tokens (KV pool full)",
            running.output.completion_tokens if running.output else 0,
        )
        self._leave_lane(running)
        self._waiting.appendleft(running)

    def _leave_lane(self, running: Running) -> None:
        """Caches what the lane computed, then frees the lane's own cells."""
        lane = running.lane
        assert lane is not None
        self._drop_guess(running)
        if running.fed:
            running.holding, running.shared = self._cache.insert(
                lane, running.fed, running.shared, running.holding
            )
        self._cache.unlock(running.holding)
        self._ctx.remove(lane)
        running.holding, running.shared, running.lane = None, 0, None
        self._lanes[lane] = None

    # ---- decoding ----------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for running in self._active():
            if running.job.cancelled.is_set():
                done = running.output.completion_tokens if running.output else 0
                log.info("generation cancelled after %d tokens", done)
                self._release(running)

    def _release(self, running: Running) -> None:
        if running.lane is not None:
            self._leave_lane(running)
            if self._tiers is not None and self._active():
                self._tiers.spill_idle()  # what it leaves must not tax those still running
        self._close(running)

    def _close(self, running: Running) -> None:
        if running.sampler is not None:
            running.sampler.close()
            running.sampler = None

    def _fill_batch(self) -> list[tuple[Running, list[int]]]:
        """Decoding sequences first (one token each), then prompt chunks in arrival order,
        as far as the batch and the pool have room. Returns what each sequence added."""
        self._batch.clear()
        active = self._active()
        decoding = [r for r in active if not r.reading_prompt and len(r.pending) == 1]
        prefilling = sorted((r for r in active if r not in decoding), key=lambda r: r.order)
        # A sequence whose client has not read its last steps waits (backpressure).
        decoding = [r for r in decoding if r.job.backlog < MAX_UNREAD_STEPS]
        # Every decoding sequence and the oldest prompt must be able to move on.
        self._make_room(len(decoding) + (1 if prefilling else 0), protect=self._oldest())
        free = self.free_cells()
        share = self._prompt_share() if decoding else self._n_batch
        added: list[tuple[Running, list[int]]] = []
        for running in decoding:
            if running.lane is None:
                continue  # pre-empted just now
            if free <= 0:
                break
            chunk = list(running.pending)
            free -= len(chunk)
            self._feed(running, chunk)
            added.append((running, chunk))
        # Guesses take what the decoding tokens and the prompts' share leave, in the
        # batch and in the pool.
        reserved = share if prefilling else 0
        room = min(self._n_batch - self._batch.size - reserved, free - reserved)
        yielded = float(self._batch.size)
        if len(added) > MAX_GUESSING_STREAMS:
            room = 0  # measured: with 8 streams, guesses cost more than they gave
        for running, _ in list(added):
            drafted = self._guess(running, room, yielded)
            room, free, yielded = room - drafted[0], free - drafted[0], yielded + drafted[1]
        limit = min(self._n_batch, self._batch.size + share)
        for running in prefilling:
            if running.lane is None:
                continue
            room = min(limit - self._batch.size, free)
            if room <= 0:
                break
            chunk = running.pending[:room]
            free -= len(chunk)
            self._feed(running, chunk)
            added.append((running, chunk))
            if not running.pending:
                # The prompt's end: the client's prediction is worth a guess already.
                room = min(limit - self._batch.size, free)
                free -= self._guess(running, room, yielded + 1)[0]
        return added

    def _feed(self, running: Running, chunk: list[int]) -> None:
        """Puts a chunk of the sequence's pending tokens into the batch; logits for its
        last token when that was the last pending one."""
        assert running.lane is not None
        for offset, token in enumerate(chunk):
            last = offset == len(chunk) - 1 and len(chunk) == len(running.pending)
            index = self._batch.add(token, len(running.fed), running.lane, last)
            running.fed.append(token)
            if last:
                running.batch_index = index
        running.pending = running.pending[len(chunk) :]

    def _guess(self, running: Running, room: int, yielded: float) -> tuple[int, float]:
        """Adds a guess of the tokens after the sequence's next one to the batch, each with
        its logits, when one is worth verifying in this step (`yielded`: the tokens the
        step yields so far). Returns how many it added and how many it expects kept."""
        if running.drafts is None or running.lane is None or self._shape is None:
            return 0, 0.0
        assert running.output is not None
        # Never past the request's context (llama.cpp refuses such positions) nor past
        # the tokens it may still write.
        room = min(room, self._seq_ctx - len(running.fed) - 1, running.output.remaining - 1)
        # The cells its tokens attend over: what a guess costs beyond an empty context's.
        guess = running.drafts.propose(self._shape, self._batch.size, yielded, room,
                                       self._attended_cells(running) - 1)  # fmt: skip
        if guess is None:
            return 0, 0.0
        running.guess = guess
        for token in guess.tokens:
            running.draft_indices.append(
                self._batch.add(token, len(running.fed), running.lane, True)
            )
            running.fed.append(token)
        return len(guess.tokens), guess.expected

    def _attended_cells(self, running: Running) -> int:
        """The cells a step of this sequence attends over: its own with flash attention
        (llama.cpp's kernel skips other sequences' cells), else every cell in use."""
        if self._attends_pool:
            return max(len(running.fed), self._cache.cells + self._private_cells())
        return len(running.fed)

    def _drop_guess(self, running: Running) -> None:
        """Takes an unverified guess out of the lane (its cells and `fed`)."""
        if running.guess is None:
            return
        assert running.lane is not None
        del running.fed[len(running.fed) - len(running.guess.tokens) :]
        self._ctx.remove(running.lane, len(running.fed))
        running.guess, running.draft_indices = None, []

    def _settle_guess(self, running: Running, accepted: int) -> None:
        """The guess's first `accepted` tokens were what the sampler chose: they stay
        (their cells are the sequence's); the rest leave the lane."""
        guess = running.guess
        if guess is None:
            return
        assert running.drafts is not None and running.lane is not None
        rejected = len(guess.tokens) - accepted
        if rejected:
            del running.fed[len(running.fed) - rejected :]
            self._ctx.remove(running.lane, len(running.fed))
        running.drafts.verified(guess, accepted)
        running.guess, running.draft_indices = None, []

    def _prompt_share(self) -> int:
        """Prompt tokens a step may carry beside decoding streams: as many as fit in the
        step budget by the recent cost of a step (a fixed part plus a part per token,
        both growing with the prompt's length, its attention span), so a stream's next
        token does not wait for a whole 512-token chunk of a 20,000-token prompt
        (seconds). At least `_MIN_PROMPT_SHARE`, so the prompt still advances."""
        fixed, per_token = self._step_cost.estimate()
        if per_token <= 0:
            return self._n_batch
        fits = int((_STEP_BUDGET_S - fixed) / per_token)
        return max(_MIN_PROMPT_SHARE, min(self._n_batch, fits))

    def _oldest(self) -> Running | None:
        active = self._active()
        return min(active, key=lambda r: r.order) if active else None

    def _step(self) -> bool:
        """One batch decoded and sampled; False when nothing could move."""
        added = self._fill_batch()
        if not added:
            return False
        began = time.perf_counter()
        code = self._ctx.decode(self._batch)
        if code == 0:
            seconds = time.perf_counter() - began
            self._step_cost.add(self._batch.size, seconds)
            # Steps of one decoding sequence only (its next token and maybe a guess):
            # what the shape measured at start, and what a guess is added to. A step of
            # several sequences costs more for other reasons, which would read as
            # attention and price guesses out; a prompt chunk computes logits for its
            # last token alone, and costs less than as many guessed tokens.
            if self._shape is not None and len(added) == 1 and len(added[0][1]) == 1:
                # The span: the cells attended over before the step.
                span = self._attended_cells(added[0][0]) - self._batch.size
                self._shape.learn(self._batch.size, span, seconds)
        if code == _NO_KV_SLOT:
            self._undo(added)
            return True
        if code != 0:
            self._fail_all(f"llama_decode returned {code}")
            return True
        for running, _chunk in added:
            if not running.pending:  # the rest of a prompt waits for the next step
                self._advance_alone(running)
        return True

    def _advance_alone(self, running: Running) -> None:
        """`_advance`, where a failure is this sequence's alone: what one request brought
        (its schema, its tools, its text) ends that request, never its batch company.
        The decode itself succeeded, so the cells stay valid and the others go on."""
        try:
            self._advance(running)
        except Exception:
            log.exception("a sequence failed after its decode step; ending it alone")
            running.job.emit(EngineError("engine failed while generating"))
            self._release(running)

    def _undo(self, added: list[tuple[Running, list[int]]]) -> None:
        """llama.cpp found no cells for the batch (our count and its own disagree, e.g.
        fragmentation): give the tokens back and free room by pre-empting the newest."""
        log.warning("llama.cpp found no KV cells for a batch; pre-empting to make room")
        for running, chunk in added:
            self._drop_guess(running)
            del running.fed[len(running.fed) - len(chunk) :]
            running.pending = chunk + running.pending
            assert running.lane is not None
            self._ctx.remove(running.lane, len(running.fed))
        active = self._active()
        if len(active) > 1:
            self._preempt(max(active, key=lambda r: r.order))
        else:
            self._cache.evict(self._cache.evictable())

    def _advance(self, running: Running) -> None:
        """A sequence whose logits are ready: one token sampled (and, where the batch held
        its guess, one more for each guessed token the sampler agreed with), turned into
        events and handed to its requester; then the sequence ends or queues the token."""
        self._cache_prompt_once(running)
        guess = running.guess.tokens if running.guess is not None else []
        indices = [running.batch_index, *running.draft_indices]
        for position, index in enumerate(indices):
            running.batch_index = index
            token, step, logprobs = self._next_token(running)
            # A guessed token stands when the sampler chose it at its position and nothing
            # else (an end, a stop, injected text) comes between.
            agreed = position < len(guess) and token == guess[position]
            go_on = agreed and step.finished is None and not step.inject
            if not go_on:
                self._settle_guess(running, accepted=position)
            self._hand_on(running, step, logprobs)
            if step.finished is not None:
                self._finish(running, step.finished)
                return
            assert token is not None  # a None token always finishes
            follows = [token, *step.inject] if not self._is_end(token) else list(step.inject)
            if running.drafts is not None:
                for followed in follows:
                    running.drafts.follow(followed)
            if not go_on:
                running.pending = follows
                return

    def _next_token(self, running: Running) -> tuple[int | None, Step, tuple[TokenLogprob, ...]]:
        """The token sampled at `running.batch_index`, what it leads to, its logprobs."""
        output = running.output
        assert output is not None
        # Read before banning end tokens: the model's own distribution.
        dist = self._distribution(running)
        token, too_slow = self._sample(running)
        # None: the grammar is complete and accepts only the (banned) end: the answer is.
        step = Step(finished="stop") if token is None else output.on_token(token)
        if too_slow and step.finished is None:
            self.constraint_timeouts += 1
            log.warning("ending a sequence: its grammar took over %.1f s for one token",
                        self.constraint_step_limit_s)  # fmt: skip
            step = Step(step.events, finished="length")
        return token, step, self._logprobs(running, dist, token)

    def _cache_prompt_once(self, running: Running) -> None:
        """Its prompt has just been read: cache it now, so requests waiting for the same
        prefix can start (and this one attends to the tree's cells)."""
        if running.cached_once:
            return
        running.cached_once = True
        assert running.lane is not None
        guessed = len(running.guess.tokens) if running.guess is not None else 0
        prompt = running.fed[: len(running.fed) - guessed]
        running.holding, running.shared = self._cache.insert(
            running.lane, prompt, running.shared, running.holding
        )
        if self._tiers is not None:
            self._tiers.keep(running.lane, prompt)

    def _distribution(self, running: Running) -> Any:
        """The model's log-probabilities at this step, when the request asked for them."""
        if running.job.sampling.logprobs is None:
            return None
        return log_softmax(self._ctx.logits(running.batch_index))

    def _sample(self, running: Running) -> tuple[int | None, bool]:
        """(the token, whether its grammar took longer than the constraint step limit)."""
        sampler, output, job = running.sampler, running.output, running.job
        assert sampler is not None and output is not None
        end_banned = output.must_not_end or job.sampling.ignore_eos
        if not sampler.constrained:
            if end_banned:
                self._ctx.ban_tokens(running.batch_index, self._end_tokens)
            return sampler.sample(self._ctx, running.batch_index), False
        banned = self._end_tokens if end_banned else []
        began = time.perf_counter()
        token = sampler.sample_constrained(self._ctx, running.batch_index, banned)
        return token, time.perf_counter() - began > self.constraint_step_limit_s

    def _logprobs(self, running: Running, dist: Any, token: int | None) -> tuple[TokenLogprob, ...]:
        rivals = running.job.sampling.logprobs
        if dist is None or rivals is None or token is None or self._is_end(token):
            return ()  # the end of the turn carries none
        return (token_logprob(dist, token, rivals, self._token_bytes),)

    def _hand_on(self, running: Running, step: Step, logprobs: tuple[TokenLogprob, ...]) -> None:
        """The step's events and the tokens they cost, to the requester (counted for
        backpressure: the requester counts what it takes)."""
        output, job = running.output, running.job
        assert output is not None
        events = step.events
        if step.finished is not None:
            events += tuple(output.flush())
        job.generated_tokens = output.completion_tokens
        job.emitted += 1
        job.emit(Generated(events, output.completion_tokens - running.reported, logprobs))
        running.reported = output.completion_tokens

    def _finish(self, running: Running, reason: FinishReason) -> None:
        output, job, drafts = running.output, running.job, running.drafts
        assert output is not None
        usage = TokenUsage(
            prompt_tokens=len(job.prompt),
            completion_tokens=output.completion_tokens,
            cached_tokens=running.reused,
            reasoning_tokens=output.reasoning_tokens,
        )
        if drafts is not None:
            usage = dataclasses.replace(
                usage,
                draft_tokens=drafts.drafted,
                accepted_draft_tokens=drafts.accepted,
                accepted_prediction_tokens=drafts.prediction_accepted,
                rejected_prediction_tokens=drafts.prediction_rejected,
            )
            if self._shared is not None:
                self._shared.add(drafts.output())
        if self._tiers is not None and running.lane is not None:
            # Prompt and answer: the start of the conversation's next prompt.
            self._tiers.keep(running.lane, running.fed)
        # Released first: a client that has its answer finds the engine's state already
        # without it (its lane free, its cells cached).
        self._release(running)
        job.emit(Finished(reason, usage, output.stop_sequence))

    def _fail_all(self, reason: str) -> None:
        log.error("engine step failed: %s", reason)
        for running in self._active():
            running.job.emit(EngineError("engine failed while generating"))
            assert running.lane is not None
            running.guess, running.draft_indices = None, []
            self._ctx.remove(running.lane)
            self._lanes[running.lane] = None
            self._close(running)
        # The cells' state is unknown after a failed decode: start the cache afresh.
        self._cache.clear()


def engine_down() -> OverloadedError:
    return OverloadedError(
        "The engine has stopped; the server must be restarted.",
        retry_after_s=30,
        code="engine_unavailable",
    )


def _random_seed() -> int:
    return secrets.randbits(31)
