"""The scheduler's side of the tiers under the KV pool (host memory, disk: `kv_store.py`).

Three moves, all on the scheduler thread, between decode steps:

- *keep*: once a prompt is read, its cells are copied out of the pool and handed to the
  store's writer thread (the copy is a memcpy of the cells; the write is not waited for).
  A crash loses at most the prompts being read.
- *bring back*: a new request whose longest match in a lower tier is longer than its
  match in the pool gets those cells loaded into the pool and into the prefix tree,
  instead of computing them.
- *spill*: cached cells no running sequence attends to leave the pool once a lower tier
  holds them, whenever something runs. llama.cpp's attention spans every cell up to the
  highest one in use, masked or not (`get_n_kv`), so idle prefixes in the pool slowed
  every step of every running request (1.17-1.36x measured, see the README); loading
  them back when they are wanted costs a copy instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from mimoserve.backends.llamacpp.engine_parts import KvContext
from mimoserve.backends.llamacpp.kv_store import KvStore
from mimoserve.backends.llamacpp.prefix_cache import PrefixCache
from mimoserve.events import KvTierStats

log = logging.getLogger(__name__)

# Prompts shorter than this are not written: they are read again in about a second.
MIN_KEPT_TOKENS = 128
# A lower tier's match is loaded only when it saves at least this many tokens of compute
# over what the pool holds (a load has a fixed cost: reading, llama.cpp's bookkeeping).
MIN_LOAD_GAIN = 32

MakeRoom = Callable[[int, None], bool]
TIERS = ("pool", "host", "disk")


class KvTiers:
    def __init__(self, store: KvStore, *, min_kept: int = MIN_KEPT_TOKENS) -> None:
        self.store = store
        self._min_kept = min_kept
        self._ctx: KvContext | None = None
        self._cache: PrefixCache | None = None
        self._scratch = -1
        # Requests that reused cells, and tokens reused, by where they came from.
        self._hits = dict.fromkeys(TIERS, 0)
        self._tokens = dict.fromkeys(TIERS, 0)
        self._spilled = 0
        self._capture_s = 0.0
        self._load_s = 0.0

    def attach(self, context: KvContext, cache: PrefixCache, *, scratch_seq: int) -> None:
        """The pool this serves, its prefix tree, and the sequence id loads go under."""
        self._ctx, self._cache, self._scratch = context, cache, scratch_seq

    def _parts(self) -> tuple[KvContext, PrefixCache]:
        assert self._ctx is not None and self._cache is not None, "attach() first"
        return self._ctx, self._cache

    # ---- keep -----------------------------------------------------------------------------

    def keep(self, seq: int, prompt: list[int]) -> None:
        """Hands the cells `seq` holds for `prompt` (positions 0..len-1) to the store."""
        if len(prompt) < self._min_kept or self.store.disk_bytes <= 0:
            return
        tokens = np.asarray(prompt, dtype=np.int32)
        if len(prompt) - self.store.best(tokens)[1] < MIN_LOAD_GAIN:
            return  # held already, but for a few tokens (an answer's end: recomputed)
        context, _ = self._parts()
        began = time.perf_counter()
        # Through the scratch id: `seq` may hold cells past the prompt (a guess).
        context.copy(seq, self._scratch, 0, len(prompt))
        try:
            payload = context.save(self._scratch)
        finally:
            context.remove(self._scratch)
        self._capture_s += time.perf_counter() - began
        self.store.store(tokens, payload)

    # ---- bring back -----------------------------------------------------------------------

    def bring_back(self, tokens: list[int], make_room: MakeRoom) -> tuple[int, str]:
        """Loads the lower tiers' longest match for `tokens` into the prefix tree when it
        beats the pool's. Returns how many tokens the tree gained and from which tier."""
        context, cache = self._parts()
        pool = cache.match(tokens)
        wanted = np.asarray(tokens, dtype=np.int32)
        entry, shared = self.store.best(wanted)
        # The request decodes its last token again anyway (fresh logits).
        shared = min(shared, len(tokens) - 1)
        if entry is None or shared - pool.length < MIN_LOAD_GAIN:
            return 0, ""
        deepest = pool.nodes[-1] if pool.length else None
        cache.lock(deepest)  # the pool's part must survive the room-making
        began = time.perf_counter()
        try:
            # llama.cpp puts back every cell of the entry before we trim it to `shared`.
            if not make_room(entry.n_tokens, None):
                return 0, ""
            found = self.store.read(entry)
            if found is None:
                return 0, ""
            payload, tier = found
            if not context.load(self._scratch, payload):
                log.warning("llama.cpp refused stored cells %s; removing them", entry.path.name)
                self.store.discard(entry)
                return 0, ""
            context.remove(self._scratch, shared, -1)
            held, reach = cache.insert(self._scratch, tokens[:shared], 0, None)
            cache.unlock(held)
            return max(0, reach - pool.length), tier
        finally:
            context.remove(self._scratch)
            cache.unlock(deepest)
            self._load_s += time.perf_counter() - began

    def count_reuse(self, reused: int, loaded: int, tier: str) -> None:
        """A request started with `reused` prompt tokens not computed, `loaded` of them
        brought back from `tier` for it."""
        loaded = min(loaded, reused)
        for source, tokens in (("pool", reused - loaded), (tier, loaded)):
            if tokens > 0:
                self._hits[source] += 1
                self._tokens[source] += tokens

    # ---- spill ----------------------------------------------------------------------------

    def spill_idle(self, sparing: list[int] | None = None) -> int:
        """Frees the pool cells of idle prefixes that a lower tier holds (all but fewer
        than `MIN_LOAD_GAIN` tokens, which are recomputed); returns how many left.
        Prefixes no tier holds (short prompts, long answers not kept) stay: dropping
        them would cost a recompute. The pool's match for `sparing` (a request about to
        start) stays too."""
        _, cache = self._parts()
        match = cache.match(sparing) if sparing else None
        spared = match.nodes[-1] if match is not None and match.length else None
        cache.lock(spared)
        try:
            freed = self._spill(cache)
        finally:
            cache.unlock(spared)
        self._spilled += freed
        return freed

    def _spill(self, cache: PrefixCache) -> int:
        freed = 0
        leaves = cache.idle_leaves()
        while leaves:
            leaf = leaves.pop()
            tokens = np.asarray(leaf.path_tokens(), dtype=np.int32)
            if tokens.shape[0] - self.store.best(tokens)[1] >= MIN_LOAD_GAIN:
                continue
            parent = leaf.parent
            freed += cache.drop(leaf)
            if parent is not None and parent is not cache.root and not parent.children \
                    and parent.refs == 0:  # fmt: skip
                leaves.append(parent)
        return freed

    # ---- reporting ------------------------------------------------------------------------

    def stats(self) -> KvTierStats:
        store, counters = self.store, self.store.counters
        return KvTierStats(
            pool_hits=self._hits["pool"],
            pool_tokens=self._tokens["pool"],
            host_hits=self._hits["host"],
            host_tokens=self._tokens["host"],
            disk_hits=self._hits["disk"],
            disk_tokens=self._tokens["disk"],
            disk_bytes=store.bytes_on_disk,
            disk_entries=store.entries,
            host_bytes=store.host_bytes_used,
            stores=counters.stores,
            store_failures=counters.store_failures,
            store_seconds=counters.store_seconds,
            capture_seconds=self._capture_s,
            load_failures=counters.load_failures,
            load_seconds=self._load_s,
            spilled_cells=self._spilled,
        )

    def close(self) -> None:
        self.store.close()
