"""The relay against canned engines on 127.0.0.1: mapping, usage, errors, failover."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.services import free_port
from tests.upstream.canned import Canned, serve_in_thread, word_logprobs
from tests.upstream.conftest import Gateway, registry_for, running_gateway

CHAT = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Hi"}]}


def sse(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    events, done = [], False
    for line in response.iter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


def wait_for_records(gw: Gateway, count: int) -> list[Any]:
    deadline = time.monotonic() + 5
    while len(records := gw.usage.records()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return records


def test_non_stream_maps_reasoning_and_keeps_usage(tmp_path: Path) -> None:
    engine = Canned(reasoning_field="reasoning")  # vLLM's newer name
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw:
        with gw.client() as client:
            response = client.post(
                "/v1/chat/completions", json={**CHAT, "thinking": {"type": "enabled"}}
            )
        assert response.status_code == 200, response.text
        body = response.json()
        message = body["choices"][0]["message"]
        assert message == {
            "role": "assistant",
            "content": "Hello from the engine.",
            "reasoning_content": "Thinking it over.",
        }
        assert body["model"] == "mimo-v2-flash" and body["id"].startswith("chatcmpl-")
        assert body["id"] != "chatcmpl-upstream"
        assert body["usage"]["prompt_tokens"] == 11 and body["usage"]["total_tokens"] == 18
        assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        sent = engine.requests[-1]
        assert sent["model"] == "XiaomiMiMo/MiMo-V2-Flash"
        assert sent["chat_template_kwargs"] == {"enable_thinking": True} and "thinking" not in sent
        assert engine.headers[-1].get("authorization") is None  # no key configured, none sent
        [record] = wait_for_records(gw, 1)
        assert (record.status, record.prompt_tokens, record.completion_tokens) == (200, 11, 7)
        assert record.request_id == body["id"]


def test_stream_relays_chunks_and_strips_usage_unless_asked(tmp_path: Path) -> None:
    engine = Canned(reasoning_field="reasoning")
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw:
        with gw.client() as client:
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                events, done = sse(r)
            assert engine.requests[-1]["stream_options"] == {"include_usage": True}
            assert done and all("usage" not in e for e in events)
            assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
            assert all(e["model"] == "mimo-v2-flash" for e in events)
            deltas = [e["choices"][0]["delta"] for e in events]
            assert deltas[0] == {"role": "assistant"}  # the engine's empty content is dropped
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            content = "".join(d.get("content", "") for d in deltas)
            assert (
                reasoning.strip() == "Thinking it over."
                and content.strip() == "Hello from the engine."
            )
            assert all("reasoning" not in d for d in deltas)
            assert events[-1]["choices"][0]["finish_reason"] == "stop"

            asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/chat/completions", json=asked) as r:
                events, done = sse(r)
            assert (
                done and events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 20
            )
        records = wait_for_records(gw, 2)
        assert [r.completion_tokens for r in records] == [9, 9]  # the engine's own usage


def test_engine_without_usage_is_estimated_and_client_still_gets_usage(tmp_path: Path) -> None:
    engine = Canned(send_usage=False)
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw:
        with gw.client() as client:
            body = client.post("/v1/chat/completions", json=CHAT).json()
            asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/chat/completions", json=asked) as r:
                events, _ = sse(r)
        assert body["usage"]["completion_tokens"] > 0 and body["usage"]["prompt_tokens"] > 0
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
        assert all(r.completion_tokens > 0 for r in wait_for_records(gw, 2))


def test_engine_errors_become_the_contract_error_body(tmp_path: Path) -> None:
    engine = Canned(mode="status", status=400, error_body={
        "object": "error", "message": "This model's maximum context length is 32768 tokens.",
        "type": "BadRequestError", "param": None, "code": 400})  # fmt: skip
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw, \
            gw.client() as client:  # fmt: skip
        bad = client.post("/v1/chat/completions", json=CHAT)
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "maximum context length" in error["message"]
        assert error["type"] == "invalid_request_error"
        assert len(engine.requests) == 1, "the client's own mistake is not retried"

        engine.status, engine.error_body = 401, {"error": "Unauthorized"}  # vLLM's bare 401
        denied = client.post("/v1/chat/completions", json=CHAT)
        assert denied.status_code == 503 and "retry-after" in denied.headers
        assert denied.json()["error"]["code"] == "upstream_auth_failed"
        assert "Unauthorized" not in denied.text or "credentials" in denied.text


def test_malformed_json_and_broken_streams_are_clean_errors(tmp_path: Path) -> None:
    engine = Canned(mode="garbage")
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw:
        with gw.client() as client:
            garbage = client.post("/v1/chat/completions", json=CHAT)
            assert garbage.status_code == 503
            assert garbage.json()["error"]["code"] == "upstream_malformed"

            engine.mode = "broken"  # a bad chunk after three good ones
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200
                events, done = sse(r)
            assert done and "error" in events[-1]
            assert events[-1]["error"]["code"] == "upstream_stream_broken"
            assert len(events) == 4  # three relayed chunks, then the error event

            engine.mode = "broken_first"  # dies before its first chunk: nothing was relayed
            broken = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert broken.status_code == 503 and broken.json()["error"]["type"] == "server_error"
        # One record each, the broken stream's with the error it ended with.
        assert [r.status for r in wait_for_records(gw, 3)] == [503, 503, 503]


def test_failover_to_another_replica_before_any_byte(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    engine = Canned()
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(dead, url),
                                                         health_interval_s=60) as gw:  # fmt: skip
        with gw.client() as client:
            for _ in range(6):
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
                with client.stream("POST", "/v1/chat/completions",
                                   json={**CHAT, "stream": True}) as r:  # fmt: skip
                    assert r.status_code == 200 and sse(r)[1]
        assert len(engine.requests) == 12


def test_all_replicas_down_is_503_with_retry_after(tmp_path: Path) -> None:
    dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    with running_gateway(tmp_path, registry_for(*dead)) as gw, gw.client() as client:
        for _ in range(5):  # enough to open both breakers
            response = client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "server_error"


def test_slow_upstream_times_out_cleanly(tmp_path: Path) -> None:
    engine = Canned(delay_s=10)
    toml = registry_for("URL").replace("upstream_timeout_s = 3", "upstream_timeout_s = 0.5")
    with serve_in_thread(engine) as url, running_gateway(tmp_path, toml.replace("URL", url)) as gw:
        started = time.monotonic()
        with gw.client() as client:
            response = client.post("/v1/chat/completions", json=CHAT)
        assert time.monotonic() - started < 5
        assert (
            response.status_code == 503 and response.json()["error"]["code"] == "upstream_timeout"
        )


def leave_mid_answer(gw: Gateway, body: dict[str, Any]) -> None:
    """Streams `body` and leaves at the first piece of content."""
    with gw.client() as client, \
            client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if '"content"' in line:
                return


def test_client_disconnect_closes_the_upstream_request(tmp_path: Path) -> None:
    engine = Canned(chunk_delay_s=0.2, content=" ".join(["word"] * 50))
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw:
        leave_mid_answer(gw, CHAT)
        deadline = time.monotonic() + 5
        while engine.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cancelled == 1, "the engine saw the stream closed"
        backend = gw.app_state.chat.catalogue.backend_for("mimo-v2-flash")  # type: ignore[attr-defined]
        assert backend.model.pool.replicas[0].failures == 0

        slow = Canned(delay_s=5)
        with serve_in_thread(slow) as slow_url:
            toml = registry_for(slow_url, model_id="mimo-v2-pro")
            # No health checks meanwhile: they would reset the count this test reads.
            with running_gateway(tmp_path / "two", toml, health_interval_s=60) as gw2:

                def leave_early() -> None:
                    with httpx.Client(base_url=gw2.url, headers={"api-key": gw2.key}) as c, \
                            contextlib.suppress(httpx.ReadTimeout):  # fmt: skip
                        c.post("/v1/chat/completions", json={**CHAT, "model": "mimo-v2-pro"},
                               timeout=0.5)  # fmt: skip

                thread = threading.Thread(target=leave_early)
                thread.start()
                thread.join()
                deadline = time.monotonic() + 3
                while slow.cancelled == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert slow.cancelled == 1, "a non-streaming request is closed upstream too"
                assert [r.status for r in wait_for_records(gw2, 1)] == [499]
                # A client that leaves is not the replica's fault: its breaker stays closed.
                backend = gw2.app_state.chat.catalogue.backend_for("mimo-v2-pro")  # type: ignore[attr-defined]
                assert backend.model.pool.replicas[0].failures == 0


def test_models_keys_limits_and_media_apply_to_relayed_models(tmp_path: Path) -> None:
    from mimoserve.limits.policy import Limits

    engine = Canned()
    omni = 'input_modalities = ["text", "image"]'
    with serve_in_thread(engine) as url:
        toml = registry_for(url) + "\n" + registry_for(url, model_id="mimo-v2-omni", extra=omni)
        with running_gateway(tmp_path, toml) as gw, gw.client() as client:
            listed = client.get("/v1/models").json()["data"]
            assert {m["id"]: m["root"] for m in listed} == {
                "mimo-v2-flash": "vllm:XiaomiMiMo/MiMo-V2-Flash",
                "mimo-v2-omni": "vllm:XiaomiMiMo/MiMo-V2-Flash",
            }
            image = {"role": "user", "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": "https://93.184.216.34/cat.png"}}]}  # fmt: skip
            ok = client.post(
                "/v1/chat/completions", json={"model": "mimo-v2-omni", "messages": [image]}
            )
            assert ok.status_code == 200
            forwarded = engine.requests[-1]["messages"][0]["content"][1]
            assert forwarded == {
                "type": "image_url",
                "image_url": {"url": "https://93.184.216.34/cat.png"},
            }
            refused = client.post(
                "/v1/chat/completions", json={"model": "mimo-v2-flash", "messages": [image]}
            )
            assert (
                refused.status_code == 400 and "mimo-v2-flash" in refused.json()["error"]["message"]
            )
            assert len(engine.requests) == 1, "refused before reaching the engine"

            team = gw.keys.create_account("team", Limits(rpm=2))
            narrow = gw.keys.create("narrow", account_id=team.id,
                                    allowed_models=frozenset({"mimo-v2-flash"})).secret  # fmt: skip
            headers = {"api-key": narrow}
            forbidden = client.post("/v1/chat/completions", headers=headers,
                                    json={"model": "mimo-v2-omni", "messages": CHAT["messages"]})  # fmt: skip
            assert forbidden.status_code == 403
            statuses = [client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code
                        for _ in range(3)]  # fmt: skip
            assert statuses == [200, 200, 429]


def test_a_relayed_stream_closed_before_its_first_read_gives_back_its_replica(
    tmp_path: Path,
) -> None:
    """The client left the moment the stream opened: the replica's outstanding count, the
    engine connection and the metering must all come back although nothing was read."""
    import asyncio

    from mimoserve.backends.upstream.client import UpstreamModel, new_session
    from mimoserve.registry import ModelRegistry

    engine = Canned()
    with serve_in_thread(engine) as url:
        entry = ModelRegistry.from_toml(registry_for(url)).get("mimo-v2-flash")
        assert entry is not None

        async def scenario() -> int:
            session = new_session()
            model = UpstreamModel(entry, session)
            try:
                body = {**CHAT, "model": "XiaomiMiMo/MiMo-V2-Flash", "stream": True}
                for _ in range(3):
                    stream = await model.open_stream(lambda replica: body)
                    assert model.pool.replicas[0].outstanding == 1
                    await stream.aclose()  # never read
                return model.pool.replicas[0].outstanding
            finally:
                await session.close()

        assert asyncio.run(scenario()) == 0


def test_the_other_doors_reach_upstream_models(tmp_path: Path) -> None:
    """An Anthropic Messages or Responses request for an upstream model goes to the engine
    as a chat completion (built from the canonical request) and comes back in its door's
    shape."""
    engine = Canned()
    with (
        serve_in_thread(engine) as url,
        running_gateway(tmp_path, registry_for(url)) as gw,
        gw.client() as client,
    ):
        message = client.post("/anthropic/v1/messages", json={
            "model": "mimo-v2-flash", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        response = client.post("/v1/responses", json={"model": "mimo-v2-flash", "input": "Hi"})
    assert message.status_code == 200, message.text
    blocks = message.json()["content"]
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert (
        blocks[1]["text"] == "Hello from the engine."
        and blocks[0]["thinking"] == "Thinking it over."
    )
    assert response.status_code == 200, response.text
    assert response.json()["output"][-1]["content"][0]["text"] == "Hello from the engine."
    sent = engine.requests[-1]
    assert sent["model"] == "XiaomiMiMo/MiMo-V2-Flash"
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]


def test_logprobs_are_relayed_from_upstream_models(tmp_path: Path) -> None:
    """vLLM, SGLang and llama-server report logprobs in OpenAI's shape: passed on, whole
    and streamed, as the same events the embedded engine yields."""
    engine = Canned()
    asked = {**CHAT, "logprobs": True, "top_logprobs": 2}
    words = [w + " " for w in engine.content.split(" ")]
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw, \
            gw.client() as client:  # fmt: skip
        whole = client.post("/v1/chat/completions", json=asked)
        assert whole.status_code == 200, whole.text
        assert engine.requests[-1]["logprobs"] is True and engine.requests[-1]["top_logprobs"] == 2
        content = whole.json()["choices"][0]["logprobs"]["content"]
        assert [t["token"] for t in content] == words
        assert content[0] == {**word_logprobs(words[0])}
        with client.stream("POST", "/v1/chat/completions", json={**asked, "stream": True}) as r:
            events, done = sse(r)
        streamed = [t for e in events if e["choices"]
                    for t in (e["choices"][0].get("logprobs") or {}).get("content") or []]  # fmt: skip
        assert done and [t["token"] for t in streamed] == words
        assert streamed[-1]["top_logprobs"][1] == {"token": "?", "logprob": -3.5, "bytes": [63]}
        plain = client.post("/v1/chat/completions", json=CHAT).json()
        assert "logprobs" not in engine.requests[-1] and plain["choices"][0].get("logprobs") is None


def test_n_choices_of_an_upstream_model_are_n_engine_requests(tmp_path: Path) -> None:
    """Not every engine serves n > 1 (llama-server does not): each choice is its own
    request of one choice, seed + index; usage sums the completions, the prompt once."""
    engine = Canned()
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw, \
            gw.client() as client:  # fmt: skip
        answer = client.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 40})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(c["message"]["content"] == engine.content for c in body["choices"])
        assert body["usage"]["prompt_tokens"] == 11 and body["usage"]["completion_tokens"] == 21
        assert sorted(r["seed"] for r in engine.requests) == [40, 41, 42]
        assert all("n" not in r for r in engine.requests)
        with client.stream("POST", "/v1/chat/completions",
                           json={**CHAT, "n": 2, "stream": True}) as r:  # fmt: skip
            events, done = sse(r)
        texts = {0: "", 1: ""}
        for event in events:
            for choice in event["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
        assert done and all(text.strip() == engine.content for text in texts.values())
        records = wait_for_records(gw, 2)
        assert [r.completion_tokens for r in records] == [21, 18]  # one record per request


def test_a_client_that_leaves_mid_stream_is_billed_the_estimated_prompt(tmp_path: Path) -> None:
    # The engine sends its usage only with its last chunk; a client that reads the
    # content and leaves before it used to leave a 499 with 0 prompt tokens.
    engine = Canned(chunk_delay_s=0.2, content=" ".join(["word"] * 50))
    long_prompt = {**CHAT, "messages": [{"role": "user", "content": "tell me " * 300}]}
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw:
        leave_mid_answer(gw, long_prompt)
        record = wait_for_records(gw, 1)[0]
    assert record.status == 499
    assert record.prompt_tokens >= 600  # ~2,400 characters of prompt, estimated
    assert record.usage_source == "estimate"


def test_speech_from_an_upstream_engine_is_relayed_as_it_came(tmp_path: Path) -> None:
    """A speech model served by an engine that speaks the platform's shape: its audio,
    whole or in pieces, and its seconds reach the client unchanged; recognition's
    audio tokens and seconds too."""
    extra = 'input_modalities = ["text", "audio"]'
    tts = {"model": "mimo-v2-flash", "audio": {"format": "wav", "voice": "mimo_default"},
           "messages": [{"role": "assistant", "content": "Hello from upstream."}]}  # fmt: skip
    wav = b"RIFF" + bytes(range(40)) + b"upstream speech"
    engine = Canned(mode="replay", replay="mimo_tts.json")
    with serve_in_thread(engine) as url, \
            running_gateway(tmp_path, registry_for(url, extra=extra)) as gw, \
            gw.client() as client:  # fmt: skip
        whole = client.post("/v1/chat/completions", json=tts)
        assert whole.status_code == 200, whole.text
        assert engine.requests[-1]["audio"] == tts["audio"]  # the request as sent
        message = whole.json()["choices"][0]["message"]
        assert base64.b64decode(message["audio"]["data"]) == wav and message["content"] is None
        assert message["audio"]["transcript"] == "Hello from upstream."
        assert whole.json()["usage"]["seconds"] == 2
        engine.replay = "mimo_tts_stream.sse"
        with client.stream("POST", "/v1/chat/completions", json={**tts, "stream": True}) as r:
            events, done = sse(r)
        pieces = [e["choices"][0]["delta"]["audio"] for e in events
                  if e["choices"] and "audio" in e["choices"][0]["delta"]]  # fmt: skip
        assert done and len(pieces) == 2
        assert b"".join(base64.b64decode(p["data"]) for p in pieces) == wav
        engine.replay = "mimo_asr.json"
        part = {"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64,UklGRg=="}}
        heard = client.post("/v1/chat/completions", json={
            "model": "mimo-v2-flash", "messages": [{"role": "user", "content": [part]}],
            "asr_options": {"language": "auto"}}).json()  # fmt: skip
        assert engine.requests[-1]["asr_options"] == {"language": "auto"}
        assert heard["choices"][0]["message"]["content"] == "Good morning."
        assert heard["usage"]["prompt_tokens_details"]["audio_tokens"] == 25
        assert heard["usage"]["seconds"] == 4
        records = wait_for_records(gw, 3)
        assert [r.audio_seconds for r in records] == [2.0, 2.0, 4.0]
