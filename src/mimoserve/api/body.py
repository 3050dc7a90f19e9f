"""Reads and validates a JSON request body: size limit, content type, schema."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from mimoserve.errors import InvalidRequestError, PayloadTooLargeError
from mimoserve.parsing.safe_json import NOT_JSON, loads_or_not_json

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    too_large = PayloadTooLargeError(f"Request body is larger than the limit of {limit} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    # Chunked bodies carry no length: count while reading and stop at the limit.
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise too_large
    return bytes(received)


def _child(node: Any, step: int | str) -> tuple[bool, Any]:
    if isinstance(node, dict) and isinstance(step, str) and step in node:
        return True, node[step]
    if isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
        return True, node[step]
    return False, None


def _param_path(loc: tuple[int | str, ...], data: Any) -> str | None:
    """The dotted path of the offending input, e.g. `messages.0.content`.

    Pydantic also puts union-member labels (`user`, `str`, ...) into `loc`; only the steps
    that exist in the input are kept, plus a missing field's own name at the end.
    """
    path: list[str] = []
    node = data
    for position, step in enumerate(loc):
        found, child = _child(node, step)
        if found:
            node = child
        elif not (isinstance(node, dict) and position == len(loc) - 1):
            continue  # a union label; a missing field at the end is named
        path.append(str(step))
    return ".".join(path) or None


def validation_message(error: ValidationError, data: Any) -> InvalidRequestError:
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return InvalidRequestError(
            f"Request body is not valid JSON: {first['ctx'].get('error', first['msg'])}",
            code="invalid_json",
        )
    param = _param_path(tuple(first["loc"]), data)
    message = f"{param}: {first['msg']}" if param else first["msg"]
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return InvalidRequestError(message, param=param, code=code)


async def read_json_model(request: Request, model: type[ModelT], limit: int) -> ModelT:
    return (await read_json_body(request, model, limit))[0]


async def read_json_body(
    request: Request, model: type[ModelT], limit: int, *, audio_limit: int | None = None
) -> tuple[ModelT, bytes]:
    """The validated model and the raw body it came from (the relay forwards the latter).
    `audio_limit`: a body may be that large if it carries inline audio (checked exactly
    by the caller once parsed; one without any is refused here, before parsing)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise InvalidRequestError(
            f"Content-Type must be application/json, got {content_type or 'none'!r}.",
            code="unsupported_content_type",
        )
    body = await read_body(request, max(limit, audio_limit or 0))
    if len(body) > limit and b'"input_audio"' not in body:
        raise PayloadTooLargeError(f"Request body is larger than the limit of {limit} bytes.")
    try:
        return model.model_validate_json(body), body
    except ValidationError as exc:
        # Only to name the offending parameter; nesting too deep for json is no JSON here.
        data = loads_or_not_json(body.decode("utf-8", "replace"))
        raise validation_message(exc, None if data is NOT_JSON else data) from None
