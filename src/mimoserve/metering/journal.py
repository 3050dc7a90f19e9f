"""The usage journal: every usage record is on disk before the answer's last byte.

The ledger writes records to the database in batches, off the request path; a process
killed between an answer and the next batch would lose them (measured: 4 of 20). So
each record is first appended, as one JSON line, to this process's own journal file,
with a plain `write` (the kernel holds it from then on: a killed process loses
nothing; a power cut can lose what the disk has not flushed, see README). When the
ledger's queue is empty after a write, every journaled record is in the database and
the file is emptied. At start, journals left by processes that are gone (no lock held
on them) are replayed; the database skips records it already has (`record_id`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from mimoserve.metering.records import UsageRecord

log = logging.getLogger(__name__)

_PATTERN = "usage-*.jsonl"
_FIELDS = {f.name for f in dataclasses.fields(UsageRecord)}


class UsageJournal:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"usage-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Held for the life of the process: a journal nobody locks belongs to a dead one.
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.failures = 0

    def append(self, record: UsageRecord) -> None:
        line = json.dumps(dataclasses.asdict(record), ensure_ascii=True) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:  # a full disk must not fail the request; the batch still runs
            self.failures += 1
            log.error("usage journal write failed: %s", exc)

    def clear(self) -> None:
        """Every appended record is in the database."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)

    def close(self, *, remove: bool) -> None:
        if self._fd < 0:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = -1


def read_journal(path: Path) -> list[UsageRecord]:
    """The records in a journal; a torn last line (killed mid-write) is skipped."""
    records: list[UsageRecord] = []
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            data = json.loads(line)
            records.append(UsageRecord(**{k: v for k, v in data.items() if k in _FIELDS}))
        except (ValueError, TypeError):
            log.warning("skipping an unreadable line in %s", path)
    return records


def adopt_orphans(
    folder: Path, take: Callable[[Sequence[UsageRecord]], None], *, own: Path | None = None
) -> int:
    """Hands the records of journals whose process is gone to `take`, then removes those
    journals. The ledger takes them into its own queue and journal, so they are written
    with its retries even if the database is down right now."""
    replayed = 0
    if not folder.is_dir():
        return 0
    for path in sorted(folder.glob(_PATTERN)):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process owns it
            records = read_journal(path)
            take(records)
            replayed += len(records)
            path.unlink()
        finally:
            os.close(fd)
    if replayed:
        log.warning("recovered %d usage records from the journals of a stopped process", replayed)
    return replayed
