"""A client that opens a stream and stops reading: the stream ends after the write
timeout, gives back its place, and the tokens generated for it are billed (499)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore
from tests.fake_backend import ScriptedBackend, fake_app
from tests.services import uvicorn_in_thread
from tests.waiting import until_sync

PIECE = "y" * 32_768  # one token's text, large so the socket buffers fill fast


def open_and_stop_reading(url: str, key: str) -> socket.socket:
    """Sends a streaming request, reads the first bytes of the answer, then reads no
    more (the connection stays open, as a stalled or hostile client would leave it)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "mimo-v2-flash", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\napi-key: {key}\r\n"
         f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}").encode()
    )  # fmt: skip
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    return sock


def test_a_stream_nobody_reads_ends_after_the_write_timeout_and_is_billed(
    tmp_path: Path, database: Database, keys: KeyStore, backend: ScriptedBackend, api_key: str
) -> None:
    settings = Settings(home=tmp_path, stream_write_timeout_s=0.5)
    backend.enqueue([PIECE] * 2000)  # ~64 MB of answer: far more than any socket buffer
    usage = SqlUsageStore(database)
    with uvicorn_in_thread(fake_app(settings, database, backend)) as url:
        stalled = open_and_stop_reading(url, api_key)
        try:
            until_sync(lambda: any(r.status == 499 for r in usage.records()),
                       "the stalled stream was ended and recorded")  # fmt: skip
            assert backend.closed_streams == 1  # its generation (and engine place) is gone
            honest = httpx.post(f"{url}/v1/chat/completions", headers={"api-key": api_key},
                                json={"model": "mimo-v2-flash",
                                      "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            assert honest.status_code == 200
        finally:
            stalled.close()
    stalled_record = next(r for r in usage.records() if r.status == 499)
    # Billed for what was generated for it, not only what reached the client: at least
    # the pieces that filled the buffers, never the whole answer it did not wait for.
    assert 1 <= stalled_record.completion_tokens < 2000
