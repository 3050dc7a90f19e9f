"""mimoserve in front of real engines on 127.0.0.1: another mimoserve and llama-cpp-python's
own OpenAI server, both on the SmolLM2 GGUF; and a fleet whose replica is killed and
restarted under load.

The two engines run one thread each with passive OpenMP waits, so they share this
machine's two cores instead of spinning against each other; the gateway loads no model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.e2e.server import running_process, running_server
from tests.services import free_port
from tests.upstream.conftest import running_gateway
from tests.waiting import until_sync

ONE_CORE = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
HI: Any = [{"role": "user", "content": "Say hello."}]


def test_gateway_in_front_of_mimoserve_and_llama_cpp_server(
    weights_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    llama_server = [sys.executable, "-m", "llama_cpp.server", "--model", str(weights_path),
                    "--n_threads", "1", "--n_ctx", "2048", "--host", "127.0.0.1",
                    "--port", str(port), "--model_alias", "smollm2"]  # fmt: skip
    with running_server(tmp_path / "engine", "--n-threads", "1", "--n-ctx", "2048",
                        env=ONE_CORE) as engine, \
            running_process(llama_server, f"http://127.0.0.1:{port}/v1/models",
                            tmp_path / "llama.log", ONE_CORE):  # fmt: skip
        registry = tmp_path / "fleet.toml"
        registry.write_text(f"""
[models.mimo-v2-flash]
backend = "upstream"
[[models.mimo-v2-flash.upstreams]]
url = "{engine.base_url}/v1"
kind = "mimoserve"
model = "mimo-v2-flash"
api_key_env = "ENGINE_KEY"

