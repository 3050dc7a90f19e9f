"""The internal chat request -> the request of an engine that generates text (the
embedded llama.cpp engine): normalised messages, sampling, constraints, thinking, and
the plan that turns the engine's text into events."""

from __future__ import annotations

from typing import Any

from mimoserve.backends.base import (
    Capabilities,
    GenerationRequest,
    OutputConstraint,
    PromptMessage,
    SamplingParams,
    Thinking,
)
from mimoserve.errors import InvalidRequestError
from mimoserve.parsing.assembler import OutputPlan
from mimoserve.parsing.output import OutputFormat
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
from mimoserve.registry import ModelEntry

# Hosted MiMo defaults (the seed reference): temperature 1.0, top_p 0.95.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.95
# top_p over a whole vocabulary means sorting it: measured here, 4.4 ms per token on
# SmolLM2's 49k tokens and 14 ms on Qwen's 151k, a third of a decode step. Cutting to
# the 40 most likely tokens first (llama.cpp's and Ollama's default too) costs 0.1-0.3 ms
# and, for top_p 0.95, almost never changes which tokens remain. `top_k: 0` restores
# the exact full-vocabulary nucleus.
DEFAULT_TOP_K = 40

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
        # The embedded engine takes text only (media goes to upstream engines that declare
        # it, see chat/media.py), so every media part is refused here, naming the part
        # and the model.
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
        ignore_eos=bool(request.ignore_eos),
        top_k=DEFAULT_TOP_K if request.top_k is None else request.top_k,
        min_p=request.min_p or 0.0,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
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


def _tool_schemas(request: ChatCompletionRequest) -> dict[str, dict[str, Any]]:
    schemas: dict[str, dict[str, Any]] = {}
    for tool in request.tools or ():
        parameters = tool.function.parameters or {}
        if parameters.get("type", "object") != "object":
            raise InvalidRequestError(
                f"tools: parameters of {tool.function.name!r} must be a JSON schema of type object",
                param="tools",
                code="invalid_schema",
            )
        properties = parameters.get("properties", {})
        if not isinstance(properties, dict) or not all(
            isinstance(value, dict | bool) for value in properties.values()
        ):
            raise InvalidRequestError(
                f"tools: the properties of {tool.function.name!r} must be an object whose"
                " values are JSON schemas",
                param="tools",
                code="invalid_schema",
            )
        schemas[tool.function.name] = {"type": "object", **parameters}
    return schemas


def _forced_call_schema(
    request: ChatCompletionRequest, schemas: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """The JSON schema that constrained decoding enforces for `required` or a named choice."""
    tool_choice = request.tool_choice
    if isinstance(tool_choice, NamedToolChoice):
        return schemas[tool_choice.function.name]
    if tool_choice != "required":
        return None
    envelopes = [
        {"type": "object",
         "properties": {"name": {"const": name}, "arguments": schema},
         "required": ["name", "arguments"]}
        for name, schema in schemas.items()
    ]  # fmt: skip
    return envelopes[0] if len(envelopes) == 1 else {"anyOf": envelopes}


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


def _thinking(request: ChatCompletionRequest, entry: ModelEntry, constrained: bool) -> Thinking:
    wanted = request.thinking.type == "enabled" if request.thinking else entry.thinking_default
    # Constrained decoding shapes the output from its first token: no room for a think block.
    if not wanted or entry.thinking == "none" or constrained:
        return Thinking("off")
    budget = request.thinking.budget_tokens if request.thinking else None
    return Thinking(entry.thinking, budget or entry.thinking_budget)


def to_generation_request(
    request: ChatCompletionRequest, capabilities: Capabilities, entry: ModelEntry
) -> GenerationRequest:
    _check_tools(request)
    messages = tuple(
        to_prompt_message(message, index, request.model)
        for index, message in enumerate(request.messages)
    )
    use_tools = bool(request.tools) and request.tool_choice != "none"
    schemas = _tool_schemas(request) if use_tools else {}
    forced = _forced_call_schema(request, schemas) if use_tools else None
    constraint = (
        OutputConstraint(schema=forced, source="tools")
        if forced is not None
        else _constraint(request, request.model, capabilities)
    )
    thinking = _thinking(request, entry, constrained=constraint is not None)
    tools = tuple(t.model_dump(exclude_none=True) for t in request.tools or ()) if use_tools else ()
    choice = request.tool_choice
    plan = OutputPlan(
        fmt=OutputFormat(
            # Under a grammar the output is JSON: a `<think>` inside a string is text.
            think=entry.reasoning_parser == "think" and constraint is None,
            start_in_think=thinking.mode == "prompted",
            tool_format=entry.tool_parser if use_tools else None,
        ),
        tools=schemas,
        bare_json=entry.bare_json_tool_calls and use_tools,
        forced_name=choice.function.name if isinstance(choice, NamedToolChoice) else None,
        forced_any=use_tools and choice == "required",
    )
    return GenerationRequest(
        messages=messages,
        sampling=_sampling(request),
        tools=tools,
        constraint=constraint,
        thinking=thinking,
        plan=plan,
        prediction=request.prediction.text if request.prediction is not None else None,
    )
