"""Speech: real-time factors of synthesis and recognition, and time to the first audio,
through the server against the same engines run alone in this process.

    .venv/bin/python bench/speech.py [--runs 3]

Per run: a ~60-word paragraph is synthesised (Piper, joe voice) and the audio is
transcribed twice, the second (warm) timed (Whisper tiny.en), first by the engines alone (the same classes the server
loads, same thread count), then through `mimoserve serve` (chat completions: the whole
wav, a streamed pcm16 answer, and recognition of the same wav as an `input_audio` part).
Real-time factor = compute seconds / audio seconds (lower is faster); overhead = server
time / engine time. The server runs with only the speech models (no language model), so
the two never share the cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from run import MODELS_DIR, free_port, started

from mimoserve.audio.codec import HEARING_RATE, decode_speech, encode_whole
from mimoserve.backends.speech.engines import PiperSynthesizer, WhisperRecognizer
from mimoserve.weights.store import WeightsStore

PARAGRAPH = (
    "The committee met on Tuesday to review the plans for the new library. "
    "Several members asked how long the building work would take, and the architect "
    "explained that the first phase should be finished before the winter. "
    "Everyone agreed that the reading rooms must stay open while the work goes on."
)
THREADS = 2
REGISTRY = """
[models."mimo-v2.5-tts"]
backend = "tts"
weights = "piper-en-us-joe-medium"
voices = { mimo_default = "joe" }
[models."mimo-v2.5-asr"]
backend = "asr"
weights = "whisper-tiny-en"
"""


def engines_alone() -> dict[str, float]:
    store = WeightsStore(MODELS_DIR, show_progress=False)
    voice = PiperSynthesizer(store.resolve("piper-en-us-joe-medium"), THREADS)
    ear = WhisperRecognizer(store.resolve("whisper-tiny-en").parent, THREADS)
    start = time.perf_counter()
    pieces = voice.synthesize(PARAGRAPH, "joe")
    first = next(pieces)
    first_s = time.perf_counter() - start
    pcm = np.concatenate([first, *pieces])
    synth_s = time.perf_counter() - start
    seconds = pcm.size / voice.sample_rate
    wav = encode_whole("wav", voice.sample_rate, pcm)
    for _ in range(2):  # the second, warm: what a running server does
        start = time.perf_counter()
        samples = decode_speech(wav, 600)
        text = "".join(s.text for s in ear.transcribe(samples, "en", None))
        heard_s = time.perf_counter() - start
    assert text.strip()
    return {"audio_s": seconds, "tts_s": synth_s, "first_s": first_s, "asr_s": heard_s,
            "wav_b64": len(wav), "_wav": wav}  # type: ignore[dict-item]  # fmt: skip


def through_server(base: str, headers: dict[str, str], wav: bytes) -> dict[str, float]:
    client = httpx.Client(base_url=base, headers=headers, timeout=600)
    speak = {"model": "mimo-v2.5-tts", "messages": [{"role": "assistant", "content": PARAGRAPH}]}
    start = time.perf_counter()
    whole = client.post("/v1/chat/completions", json={**speak, "audio": {"format": "wav"}})
    tts_s = time.perf_counter() - start
    whole.raise_for_status()
    start = time.perf_counter()
    first_s = float("nan")
    with client.stream("POST", "/v1/chat/completions", json={
        **speak, "stream": True, "audio": {"format": "pcm16"}}) as stream:  # fmt: skip
        for line in stream.iter_lines():
            if first_s != first_s and line.startswith("data: {") and '"audio"' in line:
                first_s = time.perf_counter() - start
    listen = {"model": "mimo-v2.5-asr", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {
            "data": "data:audio/wav;base64," + base64.b64encode(wav).decode()}}]}]}  # fmt: skip
    for _ in range(2):  # the second, warm, as for the engine alone
        start = time.perf_counter()
        heard = client.post("/v1/chat/completions", json=listen)
        asr_s = time.perf_counter() - start
        heard.raise_for_status()
    return {"tts_s": tts_s, "first_s": first_s, "asr_s": asr_s}


def one_run(workdir: Path) -> dict[str, float]:
    alone = engines_alone()
    wav: bytes = alone.pop("_wav")  # type: ignore[assignment]
    registry = workdir / "speech.toml"
    registry.write_text(REGISTRY)
    port = free_port()
    command = [sys.executable, "-m", "mimoserve.cli", "--home", str(workdir / "home"),
               "--models-dir", str(MODELS_DIR), "serve", "--registry-file", str(registry),
               "--port", str(port), "--n-threads", str(THREADS)]  # fmt: skip
    with started("mimoserve", command, port, workdir / "server.log", key_from_log=True) as server:
        served = through_server(server.base_url, server.headers, wav)
    audio = alone["audio_s"]
    heard_audio = decode_speech(wav, 600).size / HEARING_RATE
    return {
        "audio_s": audio,
        "tts_rtf_alone": alone["tts_s"] / audio, "tts_rtf_server": served["tts_s"] / audio,
        "asr_rtf_alone": alone["asr_s"] / heard_audio,
        "asr_rtf_server": served["asr_s"] / heard_audio,
        "first_audio_alone_s": alone["first_s"], "first_audio_server_s": served["first_s"],
        "tts_overhead": served["tts_s"] / alone["tts_s"],
        "asr_overhead": served["asr_s"] / alone["asr_s"],
        "first_audio_overhead": served["first_s"] / alone["first_s"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            result = one_run(Path(work))
        runs.append(result)
        print(json.dumps({"run": index + 1, **{k: round(v, 4) for k, v in result.items()}}),
              flush=True)  # fmt: skip
    print(f"\nmedian [min-max] of {len(runs)} runs")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"{key:24} {statistics.median(values):8.3f} [{min(values):.3f}-{max(values):.3f}]")


if __name__ == "__main__":
    main()