[models.mimo-v2-pro]
backend = "upstream"
[[models.mimo-v2-pro.upstreams]]
url = "http://127.0.0.1:{port}/v1"
kind = "llama.cpp"
model = "smollm2"
""")
        env = {"ENGINE_KEY": engine.api_key, **ONE_CORE}
        with running_server(tmp_path / "gw", "--registry-file", str(registry), env=env) as gw:
            assert "loading" not in gw.log(), "the gateway loads no model"
            client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=gw.api_key,
                                   max_retries=0)  # fmt: skip
            models: list[str] = ["mimo-v2-flash", "mimo-v2-pro"]
            for model in models:
                answer = client.chat.completions.create(model=model, messages=HI,
                                                        max_completion_tokens=12, seed=1)  # fmt: skip
                assert answer.model == model and answer.id.startswith("chatcmpl-")
                assert answer.choices[0].message.content
                assert answer.usage is not None and answer.usage.prompt_tokens > 5
                assert answer.usage.completion_tokens <= 12

                pieces, usage = [], None
                stream = client.chat.completions.create(
                    model=model, messages=HI, max_completion_tokens=12, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                for chunk in stream:
                    assert chunk.model == model
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        pieces.append(choice.delta.content or "")
                assert "".join(pieces).strip()
                assert usage is not None and usage.completion_tokens >= 1

                with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions",
                                  headers={"api-key": gw.api_key}, timeout=60,
                                  json={"model": model, "messages": HI, "stream": True,
                                        "max_completion_tokens": 8}) as raw:  # fmt: skip
                    lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])

                # logprobs and n are the engine's: two one-choice requests, logprobs relayed.
                extras = client.chat.completions.create(
                    model=model, messages=HI, max_completion_tokens=6, seed=3, n=2,
                    logprobs=True, top_logprobs=2,
                )  # fmt: skip
                assert [c.index for c in extras.choices] == [0, 1]
                assert extras.usage is not None and extras.usage.completion_tokens <= 12
                for answered in extras.choices:
                    assert answered.logprobs is not None and answered.logprobs.content, model
                    tokens = answered.logprobs.content
                    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
                    text = "".join(t.token for t in tokens)
                    assert (answered.message.content or "") in text, (model, text)

            # Thinking passes through to the mimoserve engine as `thinking`.
            thought = httpx.post(f"{gw.base_url}/v1/chat/completions",
                                 headers={"api-key": gw.api_key}, timeout=60,
                                 json={"model": "mimo-v2-flash", "messages": HI,
                                       "thinking": {"type": "enabled"},
                                       "max_completion_tokens": 24}).json()  # fmt: skip
            assert thought["choices"][0]["message"].get("reasoning_content")


def _canned(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.upstream.canned", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=0.5)
            return proc
        except httpx.TransportError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)


def test_replica_killed_and_restarted_under_load(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    replicas = [_canned(port, tmp_path / f"r{i}.log") for i, port in enumerate(ports)]
    toml = '[models.mimo-v2-flash]\nbackend = "upstream"\nupstream_timeout_s = 5\n' + "".join(
        f'[[models.mimo-v2-flash.upstreams]]\nurl = "http://127.0.0.1:{p}/v1"\nkind = "vllm"\n'
        for p in ports
    )
    outcomes: list[str] = []
    stop = threading.Event()
    try:
        with running_gateway(tmp_path, toml, health_interval_s=0.2) as gw:

            def client(stream: bool) -> None:
                with httpx.Client(base_url=gw.url, headers={"api-key": gw.key}, timeout=10) as c:
                    body = {"model": "mimo-v2-flash", "messages": HI, "stream": stream}
                    while not stop.is_set():
                        try:
                            r = c.post("/v1/chat/completions", json=body)
                        except httpx.HTTPError as exc:
                            outcomes.append(f"transport:{exc!r}")
                            continue
                        if r.status_code != 200:
                            outcomes.append(f"status:{r.status_code}")
                        elif stream and not r.text.rstrip().endswith("data: [DONE]"):
                            outcomes.append("stream-unterminated")
                        elif stream and '"error"' in r.text:
                            outcomes.append("stream-error-event")  # was in flight at the kill
                        else:
                            outcomes.append("ok")

            threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(8)]
            for t in threads:
                t.start()
            until_sync(lambda: len(outcomes) >= 50, "load on both replicas")
            replicas[0].send_signal(signal.SIGKILL)  # dies mid-load
            replicas[0].wait()
            killed_at = len(outcomes)
            until_sync(lambda: len(outcomes) >= killed_at + 60, "served while one is down")
            served_while_down = len(outcomes) - killed_at
            replicas[0] = _canned(ports[0], tmp_path / "r0.log")  # back, on the same port

            def restarted_served() -> bool:
                stats = httpx.get(f"http://127.0.0.1:{ports[0]}/stats", timeout=5).json()
                return int(stats["requests"]) > 0

            until_sync(restarted_served, "the restarted replica got traffic again")
            stop.set()
            for t in threads:
                t.join(20)
            stats = httpx.get(f"http://127.0.0.1:{ports[0]}/stats").json()
    finally:
        for proc in replicas:
            proc.kill()
            proc.wait()
    assert len(outcomes) > 100 and served_while_down >= 60
    failed = [o for o in outcomes if o not in ("ok", "stream-error-event")]
    assert failed == [], failed[:5]  # non-stream and not-yet-started requests failed over
    assert outcomes.count("stream-error-event") <= 8  # at most the streams cut at the kill
    assert stats["requests"] > 0, "the restarted replica got traffic again"


def test_cache_routing_keeps_each_conversation_on_the_engine_that_holds_it(
    tmp_path: Path,
) -> None:
    """Two real engines behind a gateway (cache-aware routing, the default): every turn
    after a conversation's first finds its whole earlier prompt in its engine's cache."""
    rules = " ".join(f"Rule {i}: item {i} has code {i * 7 % 13}." for i in range(60))
    systems = [f"You are agent {name}. {rules}" for name in ("Alder", "Birch")]
    with running_server(tmp_path / "e0", "--n-threads", "1", "--n-ctx", "4096",
                        env=ONE_CORE) as e0, \
            running_server(tmp_path / "e1", "--n-threads", "1", "--n-ctx", "4096",
                           env=ONE_CORE) as e1:  # fmt: skip
        registry = tmp_path / "fleet.toml"
        registry.write_text('[models.mimo-v2-flash]\nbackend = "upstream"\n' + "".join(
            f'[[models.mimo-v2-flash.upstreams]]\nurl = "{e.base_url}/v1"\nkind = "mimoserve"\n'
            f'model = "mimo-v2-flash"\napi_key_env = "E{i}_KEY"\n' for i, e in enumerate((e0, e1))
        ))  # fmt: skip
        env = {"E0_KEY": e0.api_key, "E1_KEY": e1.api_key, **ONE_CORE}
        with running_server(tmp_path / "gw", "--registry-file", str(registry), env=env) as gw:
            client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=gw.api_key,
                                   max_retries=0)  # fmt: skip
            later_turns: list[tuple[int, int]] = []
            for number in range(4):
                messages: Any = [{"role": "system", "content": systems[number % 2]},
                                 {"role": "user", "content": f"Task {number}: item {number}?"}]  # fmt: skip
                for turn in range(3):
                    answer = client.chat.completions.create(
                        model="mimo-v2-flash", messages=messages, max_completion_tokens=8,
                        temperature=0,
                    )  # fmt: skip
                    usage = answer.usage
                    assert usage is not None and usage.prompt_tokens_details is not None
                    if turn:
                        later_turns.append((usage.prompt_tokens,
                                            usage.prompt_tokens_details.cached_tokens or 0))  # fmt: skip
                    messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                                 {"role": "user", "content": f"And item {number + turn + 1}?"}]  # fmt: skip
            metrics = httpx.get(f"{gw.base_url}/metrics").text
    # Each later turn's prompt was cached up to its previous answer (a few new tokens).
    for prompt, cached in later_turns:
        assert cached >= prompt - 40, (prompt, cached)
    assert 'predicted="hit"' in metrics and "mimoserve:fleet_cached_tokens_total" in metrics
