"""The real server on the real SmolLM2 model, driven by the official `openai` SDK."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from mimoserve.backends.base import PromptMessage
from mimoserve.backends.llamacpp.template import ChatTemplate
from tests.e2e.server import RunningServer

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)


def test_non_streaming_completion(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="mimo-v2-flash", messages=MESSAGES, max_completion_tokens=40, temperature=0.7
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "mimo-v2-flash"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    usage = completion.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 40


def test_streaming_completion_with_usage(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            # flash: no reasoning by default, so the 30 tokens are all answer
            model="mimo-v2-flash",
            messages=MESSAGES,
            max_completion_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks, "the answer arrives in content deltas"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 30
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_usage_request_has_no_usage_chunk(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="mimo-v2-pro", messages=MESSAGES, max_completion_tokens=5, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_max_completion_tokens_counts_real_tokens(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="mimo-v2-flash",
        messages=[{"role": "user", "content": "Write a long essay about the sea."}],
        max_completion_tokens=7,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    # Seven tokens are far fewer than seven characters' worth of words.
    assert len(completion.choices[0].message.content or "") > 7


def test_prompt_tokens_come_from_the_model_tokenizer(
    sdk: openai.OpenAI, weights_path: Path
) -> None:
    completion = sdk.chat.completions.create(
        model="mimo-v2-flash", messages=MESSAGES, max_completion_tokens=1
    )
    # Vocabulary only: no weights are computed with in the test process.
    vocab = llama_cpp.Llama(str(weights_path), vocab_only=True, verbose=False)
    template = ChatTemplate(vocab.metadata["tokenizer.chat_template"])
    prompt = template.render(
        [
            PromptMessage(role="system", content="You are a helpful assistant."),
            PromptMessage(role="user", content="Name three colours."),
        ]
    )
    expected = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected
    assert expected < len(prompt)


def test_seeded_requests_repeat_and_stream_matches_non_stream(sdk: openai.OpenAI) -> None:
    def ask(stream: bool) -> str:
        common = {"model": "mimo-v2-flash", "max_completion_tokens": 40,
                  "temperature": 0.9, "seed": 1234}  # fmt: skip
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Tell me a fact about cats."}
        ]
        if stream:
            chunks = sdk.chat.completions.create(messages=messages, stream=True, **common)  # type: ignore[call-overload]
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        completion = sdk.chat.completions.create(messages=messages, **common)  # type: ignore[call-overload]
        return str(completion.choices[0].message.content)

    ask(False)  # warm-up: later runs see the same prompt-cache state
    first, second, streamed = ask(False), ask(False), ask(True)
    assert first == second == streamed
    assert first


def test_authentication_errors_reach_the_sdk(server: RunningServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="mimo-v2-flash", messages=MESSAGES)


def test_unknown_model_is_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-17", messages=MESSAGES)


def test_models_list_names_the_real_weights(sdk: openai.OpenAI) -> None:
    models = {m.id: m for m in sdk.models.list()}
    text = {"mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni", "mimo-v2.5-pro", "mimo-v2.5"}
    speech = {"mimo-v2.5-tts": "piper-en-us-joe-medium",
              "mimo-v2.5-tts-voicedesign": "piper-en-us-joe-medium",
              "mimo-v2.5-tts-voiceclone": "piper-en-us-joe-medium",
              "mimo-v2.5-asr": "whisper-tiny-en"}  # fmt: skip
    assert set(models) == text | set(speech)
    roots = {name: (m.model_extra or {}).get("root") for name, m in models.items()}
    assert roots == {**dict.fromkeys(text, "smollm2-135m-instruct"), **speech}
    assert sdk.models.retrieve("mimo-v2-omni").id == "mimo-v2-omni"
    assert sdk.models.retrieve("mimo-v2.5-asr").id == "mimo-v2.5-asr"
