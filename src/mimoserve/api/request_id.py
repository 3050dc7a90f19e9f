"""Request ids: every response carries one, and so do the request's log lines and usage.

A client's own `x-request-id` is kept when it is sane (printable, short); otherwise the
server makes one. The response says it as `x-request-id` (and as `request-id` on the
Anthropic door, where Anthropic's clients look for it), errors and streams included,
since the header goes out with the status line. A plain ASGI middleware: a few
microseconds a request, no task or copy of the body.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mimoserve.context import current_request_id

_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _anthropic(path: str) -> bool:
    return path.startswith(("/anthropic/", "/v1/messages"))


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode(
            "latin-1"
        )
        request_id = given if _SANE.fullmatch(given) else f"req_{uuid.uuid4().hex}"
        token = current_request_id.set(request_id)
        encoded = request_id.encode()
        names = [b"x-request-id", b"request-id"] if _anthropic(scope["path"]) else [b"x-request-id"]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *((n, encoded) for n in names)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (`%(request_id)s`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
