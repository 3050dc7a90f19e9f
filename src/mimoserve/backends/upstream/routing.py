"""Which replica serves a request: the one likely to hold the longest prefix of its prompt
in its KV cache (vLLM's automatic prefix caching, SGLang's radix cache, llama-server's
slots, another mimoserve), unless that would overload it.

Prompt blocks: the request's tools and messages, each as canonical JSON (sorted keys),
one after the other, cut into `BLOCK_CHARS`-character blocks. A block's id hashes the
previous block's id with its text (BLAKE2b), so one id names the whole prompt up to the
block's end, and equal ids mean equal prefixes, on every gateway and after restarts.

Claims: a replica claims every block of each prompt it is sent (it will hold them once
it has read them). When the engine reports its cached tokens, the share of the prompt it
had cached is compared with the share predicted; a replica that keeps holding less than
predicted (an engine without a prefix cache, a small cache that evicts) has its claims
weighed down by a decaying `reliability` (the reported/predicted ratio). A replica whose
circuit breaker opens loses its claims. At most `MAX_BLOCKS` block ids are remembered
(least recently used go first).

The rule, among usable replicas:
1. Load bound: a replica already at `cap = max(BUSY_FLOOR, ceil(LOAD_SLACK x
   (outstanding + 1) / n))` requests gets none while another is below it, so a hot prefix
   spreads when its replica is saturated and no busy replica runs above 1.5x the mean
   load. Below `BUSY_FLOOR` a replica is not saturated (engines decode several sequences
   in one step at little extra cost; mimoserve's default `--n-parallel` is 4): measured,
   without the floor a burst of four turns of conversations sharing a system prompt put
   the second on a replica that had to read the whole prompt again.
2. Among the rest, the most claimed leading blocks (times the replica's reliability).
3. Ties (and prompts no replica holds) go to the least outstanding requests: a new
   system prompt lands where nothing is running, so a burst of conversations with three
   distinct system prompts puts each on its own replica instead of two on one by
   chance (measured with bench/routing.py: with rendezvous before load, cache routing
   computed as many prompt tokens as least outstanding).
4. Then rendezvous hashing of the conversation key (the prompt up to the end of its
   first user message), so equally loaded gateways agree without shared state.

Several gateways: with `--redis-url`, claims are also kept in Redis (shared_claims.py)
and read before each choice, so the gateway a conversation's next turn reaches knows
where the last one went; without it each gateway learns on its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from mimoserve.backends.upstream.shared_claims import RedisClaims
from mimoserve.protocol.chat import ChatCompletionRequest

BLOCK_CHARS = 512
LOAD_SLACK = 1.5
BUSY_FLOOR = 4
MAX_BLOCKS = 200_000
# How fast a replica's reliability follows what it reports (per answer with usage).
_RELIABILITY_RATE = 0.2


class Routable(Protocol):
    index: int
    outstanding: int


R = TypeVar("R", bound=Routable)


@dataclass
class RouteHint:
    """One request's prompt blocks and conversation key; the replica that served it."""

    blocks: list[bytes]
    conversation: bytes
    served_by: int | None = None
    predicted: int = 0  # leading blocks the chosen replica was expected to hold
    shared: dict[int, int] = field(default_factory=dict)  # depths other gateways claimed


def route_hint(request: ChatCompletionRequest) -> RouteHint:
    pieces: list[str] = []
    if request.tools:
        pieces.append(_canonical([tool.model_dump(mode="json") for tool in request.tools]))
    conversation_end = None
    for message in request.messages:
        pieces.append(_canonical(message.model_dump(mode="json", exclude_none=True)))
        if conversation_end is None and message.role == "user":
            conversation_end = len(pieces)
    text = "".join(pieces)
    blocks: list[bytes] = []
    previous = b""
    for start in range(0, len(text), BLOCK_CHARS):
        previous = _digest(previous + text[start : start + BLOCK_CHARS].encode())
        blocks.append(previous)
    leading = "".join(pieces[: conversation_end or len(pieces)])
    return RouteHint(blocks, _digest(leading.encode()))


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def rendezvous_weight(conversation: bytes, replica: int) -> int:
    return int.from_bytes(_digest(conversation + replica.to_bytes(4, "big")), "big")


