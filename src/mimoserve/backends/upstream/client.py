"""Sends one model's requests to its replicas: retries before the first byte, relays after.

A request that fails before anything reached the client (connection refused, an error
status other than the client's own 400, a body that is not a chat completion, a stream
that breaks before its first chunk) is retried on another replica. Once the first chunk
was relayed, a failure ends the stream with an error event. A client that goes away
closes the upstream connection at once, which makes vLLM, SGLang and llama.cpp abort
the generation.

The HTTP client is aiohttp: measured here against the canned engine, one request's
round trip cost 0.5 ms with aiohttp and 1.7 ms with httpx, most of it client CPU, which
on a gateway is the whole budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp

from mimoserve.backends.base import Capabilities
from mimoserve.backends.upstream.replicas import Replica, ReplicaPool
from mimoserve.backends.upstream.routing import PrefixRouter, RouteHint
from mimoserve.backends.upstream.shared_claims import RedisClaims
from mimoserve.backends.upstream.wire import UpstreamFailure, error_from_status
from mimoserve.errors import MimoError
from mimoserve.registry import ModelEntry
from mimoserve.streams import OwnedStream

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
HEALTH_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
_JSON = {"Content-Type": "application/json"}
# What a broken connection or a garbled body raises (timeouts are told apart first).
_TRANSPORT_ERRORS = (aiohttp.ClientError, ConnectionError, OSError)

# The request body for one replica (engines differ in model names and fields).
BodyFor = Callable[[Replica], dict[str, Any]]


class UpstreamTimeout(UpstreamFailure):
    default_code = "upstream_timeout"


def new_session() -> aiohttp.ClientSession:
    """One connection pool for every upstream model (keep-alive across requests)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30),
        # Engines are ours to trust with the body, not with proxies from the environment.
        trust_env=False,
        auto_decompress=True,
        raise_for_status=False,
    )


class UpstreamModel:
    """One public model id served by a fleet of OpenAI-compatible replicas."""

    def __init__(
        self,
        entry: ModelEntry,
        session: aiohttp.ClientSession | None = None,
        *,
        pool: ReplicaPool | None = None,
        health_interval_s: float = 5.0,
        cache_aware: bool = True,
        redis_url: str | None = None,
    ) -> None:
        self.entry = entry
        router = None
        if cache_aware:
            shared = None
            if redis_url:
                urls = [spec.url.rstrip("/") for spec in entry.upstreams]
                shared = RedisClaims(redis_url, model=entry.id, replicas=urls)
            router = PrefixRouter(shared=shared)
        self.pool = pool or ReplicaPool(entry.upstreams, router=router)
        self._session = session
        # sock_read: the longest silence between bytes, so a long generation that keeps
        # streaming is never cut, while a stalled engine is.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=entry.upstream_timeout_s
        )
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
            # Every engine kind reports logprobs in OpenAI's shape; n is served as n
            # requests of one choice (wire.request_body).
            logprobs=True,
            choices=True,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created inside the running loop, as aiohttp wants
            self._session = new_session()
        return self._session

    def use_session(self, session: aiohttp.ClientSession) -> None:
        self._session = session

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
        if self.pool.router is not None:
            await self.pool.router.close()

    async def check_health(self) -> None:
        """One round of checks: `GET {url}/models` on every replica."""
        await asyncio.gather(*(self._check(replica) for replica in self.pool.replicas))

    async def _check(self, replica: Replica) -> None:
        try:
            async with self.session.get(
                f"{replica.base_url}/models", headers=replica.headers,
                timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S),
            ) as response:  # fmt: skip
                healthy = response.status == 200
        except (TimeoutError, *_TRANSPORT_ERRORS):
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

    def _next(self, tried: set[int], last: MimoError | None, hint: RouteHint | None) -> Replica:
        replica = self.pool.pick(tried, hint)
        if replica is None:
            if last is not None:
                raise last
            raise UpstreamFailure(
                f"Every replica of {self.entry.id!r} is unavailable; retry shortly.",
                retry_after_s=self.pool.retry_after_s(),
            )
        tried.add(replica.index)
        return replica

    async def _post(self, replica: Replica, body: dict[str, Any]) -> aiohttp.ClientResponse:
        return await self.session.post(
            f"{replica.base_url}/chat/completions", data=json.dumps(body).encode(),
            headers={**_JSON, **replica.headers}, timeout=self._timeout,
        )  # fmt: skip

    async def complete(self, body_for: BodyFor, hint: RouteHint | None = None) -> Any:
        """The engine's parsed JSON answer (mapping is the caller's)."""
        tried: set[int] = set()
        last: MimoError | None = None
        for _ in range(min(MAX_ATTEMPTS, len(self.pool.replicas))):
            replica = self._next(tried, last, hint)
            done = blamed = False  # a client that leaves (CancelledError) blames no replica
            response: aiohttp.ClientResponse | None = None
            try:
                response = await self._post(replica, body_for(replica))
                raw = await response.read()
                done = True  # the body is read: the connection can go back to the pool
                if response.status != 200:
                    error = error_from_status(response.status, raw)
                    if not isinstance(error, UpstreamFailure):
                        raise error  # the client's own mistake: no retry
                    blamed, last = True, error
                    continue
                try:
                    data = json.loads(raw)
                    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                        raise ValueError("not a chat completion")
                except ValueError:
                    log.warning("upstream %s sent a body that is not a chat completion",
                                replica.name)  # fmt: skip
                    blamed = True
                    last = UpstreamFailure("The model engine sent a malformed answer.",
                                           code="upstream_malformed")  # fmt: skip
                    continue
                return data
            except TimeoutError as exc:
                blamed = True
                raise UpstreamTimeout(
                    "The model engine did not answer in time.", retry_after_s=1
                ) from exc
            except _TRANSPORT_ERRORS as exc:
                blamed = True
                log.warning("upstream %s unreachable: %r", replica.name, exc)
                last = UpstreamFailure("The model engine is unreachable.")
            finally:
                if response is not None and not done:
                    response.close()  # cancelled or failed mid-answer: drop the connection
                self.pool.release(replica, ok=not blamed)
        assert last is not None
        raise last

    async def open_stream(
        self, body_for: BodyFor, hint: RouteHint | None = None
    ) -> OwnedStream[list[Any]]:
        """Yields the engine's parsed chunks in the batches they arrived in; returns only
        once the first batch is there."""
        tried: set[int] = set()
        last: MimoError | None = None
        for _ in range(min(MAX_ATTEMPTS, len(self.pool.replicas))):
            replica = self._next(tried, last, hint)
            response: aiohttp.ClientResponse | None = None
            try:
                response = await self._post(replica, body_for(replica))
                if response.status != 200:
                    error = error_from_status(response.status, await response.read())
                    if not isinstance(error, UpstreamFailure):
                        response.close()
                        self.pool.release(replica, ok=True)
                        raise error
                    last = error
                else:
                    events = _sse_data(response)
                    first = await anext(events)
                    lease = _Lease(self.pool, replica, response)
                    return OwnedStream(self._relay(lease, events, first), lease.abandon)
            except TimeoutError as exc:
                if response is not None:
                    response.close()
                self.pool.release(replica, ok=False)
                raise UpstreamTimeout("The model engine did not answer in time.") from exc
            except (*_TRANSPORT_ERRORS, ValueError, StopAsyncIteration) as exc:
                log.warning("upstream %s failed before streaming: %r", replica.name, exc)
                last = UpstreamFailure("The model engine failed before answering.")
            except BaseException:  # cancelled (the client left): not the replica's fault
                if response is not None:
                    response.close()
                self.pool.release(replica, ok=True)
                raise
            if response is not None:
                response.close()
            self.pool.release(replica, ok=False)
        assert last is not None
        raise last

    async def _relay(
        self, lease: _Lease, events: AsyncGenerator[list[Any], None], first: list[Any],
    ) -> AsyncGenerator[list[Any], None]:  # fmt: skip
        replica = lease.replica
        failed = False  # a client that leaves (GeneratorExit) is not the replica's fault
        finished = False
        try:
            yield first
            async for event in events:
                yield event
            finished = True
        except TimeoutError as exc:
            failed = True
            raise UpstreamTimeout("The model engine stopped sending in time.") from exc
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            failed = True
            log.warning("upstream %s broke its stream: %r", replica.name, exc)
            raise UpstreamFailure("The model engine broke off the answer.",
                                  code="upstream_stream_broken") from exc  # fmt: skip
        finally:
            lease.end(finished=finished, ok=not failed)


