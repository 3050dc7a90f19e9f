"""Chat completion request, response and stream-chunk models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from mimoserve.protocol.messages import Message, Tool, ToolCall
from mimoserve.protocol.wire import WireModel

_Strict = WireModel

# A stop string is matched against every generated piece; longer ones are not stops.
MAX_STOP_CHARS = 256
# Choices per request: each is a sequence on the engine; more would crowd out other clients.
MAX_CHOICES = 8
# A predicted output (OpenAI's `prediction`) longer than this is refused: it is a guess
# at the answer, and no answer outgrows a context window of text.
MAX_PREDICTION_CHARS = 262_144


class StreamOptions(_Strict):
    include_usage: bool = False


class NamedFunction(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class Thinking(_Strict):
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=1)


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class PredictionText(_Strict):
    type: Literal["text"]
    text: str


class Prediction(_Strict):
    """OpenAI's predicted output: text the answer is expected to repeat largely (a file
    being edited). The engine verifies it as a guess; the answer is what the model writes."""

    type: Literal["content"]
    content: str | Annotated[list[PredictionText], Field(max_length=1024)]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _bounded(self) -> Prediction:
        if len(self.text) > MAX_PREDICTION_CHARS:
            raise ValueError(f"the prediction is longer than {MAX_PREDICTION_CHARS} characters")
        return self


class AudioOutput(_Strict):
    """Speech synthesis: the answer's audio format and voice (hosted TTS models, OpenAI)."""

    format: Literal["wav", "mp3", "pcm16"] = "wav"
    voice: str = Field(default="mimo_default", min_length=1, max_length=64)
    # An extension (OpenAI's speech endpoint has it): 2.0 speaks twice as fast.
    speed: float = Field(default=1.0, ge=0.25, le=4.0)


class AsrOptions(_Strict):
    language: Literal["auto", "zh", "en"] = "auto"


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class ChatCompletionRequest(WireModel):
    # Unknown top-level fields are kept (to be logged) rather than rejected.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]]
        | None
    ) = Field(default=None, max_length=16)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    prediction: Prediction | None = None
    # Speech: the synthesised answer's format and voice; recognition's language; OpenAI
    # clients also say which modalities they want back.
    audio: AudioOutput | None = None
    asr_options: AsrOptions | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, max_length=2)
    # Extensions, named as in vLLM and llama-server:
    # keep generating past end-of-turn tokens, up to max_completion_tokens;
    ignore_eos: bool | None = None
    # sample among the k most likely tokens only (0: all); see convert.DEFAULT_TOP_K;
    top_k: int | None = Field(default=None, ge=0)
    # drop tokens less likely than min_p times the most likely one.
    min_p: float | None = Field(default=None, ge=0, le=1)


# ---- responses ---------------------------------------------------------------------------


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    # Predicted outputs, as OpenAI reports them (0 without a prediction).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    audio_tokens: int | None = None  # prompt tokens that were audio (sent when there was any)

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails = Field(
        default_factory=CompletionTokensDetails
    )
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    seconds: int | None = None  # of audio heard or spoken, as the hosted speech models report

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


def _without_none(data: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep}


class MessageAudio(BaseModel):
    """A synthesised answer, as OpenAI's audio outputs and the hosted TTS models send it."""

    id: str
    data: str  # base64 of the whole file
    expires_at: int
    transcript: str


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    audio: MessageAudio | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        # `content` is always present (null when the answer is only tool calls).
        return _without_none(handler(self), keep=("content",))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


def _without_absent_logprobs(data: dict[str, Any]) -> dict[str, Any]:
    # Sent only when asked for, as the hosted API's answers show.
    if data.get("logprobs") is None:
        data.pop("logprobs", None)
    return data


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_absent_logprobs(handler(self))


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


class DeltaAudio(BaseModel):
    """A piece of a streamed audio answer: the first carries the id, each carries base64
    data and the transcript of what it speaks, the last the expiry (as OpenAI streams)."""

    id: str | None = None
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self))


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    audio: DeltaAudio | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        # Some clients treat "" or null as "present": send only what this chunk carries.
        return _without_none(handler(self))


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        return _without_absent_logprobs(handler(self))


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _omit_usage(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), keep=("id", "object", "created", "model", "choices"))


# ---- models and errors -----------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mimoserve"
    # Which weights really serve this id (the public ids are aliases on a self-hosted server).
    root: str
    context_length: int | None = None
    # What Anthropic clients read from the same list.
    type: Literal["model"] = "model"
    display_name: str = ""
    created_at: str = ""  # RFC 3339


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # Anthropic's paging fields (one page holds every model).
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
