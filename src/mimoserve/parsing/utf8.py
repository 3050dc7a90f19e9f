"""Incremental UTF-8 decoding of token bytes.

A multi-byte character is often split across tokens; decoding each token on its own
would emit replacement characters. The incremental decoder holds the incomplete bytes
until the character is whole.
"""

from __future__ import annotations

import codecs


class Utf8Stream:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def finish(self) -> str:
        """Flushes what is held; a truncated character becomes U+FFFD rather than vanishing."""
        return self._decoder.decode(b"", final=True)