class _Lease:
    """A replica's outstanding slot and its open response, released exactly once."""

    def __init__(self, pool: ReplicaPool, replica: Replica, response: aiohttp.ClientResponse):
        self.pool, self.replica, self._response = pool, replica, response
        self._ended = False

    def end(self, *, finished: bool, ok: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if finished:
            self._response.release()  # read to the end: the connection can be reused
        else:
            # Closing mid-stream drops the connection: the engine aborts the generation.
            self._response.close()
        self.pool.release(self.replica, ok=ok)

    def abandon(self) -> None:
        """The client left before reading: not the replica's fault."""
        self.end(finished=False, ok=True)


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncGenerator[list[Any], None]:
    """Parsed `data:` payloads of an SSE body, up to `[DONE]`, in batches: everything that
    arrived in one read comes out together, so chunks an engine sent in a burst cost one
    write to the client instead of one each (nothing waits for a batch to fill). A body
    that ends without `[DONE]` is a broken stream (ValueError)."""
    pending = b""
    while True:
        data = await response.content.readany()
        if not data:
            raise ValueError("the stream ended without [DONE]")
        *lines, pending = (pending + data).split(b"\n")
        batch: list[Any] = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # comments (`: ping`), event names, blank separators
            payload = line[5:].strip()
            if payload == b"[DONE]":
                if batch:
                    yield batch
                return
            try:
                batch.append(json.loads(payload))
            except ValueError:
                if batch:  # what was good goes out first, as it would have unbatched
                    yield batch
                raise
        if batch:
            yield batch


def build_upstreams(
    entries: list[ModelEntry], *, cache_aware: bool = True, redis_url: str | None = None
) -> dict[str, UpstreamModel]:
    """Every upstream model of the registry (the relay gives them one session at start);
    with `redis_url`, their routing claims are shared with every gateway using it."""
    return {
        entry.id: UpstreamModel(entry, cache_aware=cache_aware, redis_url=redis_url)
        for entry in entries
        if entry.backend == "upstream"
    }
