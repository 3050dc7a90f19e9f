"""The OpenAI chat completions door's way out: backend events -> chunks, an answer ->
a completion. Nothing else in the server knows these shapes."""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import AsyncGenerator

from mimoserve.chat.answer import Answer, answer_finish
from mimoserve.chat.choices import IndexedEvent, summed
from mimoserve.chat.service import PreparedChat
from mimoserve.events import (
    AudioDelta,
    ContentDelta,
    Finished,
    Logprobs,
    ReasoningDelta,
    TokenLogprob,
    TokenUsage,
    ToolCallDelta,
    ToolCallStarted,
)
from mimoserve.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    DeltaAudio,
    DeltaFunctionCall,
    DeltaToolCall,
    FinishReason,
    MessageAudio,
    PromptTokensDetails,
    ResponseMessage,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from mimoserve.protocol.messages import FunctionCall, ToolCall
from mimoserve.streams import ClosableStream


def to_usage(usage: TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=usage.reasoning_tokens,
            accepted_prediction_tokens=usage.accepted_prediction_tokens,
            rejected_prediction_tokens=usage.rejected_prediction_tokens,
        ),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens,
                                                  audio_tokens=usage.audio_tokens or None),
        seconds=math.ceil(usage.audio_seconds) if usage.audio_seconds else None,
    )  # fmt: skip


# A synthesised answer's id is not kept for later turns; it expires as OpenAI's do.
AUDIO_EXPIRY_S = 3600


def _audio_id() -> str:
    return f"audio_{uuid.uuid4().hex}"


def to_logprobs(tokens: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobEntry(
            token=t.token, logprob=t.logprob, bytes=list(t.token_bytes),
            top_logprobs=[TopLogprob(token=r.token, logprob=r.logprob, bytes=list(r.token_bytes))
                          for r in t.top],
        )
        for t in tokens
    ])  # fmt: skip


def _choice(chat: PreparedChat, index: int, answer: Answer) -> Choice:
    text = "".join(answer.content)
    calls = [
        ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in answer.calls
    ]
    audio = None
    if answer.audio:
        audio = MessageAudio(id=_audio_id(), data=base64.b64encode(b"".join(answer.audio)).decode(),
                             expires_at=chat.created + AUDIO_EXPIRY_S,
                             transcript="".join(answer.transcript))  # fmt: skip
    message = ResponseMessage(
        content=None if (calls or audio) and not text.strip() else text,
        reasoning_content="".join(answer.reasoning) or None,
        tool_calls=calls or None,
        audio=audio,
    )
    logprobs = to_logprobs(answer.logprobs) if chat.logprobs else None
    return Choice(index=index, message=message, logprobs=logprobs,
                  finish_reason=answer.finish_reason)  # fmt: skip


def to_completion(chat: PreparedChat, answers: list[Answer]) -> ChatCompletion:
    usage = summed([answer.finished for answer in answers if answer.finished is not None])
    return ChatCompletion(
        id=chat.completion_id, created=chat.created, model=chat.model,
        choices=[_choice(chat, i, answer) for i, answer in enumerate(answers)],
        usage=to_usage(usage),
    )  # fmt: skip


class _ChoiceState:
    def __init__(self) -> None:
        self.has_calls = False
        self.audio_id: str | None = None
        # Log-probabilities ride on the choice's next chunk after their tokens: text held
        # back (a possible stop sequence, a partial tag) rules out exact alignment.
        self.pending: list[TokenLogprob] = []


async def to_chunks(
    chat: PreparedChat, events: ClosableStream[IndexedEvent]
) -> AsyncGenerator[ChatCompletionChunk, None]:
    states = [_ChoiceState() for _ in range(chat.n)]
    finished: list[Finished] = []

    def chunk(
        index: int, delta: Delta, finish_reason: FinishReason | None = None
    ) -> ChatCompletionChunk:
        state, logprobs = states[index], None
        if state.pending:
            logprobs = to_logprobs(state.pending)
            state.pending.clear()
        choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs,
                             finish_reason=finish_reason)  # fmt: skip
        return ChatCompletionChunk(id=chat.completion_id, created=chat.created, model=chat.model,
                                   choices=[choice])  # fmt: skip

    for index in range(chat.n):
        yield chunk(index, Delta(role="assistant"))
    async for index, event in events:
        state = states[index]
        if isinstance(event, Logprobs):
            state.pending.extend(event.tokens)
        elif isinstance(event, ContentDelta):
            yield chunk(index, Delta(content=event.text))
        elif isinstance(event, ReasoningDelta):
            yield chunk(index, Delta(reasoning_content=event.text))
        elif isinstance(event, AudioDelta):
            audio = DeltaAudio(data=base64.b64encode(event.data).decode(),
                               transcript=event.transcript or None)  # fmt: skip
            if state.audio_id is None:  # the first piece names the audio
                state.audio_id = audio.id = _audio_id()
                audio.expires_at = chat.created + AUDIO_EXPIRY_S
            yield chunk(index, Delta(audio=audio))
        elif isinstance(event, ToolCallStarted):
            state.has_calls = True
            function = DeltaFunctionCall(name=event.name, arguments="")
            call = DeltaToolCall(index=event.index, id=event.id, type="function", function=function)
            yield chunk(index, Delta(tool_calls=[call]))
        elif isinstance(event, ToolCallDelta):
            function = DeltaFunctionCall(arguments=event.arguments)
            call = DeltaToolCall(index=event.index, function=function)
            yield chunk(index, Delta(tool_calls=[call]))
        elif isinstance(event, Finished):
            yield chunk(index, Delta(), answer_finish(event, state.has_calls))
            finished.append(event)
            if len(finished) < chat.n:
                continue
            if chat.include_usage:
                yield ChatCompletionChunk(id=chat.completion_id, created=chat.created,
                                          model=chat.model, choices=[],
                                          usage=to_usage(summed(finished)))  # fmt: skip
            return