@dataclass
class ReplicaRouting:
    """What routing knows of one replica, and the counts `/metrics` shows."""

    reliability: float = 1.0
    routed: int = 0
    predicted_hits: int = 0  # routed where it was expected to hold some of the prompt
    prompt_tokens: int = 0  # as the engine reported them
    cached_tokens: int = 0


@dataclass
class PrefixRouter:
    max_blocks: int = MAX_BLOCKS
    _claims: OrderedDict[bytes, set[int]] = field(default_factory=OrderedDict)
    replicas: dict[int, ReplicaRouting] = field(default_factory=dict)
    shared: RedisClaims | None = None

    def stats(self, replica: int) -> ReplicaRouting:
        return self.replicas.setdefault(replica, ReplicaRouting())

    async def prefetch(self, hint: RouteHint) -> None:
        """What every gateway claimed for this prompt (only with shared claims)."""
        if self.shared is not None:
            hint.shared = await self.shared.held(hint.blocks)

    def held(self, blocks: Sequence[bytes], candidates: Sequence[int]) -> dict[int, int]:
        """Leading blocks of the prompt each candidate has claimed."""
        held = dict.fromkeys(candidates, 0)
        still = set(candidates)
        for depth, block in enumerate(blocks):
            still &= self._claims.get(block, set())
            if not still:
                break
            for replica in still:
                held[replica] = depth + 1
        return held

    def choose(self, usable: Sequence[R], hint: RouteHint) -> R:
        total = sum(r.outstanding for r in usable)
        cap = max(BUSY_FLOOR, math.ceil(LOAD_SLACK * (total + 1) / len(usable)))
        under = [r for r in usable if r.outstanding < cap] or list(usable)
        held = self.held(hint.blocks, [r.index for r in under])
        for index, depth in hint.shared.items():
            if index in held:
                held[index] = max(held[index], min(depth, len(hint.blocks)))

        def score(replica: R) -> tuple[float, int, int]:
            weight = held[replica.index] * self.stats(replica.index).reliability
            return (weight, -replica.outstanding,
                    rendezvous_weight(hint.conversation, replica.index))  # fmt: skip

        chosen = max(under, key=score)
        hint.predicted = held[chosen.index]
        return chosen

    def routed(self, replica: int, hint: RouteHint) -> None:
        """`replica` was sent the prompt: it will hold every block of it."""
        hint.served_by = replica
        stats = self.stats(replica)
        stats.routed += 1
        stats.predicted_hits += hint.predicted > 0
        for block in hint.blocks:
            owners = self._claims.get(block)
            if owners is None:
                owners = self._claims[block] = set()
            else:
                self._claims.move_to_end(block)
            owners.add(replica)
        while len(self._claims) > self.max_blocks:
            self._claims.popitem(last=False)
        if self.shared is not None:
            self.shared.claim(replica, hint.blocks)

    def reported(self, hint: RouteHint, prompt_tokens: int, cached_tokens: int) -> None:
        """The engine's usage for a routed request: its share of the prompt it had cached,
        against the share predicted, moves the replica's reliability."""
        if hint.served_by is None or prompt_tokens <= 0:
            return
        stats = self.stats(hint.served_by)
        stats.prompt_tokens += prompt_tokens
        stats.cached_tokens += cached_tokens
        if hint.predicted <= 0 or not hint.blocks:
            return
        expected = hint.predicted / len(hint.blocks)
        ratio = min(1.0, (cached_tokens / prompt_tokens) / expected)
        stats.reliability += _RELIABILITY_RATE * (ratio - stats.reliability)

    def forget(self, replica: int) -> None:
        """A replica that failed: what it held may be gone (a restart empties its cache)."""
        for owners in self._claims.values():
            owners.discard(replica)
        self.stats(replica).reliability = 1.0
        if self.shared is not None:
            self.shared.forget(replica)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
