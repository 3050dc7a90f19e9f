"""A canned OpenAI-compatible engine for the relay tests: answers, faults and replays.

Runs in a thread (`serve_in_thread`) or as its own process
(`python -m tests.upstream.canned PORT [MODE]`) so a test can kill and restart it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.services import uvicorn_in_thread

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class Canned:
    """What the engine does with the next requests (tests change it as they go)."""

    mode: str = "ok"  # ok | status | garbage | broken | broken_first | slow | replay
    reasoning_field: str = "reasoning_content"
    reasoning: str = "Thinking it over."
    content: str = "Hello from the engine."
    send_usage: bool = True
    status: int = 500
    error_body: Any = field(default_factory=lambda: {"error": "Unauthorized"})
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    replay: str = ""  # fixture file name: the raw body to send
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    cancelled: int = 0
    healthy: bool = True
    # A prefix cache as engines keep one: usage reports, of a prompt of len(text) / 4
    # tokens, the longest prefix shared with any prompt served before as cached.
    prefix_cache: bool = False
    served_prompts: list[str] = field(default_factory=list)

    def usage(self, body: dict[str, Any], completion: int) -> dict[str, Any]:
        if not self.prefix_cache:
            return {"prompt_tokens": 11, "completion_tokens": completion,
                    "total_tokens": 11 + completion}  # fmt: skip
        text = json.dumps(body.get("messages"))
        shared = max((_common(text, seen) for seen in self.served_prompts), default=0)
        self.served_prompts.append(text)
        prompt = len(text) // 4
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": shared // 4}}  # fmt: skip


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def word_logprobs(word: str) -> dict[str, Any]:
    """What vLLM sends per content token when asked for logprobs (the canned answer's
    tokens are its words, each with one rival)."""
    token = {"token": word, "logprob": -0.25, "bytes": list(word.encode())}
    return {**token, "top_logprobs": [token, {"token": "?", "logprob": -3.5, "bytes": [63]}]}


def _completion(c: Canned, model: str, logprobs: bool, body: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": c.content, c.reasoning_field: c.reasoning}
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
    if logprobs:
        choice["logprobs"] = {"content": [word_logprobs(w + " ") for w in c.content.split(" ")]}
    answer: dict[str, Any] = {
        "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1, "model": model,
        "choices": [choice],
    }  # fmt: skip
    if c.send_usage:
        answer["usage"] = c.usage(body, 7)
    return answer


def _chunks(
    c: Canned,
    model: str,
    include_usage: bool,
    logprobs: bool = False,
    body: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    yield chunk({"role": "assistant", "content": ""})
    for word in c.reasoning.split(" "):
        yield chunk({c.reasoning_field: word + " "})
    for word in c.content.split(" "):
        piece = chunk({"content": word + " "})
        if logprobs:
            piece["choices"][0]["logprobs"] = {"content": [word_logprobs(word + " ")]}
        yield piece
    yield chunk({}, "stop")
    if include_usage and c.send_usage:
        yield {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1,
               "model": model, "choices": [],
               "usage": c.usage(body or {}, 9)}  # fmt: skip


def build_app(c: Canned) -> Starlette:
    async def models(request: Request) -> Response:
        if not c.healthy:
            return JSONResponse({"error": "unhealthy"}, status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": "canned", "object": "model"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        c.requests.append(body)
        c.headers.append(dict(request.headers))
        if c.delay_s and not await _sleep_or_notice_disconnect(request, c, c.delay_s):
            return Response(status_code=499)  # nobody is listening any more
        if c.mode == "status":
            return JSONResponse(c.error_body, status_code=c.status)
        if c.mode == "garbage":
            return Response(b"<html>502 Bad Gateway</html>", media_type="application/json")
        if c.mode == "replay":
            raw = (FIXTURES / c.replay).read_bytes()
            kind = "text/event-stream" if c.replay.endswith(".sse") else "application/json"
            return Response(raw, media_type=kind)
        model = body.get("model", "canned")
        logprobs = bool(body.get("logprobs"))
        if not body.get("stream"):
            return JSONResponse(_completion(c, model, logprobs, body))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(request, c, model, include_usage, logprobs, body),
                                 media_type="text/event-stream")  # fmt: skip

    async def stats(request: Request) -> Response:
        return JSONResponse({"requests": len(c.requests), "cancelled": c.cancelled})

    return Starlette(routes=[Route("/v1/models", models), Route("/stats", stats),
                             Route("/v1/chat/completions", chat, methods=["POST"])])  # fmt: skip


async def _sleep_or_notice_disconnect(request: Request, c: Canned, seconds: float) -> bool:
    """Waits `seconds`; False (and counted) if the caller hung up meanwhile."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if await request.is_disconnected():
            c.cancelled += 1
            return False
        await asyncio.sleep(0.02)
    return True


async def _stream(request: Request, c: Canned, model: str, include_usage: bool,
                  logprobs: bool = False, body: dict[str, Any] | None = None,
                  ) -> AsyncIterator[bytes]:  # fmt: skip
    if c.mode == "broken_first":
        return  # closes the body at once: no chunk, no [DONE]
    try:
        for number, chunk in enumerate(_chunks(c, model, include_usage, logprobs, body)):
            if c.mode == "broken" and number == 3:
                yield b"data: {not json\n\n"
                return
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if c.chunk_delay_s:
                await asyncio.sleep(c.chunk_delay_s)
        yield b"data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        c.cancelled += 1
        raise


@contextmanager
def serve_in_thread(c: Canned) -> Iterator[str]:
    """Yields the base URL (…/v1) of a canned engine on 127.0.0.1."""
    with uvicorn_in_thread(build_app(c), lifespan="off") as url:
        yield f"{url}/v1"


if __name__ == "__main__":
    port = int(sys.argv[1])
    canned = Canned(mode=sys.argv[2] if len(sys.argv) > 2 else "ok")
    uvicorn.run(build_app(canned), host="127.0.0.1", port=port, log_level="warning")
