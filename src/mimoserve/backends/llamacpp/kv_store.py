"""The tiers under the KV pool: prompts' cells kept in host memory and on disk.

What is kept is llama.cpp's own serialisation of one sequence's cells
(`llama_state_seq_get_data`), keyed by the exact token ids they were computed from. A
request whose longest cached match is here gets the cells loaded into the pool (and
trimmed to the part it shares) instead of recomputed: loading 10,000 tokens' cells is a
copy of ~120 MB, reading them is minutes of compute on a CPU.

Files live in one folder per (weights, KV type): a file is only ever loaded into the
engine it was written by. Each is written under a temporary name and renamed when
complete, so a crash leaves either a whole file or a `.tmp` that the next start removes;
a file whose header, identity, length or checksum is wrong is removed, never loaded.

Writing happens on a thread of its own: the scheduler hands over the bytes and goes on
decoding. Host memory keeps the most recently stored or loaded payloads (LRU, capped),
so a prefix that just left the pool comes back without touching the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"MSKV"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sII")  # magic, version, length of the JSON header
_HEADER_JSON_MAX = 256  # the JSON header is ~170 bytes: room reserved before it is written
SUFFIX = ".kv"


@dataclass(frozen=True)
class StoreIdentity:
    """What a file's cells are valid for: the exact weights (their sha256), KV type, and
    whether flash attention wrote them (without it llama.cpp keeps V transposed)."""

    weights_sha256: str
    kv_type: str
    flash_attn: bool = True

    @property
    def folder_name(self) -> str:
        # Flash attention on keeps the name stores were written under before the choice.
        layout = "" if self.flash_attn else "-vt"
        return f"{self.weights_sha256[:16]}-{self.kv_type}{layout}"


@dataclass(eq=False)
class StoredPrefix:
    """One file: the cells of `tokens` (positions 0..len-1)."""

    tokens: np.ndarray  # int32
    path: Path
    size: int  # bytes on disk
    payload_bytes: int
    checksum: int
    pending: bool = False  # taken, not yet on disk (then only in memory)
    last_used: float = field(default_factory=time.time)  # wall clock: kept across restarts (mtime)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class TierCounters:
    """The store's own counts since start (hits per tier are the scheduler side's)."""

    stores: int = 0
    store_failures: int = 0  # full disk, unwritable folder, writer queue full
    store_seconds: float = 0.0
    load_failures: int = 0  # removed as torn or foreign, or refused by llama.cpp


def common_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class KvStore:
    """The disk tier (with its host-memory cache) of one engine."""

    def __init__(
        self,
        root: Path,
        identity: StoreIdentity,
        *,
        disk_bytes: int,
        host_bytes: int = 0,
        queue_bytes: int = 1 << 30,
    ) -> None:
        self.identity = identity
        self.folder = root / identity.folder_name
        self.disk_bytes = disk_bytes
        self.host_bytes = host_bytes
        self.counters = TierCounters()
        self._entries: dict[Path, StoredPrefix] = {}
        self._host: OrderedDict[Path, bytearray] = OrderedDict()
        self._host_used = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[StoredPrefix, bytearray] | None] = queue.Queue()
        self._queued_bytes = 0
        self._queue_cap = queue_bytes
        self._idle = threading.Condition(self._lock)
        self._writing = 0
        self._open()
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer",
                                        daemon=True)  # fmt: skip
        self._writer.start()

    # ---- the index ----------------------------------------------------------------------

    def _open(self) -> None:
        """Reads every file's header; removes what cannot be loaded."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("KV disk tier off: cannot create %s (%s)", self.folder, exc)
            self.disk_bytes = 0
            return
        for path in self.folder.iterdir():
            if path.suffix != SUFFIX:
                _remove(path)  # a write that never finished
                continue
            entry = self._read_header(path)
            if entry is None:
                log.warning("removing %s: not a whole KV file of these weights", path.name)
                _remove(path)
                continue
            self._entries[path] = entry
        self._make_room(0)  # a cap lowered since the last start
        if self._entries:
            log.info("KV disk tier: %d prefixes (%d MB) in %s", len(self._entries),
                     self.bytes_on_disk // 1_000_000, self.folder)  # fmt: skip

    def _read_header(self, path: Path) -> StoredPrefix | None:
        try:
            with path.open("rb") as file:
                magic, version, length = _HEADER.unpack(file.read(_HEADER.size))
                if magic != MAGIC or version != FORMAT_VERSION or length > 1 << 16:
                    return None
                header = json.loads(file.read(length))
                n = int(header["n_tokens"])
                tokens = np.frombuffer(file.read(4 * n), dtype="<i4").astype(np.int32)
            size = path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None
        expected = _HEADER.size + length + 4 * n + int(header.get("payload_bytes", -1))
        if (
            header.get("weights_sha256") != self.identity.weights_sha256
            or header.get("kv_type") != self.identity.kv_type
            # (Files from before the choice have no key: flash attention wrote them.)
            or header.get("flash_attn", True) != self.identity.flash_attn
            or tokens.shape[0] != n
            or size != expected
        ):
            return None
        return StoredPrefix(tokens, path, size, int(header["payload_bytes"]),
                            int(header["checksum"]), last_used=path.stat().st_mtime)  # fmt: skip

    @property
    def bytes_on_disk(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def host_bytes_used(self) -> int:
        return self._host_used

    def best(self, tokens: np.ndarray) -> tuple[StoredPrefix | None, int]:
        """The stored prefix sharing the most leading tokens with `tokens`, and how many."""
        with self._lock:
            return self._best_locked(tokens)

    def _best_locked(self, tokens: np.ndarray) -> tuple[StoredPrefix | None, int]:
        best: StoredPrefix | None = None
        length = 0
        for entry in self._entries.values():
            shared = common_length(entry.tokens, tokens)
            if shared > length:
                best, length = entry, shared
        return best, length

    # ---- reading ------------------------------------------------------------------------

    def read(self, entry: StoredPrefix) -> tuple[bytearray, str] | None:
        """The payload and the tier it came from ("host" or "disk"); None (and the file
        removed) when it is not what its header says."""
        with self._lock:
            payload = self._host.get(entry.path)
            if payload is not None:
                self._host.move_to_end(entry.path)
                entry.last_used = time.time()
                return payload, "host"
            if entry.pending:
                return None  # dropped from memory before it was written: gone
        offset = entry.size - entry.payload_bytes
        payload = bytearray(entry.payload_bytes)
        try:
            with entry.path.open("rb") as file:
                file.seek(offset)
                got = file.readinto(payload)
        except OSError:
            got = -1
        with self._lock:
            if entry.path not in self._entries:
                return None  # replaced or evicted by the writer meanwhile: not a fault
        if got != entry.payload_bytes or zlib.crc32(payload) != entry.checksum:
            log.warning("removing %s: its cells do not match their checksum", entry.path.name)
            self.discard(entry)
            return None
        entry.last_used = time.time()
        with contextlib.suppress(OSError):  # the LRU order survives a restart
            os.utime(entry.path)
        with self._lock:
            if self._entries.get(entry.path) is entry:
                self._keep_in_host(entry.path, payload)
        return payload, "disk"

    def discard(self, entry: StoredPrefix) -> None:
        with self._lock:
            self._forget(entry)
        self.counters.load_failures += 1

    # ---- writing ------------------------------------------------------------------------

    def store(self, tokens: np.ndarray, payload: bytearray) -> bool:
        """Takes the cells of `tokens`: held in memory at once (found by `best`, served by
        `read`), written to disk by the writer thread. False when the writer is too far
        behind (the prefix is then recomputed if it is needed again, as without tiers)."""
        if self.disk_bytes <= 0:
            return False
        tokens = tokens.astype(np.int32, copy=True)
        name = hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()[:32] + SUFFIX
        # The header's exact length is known once the checksum is (on the writer).
        estimate = _HEADER.size + _HEADER_JSON_MAX + 4 * tokens.shape[0] + len(payload)
        entry = StoredPrefix(tokens, self.folder / name, estimate, len(payload), 0,
                             pending=True)  # fmt: skip
        with self._lock:
            if self._best_locked(tokens)[1] >= tokens.shape[0]:
                return True  # held already
            if estimate > self.disk_bytes or self._queued_bytes + len(payload) > self._queue_cap:
                self.counters.store_failures += 1
                return False
            # A conversation grows turn by turn: its earlier prompts are prefixes of this
            # one, and this entry serves every request they served.
            for older in list(self._entries.values()):
                if common_length(older.tokens, tokens) == older.n_tokens:
                    self._forget(older)
            self._make_room(estimate)
            self._entries[entry.path] = entry
            self._keep_in_host(entry.path, payload, pinned=True)
            self._queued_bytes += len(payload)
            self._writing += 1
        self._queue.put((entry, payload))
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything taken is on disk (tests, shutdown)."""
        with self._idle:
            return bool(self._idle.wait_for(lambda: self._writing == 0, timeout=timeout))

    def close(self) -> None:
        self.flush(timeout=30)
        self._queue.put(None)
        self._writer.join(timeout=30)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            entry, payload = item
            try:
                self._write(entry, payload)
            except Exception:  # a bug here must not stop later writes
                log.exception("writing a KV prefix failed")
                self.counters.store_failures += 1
                with self._lock:
                    self._forget(entry)
            finally:
                with self._idle:
                    self._queued_bytes -= len(payload)
                    self._writing -= 1
                    self._idle.notify_all()

    def _write(self, entry: StoredPrefix, payload: bytearray) -> None:
        with self._lock:
            if self._entries.get(entry.path) is not entry:
                return  # replaced by a longer prompt or evicted before its turn
        began = time.perf_counter()
        checksum = zlib.crc32(payload)
        header = json.dumps({
            "weights_sha256": self.identity.weights_sha256,
            "kv_type": self.identity.kv_type,
            "flash_attn": self.identity.flash_attn,
            "n_tokens": entry.n_tokens,
            "payload_bytes": len(payload),
            "checksum": checksum,
        }).encode()  # fmt: skip
        temporary = entry.path.with_suffix(".tmp")
        try:
            with temporary.open("wb") as file:
                file.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(header)))
                file.write(header)
                file.write(entry.tokens.astype("<i4").tobytes())
                file.write(payload)
            os.replace(temporary, entry.path)
        except OSError as exc:
            # A full disk or a folder gone: this prefix is recomputed when needed again.
            log.warning("KV disk tier: could not write a prefix (%s); serving goes on", exc)
            _remove(temporary)
            self.counters.store_failures += 1
            with self._lock:
                self._forget(entry)
            return
        with self._lock:
            if self._entries.get(entry.path) is not entry:
                _remove(entry.path)  # evicted while it was being written
                return
            entry.size = _HEADER.size + len(header) + 4 * entry.n_tokens + len(payload)
            entry.checksum, entry.pending = checksum, False
            self._trim_host()  # written: its memory copy may now give way to newer ones
        self.counters.stores += 1
        self.counters.store_seconds += time.perf_counter() - began

    # ---- room (under the lock) ---------------------------------------------------------

    def _make_room(self, size: int) -> None:
        while self._entries and self.bytes_on_disk + size > self.disk_bytes:
            self._forget(min(self._entries.values(), key=lambda e: e.last_used))

    def _forget(self, entry: StoredPrefix) -> None:
        if self._entries.get(entry.path) is entry:
            del self._entries[entry.path]
            payload = self._host.pop(entry.path, None)
            if payload is not None:
                self._host_used -= len(payload)
        _remove(entry.path)

    def _keep_in_host(self, path: Path, payload: bytearray, *, pinned: bool = False) -> None:
        """Keeps a payload in memory; `pinned` (not yet on disk) ones are over the cap
        until written, as the writer's queue is."""
        if len(payload) > self.host_bytes and not pinned:
            return
        old = self._host.pop(path, None)
        if old is not None:
            self._host_used -= len(old)
        self._host[path] = payload
        self._host_used += len(payload)
        self._trim_host()

    def _trim_host(self) -> None:
        for path in list(self._host):
            if self._host_used <= self.host_bytes:
                return
            entry = self._entries.get(path)
            if entry is not None and entry.pending:
                continue  # its only copy
            self._host_used -= len(self._host.pop(path))


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def weights_sha256(path: Path, known: str | None, cache_dir: Path) -> str:
    """The weights' identity: the catalog's sha256 when it names them, else the file's
    own, computed once and remembered by (path, size, mtime)."""
    if known:
        return known
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    memo = cache_dir / f"weights-{key.hexdigest()[:24]}.sha256"
    try:
        text = memo.read_text().strip()
        if len(text) == 64:
            return text
    except OSError:
        pass
    with path.open("rb") as file:
        value = hashlib.file_digest(file, "sha256").hexdigest()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:
        pass
    return value
