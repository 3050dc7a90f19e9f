"""The served OpenAPI document: FastAPI's, plus the chat route and the real error shape.

The chat route is a plain Starlette route (see api/chat.py), which FastAPI does not
describe, so its operation is registered here from the same pydantic models that
validate it. Every operation documents the contract's error body for the statuses the
server really answers with (400 where FastAPI would say 422). Optional fields are
marked nullable, as OpenAI's schema has them and as the server accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from mimoserve.protocol.anthropic import CountTokensRequest, MessagesRequest
from mimoserve.protocol.audio import SpeechRequest
from mimoserve.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorBody,
)
from mimoserve.protocol.responses import ResponsesRequest

_REF = "#/components/schemas/{model}"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_ERRORS = {
    "400": "Invalid request (names the parameter)",
    "401": "Missing, invalid, expired or revoked key",
    "403": "The key may not use this model",
    "404": "Unknown model or route",
    "413": "Request body over the limit",
    "429": "Rate limit reached (Retry-After)",
    "503": "Busy, store or engine unavailable (Retry-After)",
}
_PUBLIC_ERRORS = ("400", "401", "403", "404", "413", "429", "503")


def _nullable_optionals(schema: Any) -> Any:
    """Properties that are not required also accept null (OpenAI's convention)."""
    if isinstance(schema, list):
        return [_nullable_optionals(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _nullable_optionals(value) for key, value in schema.items()}
    properties = out.get("properties")
    if isinstance(properties, dict):
        required = set(out.get("required", ()))
        for name, prop in properties.items():
            if name not in required and not _accepts_null(prop):
                properties[name] = {"anyOf": [prop, {"type": "null"}]}
    return out


def _accepts_null(schema: dict[str, Any]) -> bool:
    if schema.get("type") == "null":
        return True
    return any(_accepts_null(s) for s in schema.get("anyOf", ()) if isinstance(s, dict))


def _register(components: dict[str, Any], model: type[BaseModel], *, request: bool) -> None:
    schema = model.model_json_schema(
        ref_template=_REF, mode="validation" if request else "serialization"
    )
    if request:
        schema = _nullable_optionals(schema)
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema


_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}


def _door_operation(
    summary: str,
    request: str,
    answer: dict[str, Any],
    error: dict[str, Any],
    answered: str = "The answer, or with `stream` a server-sent event stream",
) -> dict[str, Any]:
    """A door: its request schema, its answer (JSON or an event stream), its errors."""
    return {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
            },
        },
        "responses": {
            "200": {
                "description": answered,
                "content": {
                    "application/json": {"schema": answer},
                    "text/event-stream": {"schema": _EVENT},
                },
            },
            **{code: _error(code, error) for code in _PUBLIC_ERRORS},
        },
        "security": [{"ApiKey": []}, {"Bearer": []}],
    }


def _other_doors(paths: dict[str, Any]) -> None:
    message = {
        "type": "object",
        "required": ["id", "type", "role", "content", "stop_reason", "usage"],
    }
    count = {"type": "object", "required": ["input_tokens"]}
    response = {"type": "object", "required": ["id", "object", "status", "output", "model"]}
    for prefix in ("", "/anthropic"):
        paths[f"{prefix}/v1/messages"] = {
            "post": _door_operation(
                "Create a message (Anthropic Messages)",
                "MessagesRequest",
                message,
                _ANTHROPIC_ERROR,
            )
        }
        paths[f"{prefix}/v1/messages/count_tokens"] = {
            "post": _door_operation(
                "Count a message's input tokens", "CountTokensRequest", count, _ANTHROPIC_ERROR
            )
        }
    paths["/v1/responses"] = {
        "post": _door_operation(
            "Create a response (OpenAI Responses, stateless)",
            "ResponsesRequest",
            response,
            _ERROR_REF,
        )
    }


_BYTES = {"type": "string", "format": "binary"}


def _audio_doors(paths: dict[str, Any], model_ids: Sequence[str]) -> None:
    """OpenAI's speech endpoints: JSON in and audio bytes out; a multipart form in and a
    transcript (JSON or text) out."""
    security: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]
    paths["/v1/audio/speech"] = {"post": {
        "summary": "Synthesise speech (OpenAI's shape); the bytes stream as they are made",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/SpeechRequest"}}}},
        "responses": {"200": {"description": "The audio", "content": {
            kind: {"schema": _BYTES} for kind in ("audio/mpeg", "audio/wav", "audio/pcm")}}},
        "security": security,
    }}  # fmt: skip
    model: dict[str, Any] = {"type": "string", **({"enum": list(model_ids)} if model_ids else {})}
    form = {
        "type": "object",
        "required": ["file", "model"],
        "properties": {
            "file": _BYTES, "model": model, "language": {"type": "string"},
            "prompt": {"type": "string"}, "temperature": {"type": "number"},
            "response_format": {"type": "string",
                                "enum": ["json", "text", "srt", "verbose_json", "vtt"]},
        },
    }  # fmt: skip
    transcript = {"type": "object", "required": ["text"],
                  "properties": {"text": {"type": "string"}}}  # fmt: skip
    paths["/v1/audio/transcriptions"] = {"post": {
        "summary": "Transcribe an audio file (OpenAI's shape)",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
        "responses": {"200": {"description": "The transcript", "content": {
            "application/json": {"schema": transcript},
            "text/plain": {"schema": {"type": "string"}}}}},
        "security": security,
    }}  # fmt: skip


def _error(code: str, schema: dict[str, Any] = _ERROR_REF) -> dict[str, Any]:
    return {"description": _ERRORS[code], "content": {"application/json": {"schema": schema}}}


def _document_errors(paths: dict[str, Any]) -> None:
    for path, item in paths.items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are answered with 400
            public = not path.startswith("/admin")
            codes: tuple[str, ...] = _PUBLIC_ERRORS if public else ("400", "401", "404", "503")
            if path in ("/health", "/metrics"):
                codes = ()
            elif path == "/ready":
                codes = ("503",)
            for code in codes:
                responses.setdefault(code, _error(code))


def install_openapi(app: FastAPI, model_ids: Sequence[str] = ()) -> None:
    """`model_ids`: the ids this server serves, listed in the document as `model`'s values
    (any other id is a 404), so generated requests can reach the core of the API."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = build()
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for wire in (ChatCompletionRequest, MessagesRequest, CountTokensRequest, ResponsesRequest,
                     SpeechRequest):  # fmt: skip
            _register(schemas, wire, request=True)
            if model_ids:
                schemas[wire.__name__]["properties"]["model"]["enum"] = list(model_ids)
        for model in (ChatCompletion, ChatCompletionChunk, ErrorBody):
            _register(schemas, model, request=False)
        components.setdefault("securitySchemes", {}).update(
            {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "api-key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            }
        )
        paths = document.setdefault("paths", {})
        chat = _door_operation(
            "Create a chat completion",
            "ChatCompletionRequest",
            {"$ref": "#/components/schemas/ChatCompletion"},
            _ERROR_REF,
            "The completion, or with `stream` a server-sent event stream of "
            "ChatCompletionChunk objects ending with `data: [DONE]`",
        )
        paths["/v1/chat/completions"] = {"post": {**chat, "operationId": "create_chat_completion"}}
        _other_doors(paths)
        _audio_doors(paths, model_ids)
        _document_errors(paths)
        metrics = paths.get("/metrics", {}).get("get", {}).get("responses", {}).get("200")
        if metrics is not None:  # Prometheus text format, not JSON
            metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
