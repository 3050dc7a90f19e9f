"""OpenAI Responses request model (the `/v1/responses` door). Wire shapes only.

Input items and tools stay plain dicts: Codex sends item and tool types this server does
not serve (built-in tools, namespaces), and those must not fail the request; the door
reads the types it knows as it translates.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from mimoserve.protocol.wire import WireModel


class ReasoningOptions(WireModel):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(WireModel):
    # Unknown top-level fields are kept to be logged.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=256)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    reasoning: ReasoningOptions | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = None  # accepted; this server stores nothing
    include: list[str] | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
