"""A fast canned OpenAI-compatible engine for the gateway overhead benchmark.

Raw ASGI, no framework: every request gets the same small answer (or, streaming, the
same few chunks), so what a benchmark measures in front of it is the gateway's cost.
Run: python bench/canned_upstream.py PORT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import uvicorn

_COMPLETION = json.dumps({
    "id": "chatcmpl-canned", "object": "chat.completion", "created": 1, "model": "canned",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!",
                                         "reasoning": "Greeting back."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
}).encode()  # fmt: skip


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1,
            "model": "canned", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"reasoning": "Greeting back."}),
    _chunk({"content": "Hello"}),
    _chunk({"content": " there!"}),
    _chunk({}, "stop"),
]
_USAGE = (b'data: {"id":"chatcmpl-canned","object":"chat.completion.chunk","created":1,'
          b'"model":"canned","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":4,'
          b'"total_tokens":16}}\n\n')  # fmt: skip
_MODELS = b'{"object":"list","data":[{"id":"canned","object":"model"}]}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/models"):
        await _send(send, 200, b"application/json", _MODELS)
        return
    stream = b'"stream":true' in body.replace(b" ", b"")
    if not stream:
        await _send(send, 200, b"application/json", _COMPLETION)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
    for piece in _STREAM:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    if b'"include_usage":true' in body.replace(b" ", b""):
        await send({"type": "http.response.body", "body": _USAGE, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _send(send: Any, status: int, kind: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)  # fmt: skip
