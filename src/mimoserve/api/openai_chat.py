"""The OpenAI chat completions door's way out: backend events -> chunks, an answer ->
a completion. Nothing else in the server knows these shapes."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from mimoserve.backends.base import (
    ContentDelta,
    Finished,
    GenerationEvent,
    ReasoningDelta,
    TokenUsage,
    ToolCallDelta,
    ToolCallStarted,
)
from mimoserve.chat.answer import Answer, answer_finish
from mimoserve.chat.service import PreparedChat
from mimoserve.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FinishReason,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)
from mimoserve.protocol.messages import FunctionCall, ToolCall
from mimoserve.streams import ClosableStream


def to_usage(usage: TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def to_completion(chat: PreparedChat, answer: Answer) -> ChatCompletion:
    text = "".join(answer.content)
    calls = [
        ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in answer.calls
    ]
    message = ResponseMessage(
        content=None if calls and not text.strip() else text,
        reasoning_content="".join(answer.reasoning) or None,
        tool_calls=calls or None,
    )
    choice = Choice(index=0, message=message, finish_reason=answer.finish_reason)
    return ChatCompletion(id=chat.completion_id, created=chat.created, model=chat.model,
                          choices=[choice], usage=to_usage(answer.usage))  # fmt: skip


async def to_chunks(
    chat: PreparedChat, events: ClosableStream[GenerationEvent]
) -> AsyncGenerator[ChatCompletionChunk, None]:
    def chunk(delta: Delta, finish_reason: FinishReason | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=chat.completion_id, created=chat.created, model=chat.model,
                                   choices=[choice])  # fmt: skip

    has_calls = False
    yield chunk(Delta(role="assistant"))
    async for event in events:
        if isinstance(event, ContentDelta):
            yield chunk(Delta(content=event.text))
        elif isinstance(event, ReasoningDelta):
            yield chunk(Delta(reasoning_content=event.text))
        elif isinstance(event, ToolCallStarted):
            has_calls = True
            function = DeltaFunctionCall(name=event.name, arguments="")
            call = DeltaToolCall(index=event.index, id=event.id, type="function", function=function)
            yield chunk(Delta(tool_calls=[call]))
        elif isinstance(event, ToolCallDelta):
            function = DeltaFunctionCall(arguments=event.arguments)
            yield chunk(Delta(tool_calls=[DeltaToolCall(index=event.index, function=function)]))
        elif isinstance(event, Finished):
            yield chunk(Delta(), answer_finish(event, has_calls))
            if chat.include_usage:
                yield ChatCompletionChunk(id=chat.completion_id, created=chat.created,
                                          model=chat.model, choices=[],
                                          usage=to_usage(event.usage))  # fmt: skip
            return
