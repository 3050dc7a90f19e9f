"""The Anthropic Messages and OpenAI Responses doors end to end on the real engine
(SmolLM2), through the official SDKs: the same core and engine behind every door."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.e2e.server import RunningServer

pytestmark = pytest.mark.real_model


def test_anthropic_sdk_message_and_stream(server: RunningServer) -> None:
    client = anthropic.Anthropic(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    message = client.messages.create(
        model="mimo-v2-flash", max_tokens=8,
        messages=[{"role": "user", "content": "Say hello."}],
    )  # fmt: skip
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 5 and 0 < message.usage.output_tokens <= 8
    with client.messages.stream(model="mimo-v2-flash", max_tokens=8,
                                messages=[{"role": "user", "content": "Say hello."}]) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    counted = client.messages.count_tokens(
        model="mimo-v2-flash", messages=[{"role": "user", "content": "Say hello."}]
    )
    cached = message.usage.cache_read_input_tokens or 0
    assert counted.input_tokens == message.usage.input_tokens + cached


def test_responses_api_create_and_stream(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)
    response = client.responses.create(model="mimo-v2-flash", input="Say hello.",
                                       max_output_tokens=8)  # fmt: skip
    assert response.status in ("completed", "incomplete") and response.output_text
    events = list(client.responses.create(model="mimo-v2-flash", input="Say hello.",
                                          max_output_tokens=8, stream=True))  # fmt: skip
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text
