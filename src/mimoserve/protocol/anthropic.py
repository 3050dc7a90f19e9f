"""Anthropic Messages request models (the `/v1/messages` door). Wire shapes only.

Content blocks stay plain dicts: clients (Claude Code first) send block types this
server does not know, and those must be ignored, not refused; the door reads the
types it knows and checks them as it translates.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from mimoserve.protocol.wire import WireModel


class AnthropicMessage(WireModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class AnthropicToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class ThinkingConfig(WireModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)


class OutputConfig(WireModel):
    effort: str | None = None


class MessagesRequest(WireModel):
    # Unknown top-level fields (context_management, ...) are kept to be logged.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=256)
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    stream: bool = False


class CountTokensRequest(MessagesRequest):
    max_tokens: int = Field(default=1, ge=1)  # not needed to count
