"""Which limits apply to a key: its own, else its account's, else the server's defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """None means unlimited."""

    rpm: int | None = None  # requests per minute, per account and model
    tpm: int | None = None  # tokens per minute (prompt + completion), per account and model
    max_concurrent: int | None = None  # requests in flight, per key

    def overridden_by(self, other: Limits) -> Limits:
        return Limits(
            rpm=other.rpm if other.rpm is not None else self.rpm,
            tpm=other.tpm if other.tpm is not None else self.tpm,
            max_concurrent=(
                other.max_concurrent if other.max_concurrent is not None else self.max_concurrent
            ),
        )
