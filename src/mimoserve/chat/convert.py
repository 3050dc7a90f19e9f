"""Wire request -> backend request: normalised messages, sampling, constraints."""

from __future__ import annotations

from typing import Any

from mimoserve.backends.base import (
    Capabilities,
    GenerationRequest,
    OutputConstraint,
    PromptMessage,
    SamplingParams,
)
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.chat import (
    ChatCompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
)
from mimoserve.protocol.messages import (
    AssistantMessage,
    AudioPart,
    DeveloperMessage,
    ImagePart,
    Message,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
    VideoPart,
)

# Hosted MiMo defaults (the seed reference): temperature 1.0, top_p 0.95.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.95

_PART_MODALITY: dict[type, str] = {ImagePart: "image", AudioPart: "audio", VideoPart: "video"}


def _text_of(content: str | list[Any] | None, index: int, model: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for part_index, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        modality = _PART_MODALITY[type(part)]
        # Prompt messages carry text only: no backend takes media yet, so every media
        # part is refused here, naming the part and the model.
        raise InvalidRequestError(
            f"messages[{index}].content[{part_index}] is a {part.type} part, but model "
            f"{model!r} does not accept {modality} input",
            param=f"messages.{index}.content.{part_index}",
            code="unsupported_content",
        )
    return "\n".join(texts)


def to_prompt_message(message: Message, index: int, model: str) -> PromptMessage:
    text = _text_of(message.content, index, model)
    match message:
        case SystemMessage() | DeveloperMessage():
            return PromptMessage(role="system", content=text or "", name=message.name)
        case UserMessage():
            return PromptMessage(role="user", content=text or "", name=message.name)
        case AssistantMessage():
            calls = tuple(call.model_dump() for call in message.tool_calls or ())
            return PromptMessage(
                role="assistant",
                content=text,
                reasoning_content=message.reasoning_content,
                tool_calls=calls,
                name=message.name,
            )
        case ToolMessage():
            return PromptMessage(role="tool", content=text or "", tool_call_id=message.tool_call_id)
    raise AssertionError(f"unhandled message type {type(message).__name__}")


def _sampling(request: ChatCompletionRequest) -> SamplingParams:
    stop = request.stop
    return SamplingParams(
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        seed=request.seed,
        max_tokens=request.max_completion_tokens or request.max_tokens,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
    )


def _check_tools(request: ChatCompletionRequest) -> None:
    names = [tool.function.name for tool in request.tools or ()]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: function names must be unique", param="tools")
    choice = request.tool_choice
    if choice is not None and choice != "none" and not names:
        raise InvalidRequestError("tool_choice is set but no tools were given", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(
            f"tool_choice names function {choice.function.name!r}, which is not in tools",
            param="tool_choice.function.name",
        )


def _constraint(
    request: ChatCompletionRequest, model: str, capabilities: Capabilities
) -> OutputConstraint | None:
    fmt = request.response_format
    if fmt is None or not isinstance(fmt, JsonObjectFormat | JsonSchemaFormat):
        return None
    if not capabilities.constrained_output:
        raise InvalidRequestError(
            f"model {model!r} does not support response_format {fmt.type!r}",
            param="response_format",
        )
    if isinstance(fmt, JsonSchemaFormat):
        return OutputConstraint(schema=fmt.json_schema.schema_)
    return OutputConstraint()


def to_generation_request(
    request: ChatCompletionRequest, capabilities: Capabilities
) -> GenerationRequest:
    if request.logprobs:
        raise InvalidRequestError("logprobs are not supported", param="logprobs")
    _check_tools(request)
    messages = tuple(
        to_prompt_message(message, index, request.model)
        for index, message in enumerate(request.messages)
    )
    tools: tuple[dict[str, Any], ...] = ()
    if request.tools and request.tool_choice != "none":
        tools = tuple(tool.model_dump(exclude_none=True) for tool in request.tools)
    return GenerationRequest(
        messages=messages,
        sampling=_sampling(request),
        tools=tools,
        constraint=_constraint(request, request.model, capabilities),
    )
