"""Server-sent events framing of a chunk stream, with in-stream errors and `[DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from mimoserve.api.errors import error_body
from mimoserve.errors import EngineError, MimoError
from mimoserve.protocol.chat import ChatCompletionChunk

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def frame(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def sse_frames(
    chunks: AsyncGenerator[ChatCompletionChunk, None] | AsyncGenerator[list[dict[str, Any]], None],
) -> AsyncIterator[bytes]:
    """Once bytes have been sent the status code is fixed: errors become an error event.

    Chunks are models (the embedded engine) or batches of plain dicts already in the
    contract's shape (relayed from an upstream engine, where a model round trip would cost
    time); a batch is framed into one write.
    """
    try:
        async for chunk in chunks:
            if isinstance(chunk, list):
                yield b"".join(
                    frame(json.dumps(item, ensure_ascii=False, separators=(",", ":")))
                    for item in chunk
                )
            else:
                yield frame(chunk.model_dump_json())
    except MimoError as exc:
        yield frame(json.dumps(error_body(exc)))
    except Exception:
        log.exception("stream failed after it started")
        yield frame(json.dumps(error_body(EngineError("engine failed while generating"))))
    finally:
        await chunks.aclose()
    yield DONE
