"""Sends one model's requests to its replicas: retries before the first byte, relays after.

A request that fails before anything reached the client (connection refused, an error
status other than the client's own 400, a body that is not a chat completion, a stream
that breaks before its first chunk) is retried on another replica. Once the first chunk
was relayed, a failure ends the stream with an error event. A client that goes away
closes the upstream connection at once, which makes vLLM, SGLang and llama.cpp abort
the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import httpx

from mimoserve.backends.base import Capabilities
from mimoserve.backends.upstream.replicas import Replica, ReplicaPool
from mimoserve.backends.upstream.wire import UpstreamFailure, error_from_status
from mimoserve.errors import MimoError
from mimoserve.registry import ModelEntry

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
HEALTH_TIMEOUT_S = 2.0


# The request body for one replica (engines differ in model names and fields).
BodyFor = Callable[[Replica], dict[str, Any]]


class UpstreamTimeout(UpstreamFailure):
    default_code = "upstream_timeout"


class UpstreamModel:
    """One public model id served by a fleet of OpenAI-compatible replicas."""

    def __init__(
        self,
        entry: ModelEntry,
        client: httpx.AsyncClient,
        *,
        pool: ReplicaPool | None = None,
        health_interval_s: float = 5.0,
    ) -> None:
        self.entry = entry
        self.pool = pool or ReplicaPool(entry.upstreams)
        self._client = client
        self._timeout = httpx.Timeout(entry.upstream_timeout_s, connect=5.0)
        self._health_interval_s = health_interval_s
        self._health_task: asyncio.Task[None] | None = None

    # ---- what /v1/models shows -------------------------------------------------------

    @property
    def weights_name(self) -> str:
        spec = self.entry.upstreams[0]
        return f"{spec.kind}:{spec.model or self.entry.id}"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            context_length=self.entry.context_length or 0,
            input_modalities=frozenset(self.entry.input_modalities),
            tools=True,
            constrained_output=True,
        )

    @property
    def client(self) -> httpx.AsyncClient:
        return self._client

    # ---- health ------------------------------------------------------------------------

    def start(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._check_forever())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None

    async def check_health(self) -> None:
        """One round of checks: `GET {url}/models` on every replica."""
        await asyncio.gather(*(self._check(replica) for replica in self.pool.replicas))

    async def _check(self, replica: Replica) -> None:
        try:
            response = await self._client.get(
                f"{replica.base_url}/models", headers=replica.headers, timeout=HEALTH_TIMEOUT_S
            )
            healthy = response.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            self.pool.succeeded(replica)
        else:
            log.warning("upstream %s failed its health check", replica.name)
            self.pool.failed(replica, at_once=True)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await self.check_health()

    # ---- requests ----------------------------------------------------------------------

    def _next(self, tried: set[int], last: MimoError | None) -> Replica:
        replica = self.pool.pick(tried)
        if replica is None:
            if last is not None:
                raise last
            raise UpstreamFailure(
                f"Every replica of {self.entry.id!r} is unavailable; retry shortly.",
                retry_after_s=self.pool.retry_after_s(),
            )
        tried.add(replica.index)
        return replica

    async def complete(self, body_for: BodyFor) -> Any:
        """The engine's parsed JSON answer (mapping is the caller's)."""
        tried: set[int] = set()
        last: MimoError | None = None
        for _ in range(min(MAX_ATTEMPTS, len(self.pool.replicas))):
            replica = self._next(tried, last)
            ok = False
            try:
                response = await self._client.post(
                    f"{replica.base_url}/chat/completions", json=body_for(replica),
                    headers=replica.headers, timeout=self._timeout,
                )  # fmt: skip
                if response.status_code != 200:
                    error = error_from_status(response.status_code, response.content)
                    ok = not isinstance(error, UpstreamFailure)
                    if ok:
                        raise error  # the client's own mistake: no retry
                    last = error
                    continue
                try:
                    data = json.loads(response.content)
                    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                        raise ValueError("not a chat completion")
                except ValueError:
                    log.warning("upstream %s sent a body that is not a chat completion",
                                replica.name)  # fmt: skip
                    last = UpstreamFailure("The model engine sent a malformed answer.",
                                           code="upstream_malformed")  # fmt: skip
                    continue
                ok = True
                return data
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(
                    "The model engine did not answer in time.", retry_after_s=1
                ) from exc
            except httpx.TransportError as exc:
                log.warning("upstream %s unreachable: %s", replica.name, exc)
                last = UpstreamFailure("The model engine is unreachable.")
            finally:
                self.pool.release(replica, ok=ok)
        assert last is not None
        raise last

    async def open_stream(self, body_for: BodyFor) -> AsyncGenerator[Any, None]:
        """Yields the engine's parsed chunks; returns only once the first one arrived."""
        tried: set[int] = set()
        last: MimoError | None = None
        for _ in range(min(MAX_ATTEMPTS, len(self.pool.replicas))):
            replica = self._next(tried, last)
            request = self._client.build_request(
                "POST", f"{replica.base_url}/chat/completions", json=body_for(replica),
                headers=replica.headers, timeout=self._timeout,
            )  # fmt: skip
            response: httpx.Response | None = None
            try:
                response = await self._client.send(request, stream=True)
                if response.status_code != 200:
                    error = error_from_status(response.status_code, await response.aread())
                    if not isinstance(error, UpstreamFailure):
                        await response.aclose()
                        self.pool.release(replica, ok=True)
                        raise error
                    last = error
                else:
                    events = _sse_data(response)
                    first = await anext(events)
                    return self._relay(replica, response, events, first)
            except httpx.TimeoutException as exc:
                last = UpstreamTimeout("The model engine did not answer in time.")
                if response is not None:
                    await response.aclose()
                self.pool.release(replica, ok=False)
                raise last from exc
            except (httpx.TransportError, ValueError, StopAsyncIteration) as exc:
                log.warning("upstream %s failed before streaming: %r", replica.name, exc)
                last = UpstreamFailure("The model engine failed before answering.")
            if response is not None:
                await response.aclose()
            self.pool.release(replica, ok=False)
        assert last is not None
        raise last

    async def _relay(
        self, replica: Replica, response: httpx.Response, events: AsyncIterator[Any], first: Any
    ) -> AsyncGenerator[Any, None]:
        failed = False  # a client that leaves (GeneratorExit) is not the replica's fault
        try:
            yield first
            async for event in events:
                yield event
        except httpx.TimeoutException as exc:
            failed = True
            raise UpstreamTimeout("The model engine stopped sending in time.") from exc
        except (httpx.TransportError, ValueError) as exc:
            failed = True
            log.warning("upstream %s broke its stream: %r", replica.name, exc)
            raise UpstreamFailure("The model engine broke off the answer.",
                                  code="upstream_stream_broken") from exc  # fmt: skip
        finally:
            # Closing mid-stream drops the connection: the engine aborts the generation.
            await response.aclose()
            self.pool.release(replica, ok=not failed)


async def _sse_data(response: httpx.Response) -> AsyncIterator[Any]:
    """Parsed `data:` payloads of an SSE body, up to `[DONE]`; a body that ends without
    `[DONE]` is a broken stream (ValueError)."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # comments (`: ping`), event names, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)
    raise ValueError("the stream ended without [DONE]")


def build_upstreams(entries: list[ModelEntry]) -> dict[str, UpstreamModel]:
    """One shared connection pool for every upstream model (keep-alive across requests)."""
    upstream_entries = [e for e in entries if e.backend == "upstream"]
    if not upstream_entries:
        return {}
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        # Engines are ours to trust with the body, not with redirects or proxies.
        follow_redirects=False,
        trust_env=False,
    )
    return {entry.id: UpstreamModel(entry, client) for entry in upstream_entries}
