"""Speech through the doors, on scripted speech engines: synthesis (chat completions and
/v1/audio/speech), recognition (chat completions and /v1/audio/transcriptions), the omni
cascade, usage and records, limits and refusals. The real engines: tests/e2e/test_speech.py."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from mimoserve.app import create_app
from mimoserve.audio.codec import HEARING_RATE, SPEAKING_RATE, decode_speech, encode_whole
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.base import Backend
from mimoserve.backends.speech.asr import AsrBackend, Listener
from mimoserve.backends.speech.cascade import TranscribingBackend
from mimoserve.backends.speech.engines import EngineGate
from mimoserve.backends.speech.tts import TtsBackend
from mimoserve.backends.upstream.media import MediaLimits
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.registry import ModelRegistry
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore
from tests.api.sse_client import parse_sse
from tests.fake_backend import ScriptedBackend
from tests.fake_speech import WORD_S, LengthEar, ToneVoice, speech_backends

URL = "/v1/chat/completions"

REGISTRY = """
[models.text]
weights = "fake-weights"
[models.omni]
weights = "fake-weights"
input_modalities = ["text", "audio"]
speech_recognizer = "fake-asr"
[models.tts]
backend = "tts"
weights = "fake-voice"
voices = { mimo_default = "joe", default_en = "joe" }
price = { input = 0, output = 0, million_characters = 1000000 }
[models.tts-voicedesign]
backend = "tts"
weights = "fake-voice"
voice_source = "design"
[models.asr]
backend = "asr"
weights = "fake-asr"
price = { input = 0, output = 0, audio_second = 0.5 }
"""


class MemoryStore:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        self.records.extend(records)


def tone(seconds: float, fmt: str = "wav") -> bytes:
    t = np.arange(int(seconds * 22050)) / 22050
    return encode_whole(fmt, 22050, (np.sin(2 * np.pi * 300 * t) * 9000).astype(np.int16))  # type: ignore[arg-type]


def data_url(data: bytes, mime: str = "audio/wav") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def asr_body(source: str, **extra: Any) -> dict[str, Any]:
    part = {"type": "input_audio", "input_audio": {"data": source}}
    return {"model": "asr", "messages": [{"role": "user", "content": [part]}], **extra}


def tts_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tts", "messages": [{"role": "assistant", "content": text}], **extra}


@pytest.fixture
def ear() -> LengthEar:
    return LengthEar()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def speech(
    settings: Settings, keys: KeyStore, api_key: str, backend: ScriptedBackend, ear: LengthEar,
    store: MemoryStore,
) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    registry = ModelRegistry.from_toml(REGISTRY)
    listener = Listener(ear, "fake-asr", EngineGate("fake-asr", 4), MediaLimits(), 30.0)
    tts = TtsBackend(ToneVoice(), "fake-voice", EngineGate("fake-voice", 4))
    backends: dict[str, Backend[Any]] = {
        "text": backend, "omni": TranscribingBackend(backend, listener), "tts": tts,
        "tts-voicedesign": tts, "asr": AsrBackend(listener),
    }  # fmt: skip
    ledger = UsageLedger(store, flush_interval_s=0.01)
    app = create_app(settings, registry=registry, backends=backends, keys=keys, ledger=ledger)
    ledger.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"api-key": api_key}) as client:  # fmt: skip
        yield client
    await ledger.close()


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- synthesis ---------------------------------------------------------------------------


async def test_chat_speaks_the_assistant_message_as_a_whole_wav(speech: httpx.AsyncClient) -> None:
    text = "<style>Happy</style>Hello there my friend. [laughs] How are you."
    response = await speech.post(URL, json=tts_body(text, audio={"format": "wav"}))
    assert response.status_code == 200, response.text
    answer = response.json()
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    audio = message["audio"]
    assert audio["id"].startswith("audio_") and audio["expires_at"] > answer["created"]
    assert audio["transcript"] == "Hello there my friend. How are you."  # style and tags unsaid
    wav = base64.b64decode(audio["data"])
    assert wav[:4] == b"RIFF" and int.from_bytes(wav[40:44], "little") == len(wav) - 44
    seconds = decode_speech(wav, 60).size / HEARING_RATE
    assert seconds == pytest.approx(7 * WORD_S, abs=0.02)  # seven words
    usage = answer["usage"]
    assert usage["completion_tokens"] == math.ceil(7 * WORD_S * 6.25)
    assert usage["seconds"] == math.ceil(7 * WORD_S)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "pcm16"])
async def test_every_format_holds_the_speech(speech: httpx.AsyncClient, fmt: str) -> None:
    response = await speech.post(URL, json=tts_body("One two three four.", audio={"format": fmt}))
    data = base64.b64decode(response.json()["choices"][0]["message"]["audio"]["data"])
    if fmt == "pcm16":  # raw 16-bit mono at 24 kHz
        assert len(data) == pytest.approx(4 * WORD_S * SPEAKING_RATE * 2, rel=0.01)
    else:
        assert decode_speech(data, 60).size / HEARING_RATE == pytest.approx(1.0, abs=0.06)


async def test_a_streamed_answer_sends_each_sentence_as_it_is_made(
    speech: httpx.AsyncClient,
) -> None:
    body = tts_body("One two. Three four five. Six.", stream=True, audio={"format": "wav"},
                    stream_options={"include_usage": True})  # fmt: skip
    response = await speech.post(URL, json=body)
    chunks, done = parse_sse(response.text)
    assert done
    audio = [c["choices"][0]["delta"]["audio"] for c in chunks
             if c["choices"] and "audio" in c["choices"][0]["delta"]]  # fmt: skip
    assert len(audio) in (3, 4)  # one piece per sentence (and the resampler's tail)
    assert audio[0]["id"].startswith("audio_") and "expires_at" in audio[0]
    assert audio[0]["transcript"] == "One two. Three four five. Six."
    assert all("id" not in piece and "transcript" not in piece for piece in audio[1:])
    wav = b"".join(base64.b64decode(piece["data"]) for piece in audio)
    assert decode_speech(wav, 60).size / HEARING_RATE == pytest.approx(6 * WORD_S, abs=0.02)
    assert chunks[-1]["usage"]["seconds"] == math.ceil(6 * WORD_S)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (tts_body("hi", audio={"voice": "Mia"}), 400, "audio.voice"),
        (tts_body("hi", audio={"format": "flac"}), 400, "audio.format"),
        (tts_body("<style>only a style</style>"), 400, "messages"),
        (tts_body("x" * 4097), 400, "messages"),
        ({"model": "tts", "messages": [{"role": "user", "content": "say hi"}]}, 400, "messages"),
        ({**tts_body("hi"), "model": "tts-voicedesign"}, 400, "model"),
        (tts_body("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
        (tts_body("hi", n=2), 400, "n"),
    ],
)
async def test_synthesis_refusals_name_what_is_wrong(
    speech: httpx.AsyncClient, body: dict[str, Any], status: int, param: str
) -> None:
    assert_error(await speech.post(URL, json=body), status, param)


async def test_unknown_voice_error_names_the_voice_and_the_known_ones(
    speech: httpx.AsyncClient,
) -> None:
    error = assert_error(await speech.post(URL, json=tts_body("hi", audio={"voice": "Mia"})), 400)
    assert "'Mia'" in error["message"] and "mimo_default" in error["message"]


async def test_openai_speech_endpoint_answers_the_audio_bytes(speech: httpx.AsyncClient) -> None:
    body = {"model": "tts", "input": "One two three four.", "voice": "mimo_default",
            "response_format": "mp3", "instructions": "cheerful"}  # fmt: skip
    response = await speech.post("/v1/audio/speech", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/mpeg"
    assert decode_speech(response.content, 60).size / HEARING_RATE == pytest.approx(1.0, abs=0.06)
    wav = await speech.post("/v1/audio/speech", json={**body, "response_format": "wav"})
    assert wav.headers["content-type"] == "audio/wav" and wav.content[:4] == b"RIFF"
    fast = await speech.post("/v1/audio/speech", json={**body, "speed": 2.0})
    assert decode_speech(fast.content, 60).size / HEARING_RATE == pytest.approx(0.5, abs=0.06)


async def test_openai_speech_events_carry_the_audio_and_the_usage(
    speech: httpx.AsyncClient,
) -> None:
    body = {"model": "tts", "input": "One two. Three four.", "voice": "mimo_default",
            "response_format": "pcm", "stream_format": "sse"}  # fmt: skip
    response = await speech.post("/v1/audio/speech", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ")]  # fmt: skip
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) == pytest.approx(4 * WORD_S * SPEAKING_RATE * 2, rel=0.01)
    usage = events[-1]["usage"]
    assert usage["output_tokens"] == math.ceil(4 * WORD_S * 6.25)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize(
    ("change", "param"),
    [({"response_format": "opus"}, "response_format"), ({"speed": 5.0}, "speed"),
     ({"voice": "nobody"}, "audio.voice"), ({"input": ""}, "input"),
     ({"stream_format": "json"}, "stream_format")],
)  # fmt: skip
async def test_openai_speech_endpoint_refusals(
    speech: httpx.AsyncClient, change: dict[str, Any], param: str
) -> None:
    body = {"model": "tts", "input": "hi", "voice": "mimo_default", **change}
    assert_error(await speech.post("/v1/audio/speech", json=body), 400, param)


# ---- recognition -------------------------------------------------------------------------


async def test_chat_transcribes_input_audio_with_audio_usage(speech: httpx.AsyncClient) -> None:
    body = asr_body(data_url(tone(3.0)), asr_options={"language": "auto"})
    answer = (await speech.post(URL, json=body)).json()
    assert answer["choices"][0]["message"]["content"] == "tick0 tick1 tick2"
    usage = answer["usage"]
    assert usage["prompt_tokens_details"]["audio_tokens"] == math.ceil(3.0 * 6.25)
    assert usage["seconds"] == 3 and usage["completion_tokens"] == 6


@pytest.mark.parametrize("fmt", ["mp3", "ogg", "webm", "m4a", "bare"])
async def test_what_people_record_is_heard(speech: httpx.AsyncClient, fmt: str) -> None:
    import av

    data = tone(2.0, "mp3") if fmt in ("mp3", "bare") else _recorded(fmt, av)
    source = base64.b64encode(data).decode() if fmt == "bare" else data_url(data, "audio/x")
    answer = (await speech.post(URL, json=asr_body(source))).json()
    assert answer["choices"][0]["message"]["content"] == "tick0 tick1", answer


def _recorded(fmt: str, av: Any) -> bytes:
    """Two seconds of tone as a browser or phone records it (opus in ogg/webm, aac in m4a)."""
    import io

    container_format, codec = {"ogg": ("ogg", "libopus"), "webm": ("webm", "libopus"),
                               "m4a": ("ipod", "aac")}[fmt]  # fmt: skip
    out = io.BytesIO()
    with av.open(out, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=48000, layout="mono")
        t = np.arange(96000) / 48000
        samples = (np.sin(2 * np.pi * 300 * t) * 9000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 48000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (data_url(b"not audio at all" * 10), "invalid_audio"),
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "invalid_audio"),
        (data_url(tone(1.0)[:60]), "invalid_audio"),  # a header and hardly any data
        ("data:image/png;base64,AAAA", "invalid_media"),
        ("data:audio/wav;base64,@@@", "invalid_media"),
        ("ftp://example.com/a.wav", "invalid_media"),
        ("https://127.0.0.1/a.wav", "invalid_media"),  # would fetch from inside the network
    ],
)
async def test_malformed_or_unreachable_audio_is_a_400(
    speech: httpx.AsyncClient, source: str, code: str
) -> None:
    error = assert_error(await speech.post(URL, json=asr_body(source)), 400,
                         "messages.0.content.0")  # fmt: skip
    assert error["code"] == code


async def test_audio_in_a_container_not_accepted_is_named(speech: httpx.AsyncClient) -> None:
    import io

    import av

    out = io.BytesIO()  # Sun's .au: real audio, but not what clients are told to send
    with av.open(out, "w", format="au") as container:
        stream = container.add_stream("pcm_s16be", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.int16), format="s16",
                                           layout="mono")  # fmt: skip
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    error = assert_error(await speech.post(URL, json=asr_body(data_url(out.getvalue()))), 400)
    assert "'au' format is not accepted" in error["message"] and "ogg/opus" in error["message"]


async def test_audio_longer_than_the_cap_is_refused(speech: httpx.AsyncClient) -> None:
    error = assert_error(await speech.post(URL, json=asr_body(data_url(tone(31.0)))), 400)
    assert "longer than 30 seconds" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (asr_body(data_url(tone(1.0)), asr_options={"language": "zh"}), "asr_options.language"),
        (asr_body(data_url(tone(1.0)), asr_options={"language": "fr"}), "asr_options.language"),
        ({"model": "asr", "messages": [{"role": "user", "content": "hello"}]}, "messages"),
        ({"model": "text", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data_url(tone(1.0))}}]}]},
         "messages.0.content.0"),
    ],
)  # fmt: skip
async def test_recognition_refusals(
    speech: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    assert_error(await speech.post(URL, json=body), 400, param)


async def test_inline_audio_may_exceed_the_text_body_limit_and_text_may_not(
    speech: httpx.AsyncClient, settings: Settings
) -> None:
    audio = tone(20.0)  # ~880 KB of wav: over the fixture's 64 KiB text limit
    assert len(audio) > settings.max_body_bytes
    response = await speech.post(URL, json=asr_body(data_url(audio)))
    assert response.status_code == 200, response.text
    padded = asr_body(data_url(tone(1.0)))
    padded["messages"].append({"role": "user", "content": "x" * settings.max_body_bytes})
    assert_error(await speech.post(URL, json=padded), 413)
    text_only = {"model": "text", "messages": [{"role": "user", "content": "y" * 200_000}]}
    assert_error(await speech.post(URL, json=text_only), 413)


async def test_streamed_transcript_arrives_a_segment_at_a_time(speech: httpx.AsyncClient) -> None:
    response = await speech.post(URL, json=asr_body(data_url(tone(3.0)), stream=True))
    chunks, done = parse_sse(response.text)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert done and [p for p in pieces if p] == ["tick0", " tick1", " tick2"]


def _form(data: bytes, **fields: str) -> dict[str, Any]:
    return {"files": {"file": ("speech.wav", data, "audio/wav")},
            "data": {"model": "asr", **fields}}  # fmt: skip


async def test_transcriptions_endpoint_answers_every_response_format(
    speech: httpx.AsyncClient, ear: LengthEar
) -> None:
    audio = tone(2.0)
    plain = await speech.post("/v1/audio/transcriptions", **_form(audio, prompt="Ticks"))
    assert plain.json() == {"text": "tick0 tick1", "usage": {"type": "duration", "seconds": 2}}
    assert ear.prompts[-1] == "Ticks"
    text = await speech.post("/v1/audio/transcriptions", **_form(audio, response_format="text"))
    assert text.text == "tick0 tick1\n"
    srt = await speech.post("/v1/audio/transcriptions", **_form(audio, response_format="srt"))
    assert srt.text.startswith("1\n00:00:00,000 --> 00:00:01,000\ntick0\n\n2\n00:00:01,000")
    vtt = await speech.post("/v1/audio/transcriptions", **_form(audio, response_format="vtt"))
    assert vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\ntick0\n")
    verbose = await speech.post("/v1/audio/transcriptions",
                                **_form(audio, response_format="verbose_json"))  # fmt: skip
    body = verbose.json()
    assert body["duration"] == pytest.approx(2.0, abs=0.01) and body["language"] == "english"
    assert [s["text"] for s in body["segments"]] == ["tick0", "tick1"]


async def test_transcriptions_endpoint_refusals(speech: httpx.AsyncClient) -> None:
    url = "/v1/audio/transcriptions"
    audio = tone(1.0)
    assert_error(await speech.post(url, data={"model": "asr"}, files={"x": ("a", b"1")}), 400,
                 "file")  # fmt: skip
    assert_error(await speech.post(url, **_form(audio, response_format="docx")), 400,
                 "response_format")  # fmt: skip
    assert_error(await speech.post(url, **_form(audio, language="xx")), 400, "language")
    assert_error(await speech.post(url, **_form(b"garbage" * 100)), 400)
    assert_error(await speech.post(url, json={"model": "asr"}), 400)
    missing = await speech.post(url, **_form(audio, model="nope"))
    assert_error(missing, 404, "model")


# ---- the omni cascade, usage and records ---------------------------------------------------


async def test_omni_reads_the_transcript_of_its_audio(
    speech: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["It", " ticks."])
    parts = [{"type": "text", "text": "What do you hear?"},
             {"type": "input_audio", "input_audio": {"data": data_url(tone(2.0))}}]  # fmt: skip
    body = {"model": "omni", "messages": [{"role": "user", "content": parts}]}
    answer = (await speech.post(URL, json=body)).json()
    assert answer["choices"][0]["message"]["content"] == "It ticks."
    assert answer["usage"]["prompt_tokens_details"]["audio_tokens"] == math.ceil(2 * 6.25)
    prompt = backend.requests[-1].messages[-1].content or ""
    assert "What do you hear?" in prompt and "tick0 tick1" in prompt


async def test_omni_without_audio_is_the_text_model(
    speech: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["plain"])
    body = {"model": "omni", "messages": [{"role": "user", "content": "hi"}]}
    answer = (await speech.post(URL, json=body)).json()
    assert answer["choices"][0]["message"]["content"] == "plain"
    assert "audio_tokens" not in answer["usage"]["prompt_tokens_details"]


async def test_records_carry_seconds_and_characters_and_their_prices(
    speech: httpx.AsyncClient, store: MemoryStore
) -> None:
    await speech.post(URL, json=tts_body("One two three."))
    await speech.post(URL, json=asr_body(data_url(tone(4.0))))
    await speech.post("/v1/audio/speech", json={"model": "tts", "input": "Four five.",
                                                "voice": "default_en"})  # fmt: skip
    assert await _records(store, 3)
    spoken, heard, endpoint = store.records
    assert (spoken.model, spoken.characters, spoken.status) == ("tts", len("One two three."), 200)
    assert spoken.audio_seconds == pytest.approx(3 * WORD_S, abs=0.01)
    assert spoken.cost_micros == len("One two three.") * 1_000_000  # 1 per character
    assert heard.audio_seconds == pytest.approx(4.0, abs=0.01)
    assert heard.cost_micros == pytest.approx(0.5 * 4.0 * 1_000_000, abs=1_000)
    assert (endpoint.api, endpoint.characters) == ("audio.speech", len("Four five."))


async def _records(store: MemoryStore, count: int) -> bool:
    import asyncio

    for _ in range(500):  # the ledger flushes every 10 ms; wait for the condition
        if len(store.records) >= count:
            return True
        await asyncio.sleep(0.01)
    return False


def test_inline_audio_is_estimated_by_its_length_not_as_text() -> None:
    from mimoserve.protocol.chat import ChatCompletionRequest
    from mimoserve.protocol.estimate import estimate_prompt_tokens

    body = asr_body(data_url(tone(10.0)))
    raw = json.dumps(body).encode()
    estimate = estimate_prompt_tokens(ChatCompletionRequest.model_validate(body), raw)
    assert estimate < 1_000 < len(raw) / 3  # ~600 KB of base64 is not 200k tokens


async def test_a_money_budget_reserves_speech_at_its_price(
    settings: Settings, database: Database, keys: KeyStore, api_key: str, admin_token: str,
) -> None:  # fmt: skip
    registry = ModelRegistry.from_toml(REGISTRY)
    speech = speech_backends()
    backends = {e.id: speech["asr" if e.id == "asr" else "tts"] for e in registry.entries()}
    usage = SqlUsageStore(database)
    ledger = UsageLedger(usage, flush_interval_s=0.01)
    app = create_app(settings, registry=registry, backends=backends, keys=keys, ledger=ledger,
                     usage=usage, admin=AdminCredential(database))  # fmt: skip
    ledger.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"api-key": api_key}) as client:  # fmt: skip
        # One unit of money per character spoken, half a unit per second heard: 20 units.
        owner = api_key.split("_")[0].removeprefix("mimo-")
        put = await client.put(f"/admin/budgets/key/{owner}", headers={
            "authorization": f"Bearer {admin_token}", "api-key": ""},
            json={"unit": "money", "amount": 20, "period": "month"})  # fmt: skip
        assert put.status_code == 200, put.text
        too_long = await client.post(URL, json=tts_body("x" * 21))  # 21 characters: 21 units
        assert_error(too_long, 402)
        assert (await client.post(URL, json=tts_body("Twelve chars"))).status_code == 200
        # 12 spent, 8 left: 20 s of wav (~880 KB, estimated 220 s) is more than 16 s allow.
        assert_error(await client.post(URL, json=asr_body(data_url(tone(20.0)))), 402)
        short = await client.post(URL, json=asr_body(data_url(tone(2.0, "mp3"))))
        assert short.status_code == 200, short.text
    await ledger.close()
    costs = [r.cost_micros for r in usage.records() if r.status == 200]
    assert costs == [12 * 1_000_000, pytest.approx(0.5 * 2.0 * 1_000_000, abs=60_000)]


def test_audio_urls_are_fetched_within_the_rules(
    settings: Settings, keys: KeyStore, api_key: str, tmp_path: Any
) -> None:
    """An allowed host's audio is fetched and heard; a redirect, an error status and a
    file over the size cap are 400s naming the part (nothing followed, nothing kept)."""
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Route

    from mimoserve.backends.upstream.url_guard import UrlAllowList
    from tests.services import uvicorn_in_thread

    wav = tone(2.0)
    files = Starlette(routes=[
        Route("/speech.wav", lambda _: Response(wav, media_type="audio/wav")),
        Route("/elsewhere", lambda _: RedirectResponse("http://169.254.169.254/latest")),
        Route("/missing", lambda _: Response(b"", status_code=404)),
        Route("/huge", lambda _: Response(b"\0" * 300_000, media_type="audio/wav")),
    ])  # fmt: skip
    limits = MediaLimits(audio_bytes=200_000, url_schemes=frozenset({"http", "https"}),
                         url_allow=UrlAllowList.parse(["127.0.0.1"]))  # fmt: skip
    listener = Listener(LengthEar(), "fake-asr", EngineGate("fake-asr", 4), limits, 30.0)
    registry = ModelRegistry.from_toml(REGISTRY)
    backends: dict[str, Backend[Any]] = {e.id: AsrBackend(listener) for e in registry.entries()}
    app = create_app(settings, registry=registry, backends=backends, keys=keys)
    with uvicorn_in_thread(files) as files_url, uvicorn_in_thread(app) as url, \
            httpx.Client(base_url=url, headers={"api-key": api_key}) as client:  # fmt: skip
        heard = client.post(URL, json=asr_body(f"{files_url}/speech.wav"))
        assert heard.status_code == 200, heard.text
        assert heard.json()["choices"][0]["message"]["content"] == "tick0 tick1"
        for path, why in [("/elsewhere", "HTTP 307"), ("/missing", "HTTP 404"),
                          ("/huge", "over the limit of 200000 bytes")]:  # fmt: skip
            refused = client.post(URL, json=asr_body(f"{files_url}{path}"))
            error = assert_error(refused, 400, "messages.0.content.0")
            assert why in error["message"], error


@pytest.mark.parametrize(
    ("url", "body"),
    [("/v1/messages", {"model": "tts", "max_tokens": 50, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Say this."}]}),
     ("/v1/responses", {"model": "tts", "input": "Say this."})],
)  # fmt: skip
async def test_doors_without_audio_refuse_speech_models(
    speech: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> None:
    response = await speech.post(url, json=body)
    assert response.status_code == 400, response.text
    assert "answers with speech" in response.text


async def test_a_capped_synthesis_stops_at_its_audio_tokens() -> None:
    """A budget caps a request's output: speech stops after the sentence that reaches the
    cap, with finish_reason length and the audio made so far."""
    from mimoserve.backends.speech.tts import Speech
    from mimoserve.events import AudioDelta, Finished

    tts = speech_backends()["tts"]
    speech = Speech("One two three four. Five six seven eight. Nine ten.", "joe", "pcm16", True)
    events = [e async for e in tts.generate(speech.capped(math.ceil(4 * WORD_S * 6.25)))]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "length"
    assert finished.usage.audio_seconds == pytest.approx(4 * WORD_S, abs=0.01)  # one sentence
    audio = b"".join(e.data for e in events if isinstance(e, AudioDelta))
    assert len(audio) == pytest.approx(4 * WORD_S * SPEAKING_RATE * 2, rel=0.02)
    whole = [e async for e in tts.generate(speech)]
    assert whole[-1].reason == "stop" and whole[-1].usage.audio_seconds == pytest.approx(2.5)  # type: ignore[union-attr]


async def test_the_duration_cap_counts_every_part_together(speech: httpx.AsyncClient) -> None:
    part = {"type": "input_audio", "input_audio": {"data": data_url(tone(20.0))}}
    body = {"model": "asr", "messages": [{"role": "user", "content": [part, part]}]}
    error = assert_error(await speech.post(URL, json=body), 400, "messages.0.content.1")
    assert "longer than 10 seconds" in error["message"]  # the 10 s left of 30 after the first
    three = {"model": "asr", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data_url(tone(15.0))}}] * 3}]}
    error = assert_error(await speech.post(URL, json=three), 400, "messages.0.content.2")
    assert "together are longer than 30 seconds" in error["message"]


async def test_omni_hears_each_part_within_one_duration_cap(
    speech: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["Two clips."])
    clip = {"type": "input_audio", "input_audio": {"data": data_url(tone(2.0))}}
    body = {"model": "omni", "asr_options": {"language": "en"},
            "messages": [{"role": "user", "content": [clip, {"type": "text", "text": "and"},
                                                      clip]}]}  # fmt: skip
    answer = (await speech.post(URL, json=body)).json()
    assert answer["usage"]["prompt_tokens_details"]["audio_tokens"] == math.ceil(4 * 6.25)
    prompt = backend.requests[-1].messages[-1].content or ""
    assert prompt.count("tick0 tick1") == 2 and "and" in prompt
    long = {**clip, "input_audio": {"data": data_url(tone(20.0))}}
    over = {"model": "omni", "messages": [{"role": "user", "content": [long, long]}]}
    assert_error(await speech.post(URL, json=over), 400, "messages.0.content.1")
    backend.enqueue(["text only"])
    plain = {"model": "omni", "asr_options": {"language": "zh"},
             "messages": [{"role": "user", "content": "hi"}]}  # nothing to hear: no 400
    assert (await speech.post(URL, json=plain)).status_code == 200


async def test_a_transcription_body_over_the_limit_is_413(
    speech: httpx.AsyncClient, settings: Settings
) -> None:
    huge = b"\0" * (settings.max_audio_body_bytes + 1)
    assert_error(await speech.post("/v1/audio/transcriptions", **_form(huge)), 413)
