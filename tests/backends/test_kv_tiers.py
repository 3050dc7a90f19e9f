"""The tiers under the KV pool: the store's files (restart, torn and foreign files, caps,
a full disk) and the scheduler's moves on the simulated engine (keep, bring back, spill).
The real engine's exactness is in tests/e2e/test_kv_tiers.py."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mimoserve.backends.llamacpp import kv_store
from mimoserve.backends.llamacpp.kv_store import KvStore, StoredPrefix, StoreIdentity
from mimoserve.backends.llamacpp.kv_tiers import KvTiers
from mimoserve.backends.llamacpp.scheduler import Scheduler
from mimoserve.metering.metrics import Metrics
from tests.backends.fake_engine import FakeContext, fake_scheduler, job

IDENTITY = StoreIdentity("ab" * 32, "f16")


def tokens(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32) % 60 + 1


def open_store(root: Path, **kwargs: int) -> KvStore:
    kwargs.setdefault("disk_bytes", 1 << 30)
    kwargs.setdefault("host_bytes", 1 << 20)
    return KvStore(root, IDENTITY, **kwargs)


def written(store: KvStore, prompt: np.ndarray, payload: bytes) -> None:
    assert store.store(prompt, bytearray(payload))
    assert store.flush(timeout=10)


# ---- the store -----------------------------------------------------------------------------


def test_a_stored_prefix_is_found_after_a_restart_and_read_from_disk(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    written(store, tokens(300), b"cells" * 100)
    store.close()
    again = open_store(tmp_path)
    entry, shared = again.best(np.concatenate([tokens(200), tokens(50, 90)]))
    assert entry is not None and shared == 200
    found = again.read(entry)
    assert found == (bytearray(b"cells" * 100), "disk")
    assert again.read(entry) == (bytearray(b"cells" * 100), "host")  # kept in memory now
    again.close()


def test_torn_truncated_foreign_and_corrupt_files_are_removed_never_loaded(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path)
    paths = []
    for start, fill in ((1, b"x"), (7, b"y"), (13, b"z")):
        written(store, tokens(300, start=start), fill * 1000)
        entry, _ = store.best(tokens(300, start=start))
        assert entry is not None
        paths.append(entry.path)
    store.close()
    truncated, damaged, whole = paths
    folder = tmp_path / IDENTITY.folder_name
    (folder / "half-written.tmp").write_bytes(b"MSKV")  # killed mid-write
    truncated.write_bytes(truncated.read_bytes()[:-10])
    other = StoreIdentity("cd" * 32, "f16")  # written by other weights, copied in by hand
    foreign = KvStore(tmp_path / "elsewhere", other, disk_bytes=1 << 30)
    written(foreign, tokens(300, start=21), b"w" * 1000)
    foreign.close()
    stray = next((tmp_path / "elsewhere" / other.folder_name).glob("*.kv"))
    os.replace(stray, folder / stray.name)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same length, wrong checksum
    damaged.write_bytes(bytes(data))

    again = open_store(tmp_path)
    assert again.entries == 2  # the torn, truncated and foreign files are gone at start
    assert sorted(folder.iterdir()) == sorted([damaged, whole])
    entry, _ = again.best(tokens(300, start=7))
    assert entry is not None and entry.path == damaged
    assert again.read(entry) is None  # the damaged one is found out when read...
    assert not damaged.exists() and again.counters.load_failures == 1  # ...and removed
    entry, _ = again.best(tokens(300, start=13))
    assert entry is not None and again.read(entry) == (bytearray(b"z" * 1000), "disk")
    again.close()


def test_cells_written_without_flash_attention_are_never_loaded_with_it(tmp_path: Path) -> None:
    # Without flash attention llama.cpp keeps V transposed: the same weights' cells are
    # another layout, kept apart and refused even when copied across by hand.
    transposed = StoreIdentity(IDENTITY.weights_sha256, "f16", flash_attn=False)
    assert transposed.folder_name != IDENTITY.folder_name
    assert IDENTITY.folder_name == f"{'ab' * 8}-f16"  # the name stores had before the choice
    other = KvStore(tmp_path, transposed, disk_bytes=1 << 30)
    written(other, tokens(300), b"t" * 1000)
    other.close()
    again = KvStore(tmp_path, transposed, disk_bytes=1 << 30)
    assert again.best(tokens(300))[0] is not None  # its own kind it finds after a restart
    again.close()
    stray = next((tmp_path / transposed.folder_name).glob("*.kv"))
    (tmp_path / IDENTITY.folder_name).mkdir()
    os.replace(stray, tmp_path / IDENTITY.folder_name / stray.name)
    store = open_store(tmp_path)
    assert store.entries == 0 and store.best(tokens(300))[0] is None
    store.close()


def test_the_disk_tier_keeps_to_its_cap_dropping_the_least_recently_used(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path, disk_bytes=5000)
    for start in (1, 7, 13):
        written(store, tokens(300, start=start), b"p" * 1000)  # ~2.3 kB each
    assert store.entries == 2 and store.bytes_on_disk <= 5000
    assert store.best(tokens(300, start=1))[1] < 300  # the oldest went
    assert store.best(tokens(300, start=13))[1] == 300
    store.close()


def test_a_longer_prompt_of_the_same_conversation_replaces_its_earlier_one(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path)
    written(store, tokens(300), b"a" * 100)
    written(store, tokens(500), b"b" * 100)  # the next turn: the first 300 tokens again
    assert store.entries == 1
    entry, shared = store.best(tokens(300))
    assert entry is not None and entry.n_tokens == 500 and shared == 300
    store.close()


def test_a_full_disk_degrades_to_recompute_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)

    def disk_full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # kv_store calls os.replace
    assert store.store(tokens(300), bytearray(b"c" * 100))
    assert store.flush(timeout=10)
    assert store.entries == 0 and store.counters.store_failures == 1
    assert not list((tmp_path / IDENTITY.folder_name).iterdir())  # no .tmp left behind
    monkeypatch.undo()
    written(store, tokens(300), b"c" * 100)  # space again: it goes on writing
    assert store.entries == 1
    store.close()


def test_the_weights_identity_is_the_catalog_hash_or_the_files_own(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + b"\0" * 100)
    assert kv_store.weights_sha256(weights, "f" * 64, tmp_path) == "f" * 64
    import hashlib

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert kv_store.weights_sha256(weights, None, tmp_path / "memo") == digest
    assert list((tmp_path / "memo").iterdir())  # remembered, not hashed on every start


# ---- the scheduler's moves -----------------------------------------------------------------


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[tuple[Scheduler, FakeContext, KvTiers]]:
    tiers = KvTiers(open_store(tmp_path), min_kept=16)
    scheduler, context = fake_scheduler(pool_cells=512, seq_ctx=512, n_batch=64, tiers=tiers)
    yield scheduler, context, tiers
    scheduler.stop()


def run(scheduler: Scheduler, prompt: list[int], max_tokens: int = 6) -> tuple[str, int]:
    decode, out = job(prompt, max_tokens)
    scheduler.submit(decode)
    out.wait()
    return out.text, out.started.cached_tokens


def test_a_prompt_is_written_once_read_and_served_from_disk_after_a_restart(
    tmp_path: Path,
) -> None:
    prompt = [int(t) for t in tokens(200)]
    fresh, context = fake_scheduler(pool_cells=512, seq_ctx=512)
    fresh_text, _ = run(fresh, prompt)
    fresh.stop()

    tiers = KvTiers(open_store(tmp_path / "home"), min_kept=16)
    first, _ = fake_scheduler(pool_cells=512, seq_ctx=512, tiers=tiers)
    run(first, prompt)
    assert tiers.store.flush(timeout=10)
    first.stop()  # the pool is gone with the process; the files are not

    tiers = KvTiers(open_store(tmp_path / "home", host_bytes=0), min_kept=16)
    restarted, context = fake_scheduler(pool_cells=512, seq_ctx=512, tiers=tiers)
    try:
        text, cached = run(restarted, prompt)
        assert text == fresh_text
        assert cached == len(prompt) - 1
        assert context.loads == 1
        assert context.computed == 1 + 5  # the last prompt token, then the answer
        stats = restarted.kv_cells().tiers
        assert stats is not None and stats.disk_hits == 1 and stats.disk_tokens == cached
    finally:
        restarted.stop()


def test_a_stored_prefix_longer_than_the_pools_match_is_loaded_and_trimmed(
    tiered: tuple[Scheduler, FakeContext, KvTiers],
) -> None:
    scheduler, _, tiers = tiered
    conversation = [int(t) for t in tokens(300)]
    run(scheduler, conversation)
    assert tiers.store.flush(timeout=10)
    # Another conversation runs while this one is idle: its cells leave the pool...
    other, _ = job([int(t) for t in tokens(100, start=30)], 40)
    scheduler.submit(other)
    # ...and the next turn shares 250 of its tokens: they come back from host memory.
    edited = [*conversation[:250], 3, 4, 5]
    text, cached = run(scheduler, edited)
    assert cached == 250
    assert text == run(fake_scheduler(pool_cells=512, seq_ctx=512)[0], edited)[0]
    stats = scheduler.kv_cells().tiers
    assert stats is not None and stats.host_hits == 1 and stats.host_tokens == 250


def test_idle_prefixes_a_tier_holds_leave_the_pool_while_others_run(
    tiered: tuple[Scheduler, FakeContext, KvTiers],
) -> None:
    scheduler, context, tiers = tiered
    run(scheduler, [int(t) for t in tokens(300)])
    assert tiers.store.flush(timeout=10)
    assert scheduler.kv_cells().cached >= 300  # nothing runs: it may stay
    short = [7, 8, 9]  # not kept (under the minimum): stays when it is idle
    run(scheduler, short)
    decode, out = job([int(t) for t in tokens(100, start=30)], 20)
    scheduler.submit(decode)
    out.wait()
    # The 300-token prompt left when the others started; what no tier holds stayed.
    held = {cell.pos for cell in context.kv.cells.values() if cell.pos >= 100}
    assert not any(pos >= 200 for pos in held)
    stats = scheduler.kv_cells().tiers
    assert stats is not None and stats.spilled_cells >= 300
    assert scheduler.kv_cells().cached >= len(short)


def test_cells_llama_cpp_refuses_are_removed_and_the_prompt_computed(
    tiered: tuple[Scheduler, FakeContext, KvTiers], tmp_path: Path
) -> None:
    scheduler, context, tiers = tiered
    prompt = [int(t) for t in tokens(200, start=5)]
    written(tiers.store, np.asarray(prompt, dtype=np.int32), b"not cells")
    text, cached = run(scheduler, prompt)
    assert cached == 0 and context.loads == 0
    assert tiers.store.counters.load_failures == 1
    assert text == run(fake_scheduler(pool_cells=512, seq_ctx=512)[0], prompt)[0]


def test_metrics_show_hits_tokens_bytes_and_times_per_tier(
    tiered: tuple[Scheduler, FakeContext, KvTiers],
) -> None:
    scheduler, _, tiers = tiered
    prompt = [int(t) for t in tokens(300)]
    run(scheduler, prompt)
    assert tiers.store.flush(timeout=10)
    run(scheduler, [int(t) for t in tokens(100, start=30)])  # spills the first
    run(scheduler, prompt)  # back from host memory
    run(scheduler, prompt)  # now from the pool
    metrics = Metrics(memory_probe=lambda: {"m": scheduler.kv_cells()})
    text = metrics.render().decode()

    def value(line: str) -> float:
        found = [row for row in text.splitlines() if row.startswith(line + " ")]
        assert found, line
        return float(found[0].rsplit(" ", 1)[1])

    assert value('mimoserve:kv_tier_hits_total{model="m",tier="host"}') == 1
    assert value('mimoserve:kv_tier_tokens_total{model="m",tier="host"}') == 299
    assert value('mimoserve:kv_tier_hits_total{model="m",tier="pool"}') == 1
    assert value('mimoserve:kv_tier_tokens_total{model="m",tier="disk"}') == 0
    assert value('mimoserve:kv_tier_bytes{model="m",tier="disk"}') == tiers.store.bytes_on_disk > 0
    assert value('mimoserve:kv_tier_seconds_total{model="m",operation="load"}') > 0
    assert value('mimoserve:kv_tier_spilled_cells_total{model="m"}') >= 300


def test_cells_still_being_written_are_served_from_memory_and_may_leave_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    write = KvStore._write

    def slow_disk(self: KvStore, entry: StoredPrefix, payload: bytearray) -> None:
        assert gate.wait(30)
        write(self, entry, payload)

    monkeypatch.setattr(KvStore, "_write", slow_disk)
    tiers = KvTiers(open_store(tmp_path, host_bytes=0), min_kept=16)
    scheduler, context = fake_scheduler(pool_cells=512, seq_ctx=512, tiers=tiers)
    try:
        prompt = [int(t) for t in tokens(300)]
        run(scheduler, prompt)
        run(scheduler, [int(t) for t in tokens(100, start=30)])  # spills the first...
        assert not list((tmp_path / IDENTITY.folder_name).glob("*.kv"))  # ...not yet on disk
        _, cached = run(scheduler, prompt)
        assert cached == len(prompt) - 1 and context.loads == 1  # from memory
        gate.set()
        assert tiers.store.flush(timeout=10)
        assert list((tmp_path / IDENTITY.folder_name).glob("*.kv"))
        assert tiers.store.host_bytes_used == 0  # written: the memory copy gave way (cap 0)
    finally:
        gate.set()
        scheduler.stop()


def test_an_answer_is_kept_only_when_it_adds_enough_to_the_prompt(
    tiered: tuple[Scheduler, FakeContext, KvTiers],
) -> None:
    scheduler, context, tiers = tiered
    run(scheduler, [int(t) for t in tokens(300)], max_tokens=6)
    assert context.saves == 1  # the prompt; six more tokens are not worth a second copy
    run(scheduler, [int(t) for t in tokens(200, start=9)], max_tokens=60)
    assert context.saves == 3  # the prompt, then prompt and answer (it replaces the first)
    assert tiers.store.flush(timeout=10)
    entry, shared = tiers.store.best(tokens(200, start=9))
    assert entry is not None and shared == 200 and entry.n_tokens > 250


def test_a_preempted_sequence_gets_its_prompt_back_from_a_tier_when_it_resumes(
    tmp_path: Path,
) -> None:
    tiers = KvTiers(open_store(tmp_path), min_kept=16)
    scheduler, context = fake_scheduler(pool_cells=400, seq_ctx=400, n_batch=64, tiers=tiers)
    try:
        first, first_out = job([int(t) for t in tokens(150)], 230)
        second_prompt = [int(t) for t in tokens(150, start=31)]
        second, second_out = job(second_prompt, 200, seed=1)
        scheduler.submit(first)
        scheduler.submit(second)
        first_out.wait()
        second_out.wait()
        assert scheduler.preemptions >= 1
        assert context.loads >= 1  # a prompt came back from a tier instead of recomputed
        fresh, _ = fake_scheduler(pool_cells=400, seq_ctx=400, n_batch=64)
        try:
            decode, alone = job(second_prompt, 200, seed=1)
            fresh.submit(decode)
            alone.wait()
            assert second_out.text == alone.text
        finally:
            fresh.stop()
    finally:
        scheduler.stop()


def test_idle_prefixes_leave_before_a_prompt_is_loaded_so_it_takes_their_cells(
    tiered: tuple[Scheduler, FakeContext, KvTiers],
) -> None:
    # llama.cpp attends over every cell up to the highest in use: cells loaded while idle
    # prefixes still held the low ones would sit above them for the whole request.
    scheduler, context, _ = tiered
    first = [int(t) for t in tokens(300)]
    run(scheduler, first)
    run(scheduler, [int(t) for t in tokens(300, start=30)])  # the first leaves the pool
    run(scheduler, first)  # comes back: the second, idle now, must have left before
    assert context.loads == 1
    assert context.cells_at_load == [0]
