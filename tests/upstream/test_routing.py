"""Cache-aware fleet routing: the rule on its own (replicas as plain objects), then a real
gateway in front of canned engines that keep a prefix cache and report it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mimoserve.backends.upstream.client import build_upstreams
from mimoserve.backends.upstream.routing import (
    BLOCK_CHARS,
    BUSY_FLOOR,
    LOAD_SLACK,
    PrefixRouter,
    RouteHint,
    route_hint,
)
from mimoserve.backends.upstream.shared_claims import RETRY_AFTER_S, RedisClaims
from mimoserve.protocol.chat import ChatCompletionRequest
from tests.upstream.canned import Canned, serve_in_thread
from tests.upstream.conftest import registry_for, running_gateway
from tests.waiting import until_sync


@dataclass
class FakeReplica:
    index: int
    outstanding: int = 0


SYSTEMS = [f"You are agent {name}. " + "Follow the house rules. " * 60 for name in "ABC"]


def conversation(system: str, user: str, turns: int) -> list[dict[str, Any]]:
    """The messages of a conversation's `turns`-th request."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    for turn in range(1, turns):
        messages += [{"role": "assistant", "content": f"Answer {turn} to {user}."},
                     {"role": "user", "content": f"Follow-up {turn}."}]  # fmt: skip
    return messages


def hint(messages: list[dict[str, Any]]) -> RouteHint:
    return route_hint(ChatCompletionRequest.model_validate({"model": "m", "messages": messages}))


def send(router: PrefixRouter, replicas: list[FakeReplica], h: RouteHint) -> FakeReplica:
    chosen = router.choose(replicas, h)
    router.routed(chosen.index, h)
    return chosen


def test_blocks_name_whole_prefixes_and_a_longer_prompt_extends_them() -> None:
    first, second = hint(conversation(SYSTEMS[0], "q", 1)), hint(conversation(SYSTEMS[0], "q", 2))
    assert len(first.blocks) >= len(SYSTEMS[0]) // BLOCK_CHARS
    shared = [a == b for a, b in zip(first.blocks, second.blocks, strict=False)]
    assert shared[:-1] == [True] * (len(shared) - 1)  # all but the partial last block
    assert first.conversation == second.conversation  # same first user message
    other = hint(conversation(SYSTEMS[0], "another question", 1))
    assert other.conversation != first.conversation and other.blocks[0] == first.blocks[0]


def test_a_conversation_stays_on_the_replica_that_holds_it() -> None:
    router, replicas = PrefixRouter(), [FakeReplica(i) for i in range(3)]
    for user in ("q1", "q2", "q3", "q4"):
        homes = {send(router, replicas, hint(conversation(SYSTEMS[1], user, t))).index
                 for t in range(1, 5)}  # fmt: skip
        assert len(homes) == 1, user


def test_gateways_without_shared_state_agree_on_new_conversations() -> None:
    replicas = [FakeReplica(i) for i in range(3)]
    one, two = PrefixRouter(), PrefixRouter()
    chosen = {}
    for user in (f"question {i}" for i in range(12)):
        h = hint(conversation(SYSTEMS[2], user, 1))
        chosen[user] = send(one, replicas, h).index
        assert send(two, replicas, hint(conversation(SYSTEMS[2], user, 1))).index == chosen[user]
    # With nothing learnt, distinct conversations spread over the replicas.
    fresh = PrefixRouter()
    spread = {fresh.choose(replicas, hint(conversation(SYSTEMS[0], f"q{i}", 1))).index
              for i in range(12)}  # fmt: skip
    assert spread == {0, 1, 2}


def test_a_burst_of_new_system_prompts_puts_each_on_its_own_replica() -> None:
    # Conversations all under way at once, none learnt yet: a prompt nobody holds goes
    # where least is running, so three system prompts never share a replica by chance
    # (rendezvous alone puts the third on a taken replica one time in three).
    for trial in range(10):
        router, replicas = PrefixRouter(), [FakeReplica(i) for i in range(3)]
        systems = [f"Trial {trial}, agent {name}. " + "Keep to the rules. " * 60 for name in "XYZ"]
        homes: dict[int, set[int]] = {}
        for i in range(12):
            chosen = send(router, replicas, hint(conversation(systems[i % 3], f"task {i}", 1)))
            chosen.outstanding += 1
            homes.setdefault(i % 3, set()).add(chosen.index)
        assert sorted(min(h) for h in homes.values()) == [0, 1, 2], (trial, homes)
        assert all(len(h) == 1 for h in homes.values()), (trial, homes)


def test_a_saturated_replica_sheds_new_work_and_none_runs_above_the_bound() -> None:
    router, replicas = PrefixRouter(), [FakeReplica(i) for i in range(3)]
    home = send(router, replicas, hint(conversation(SYSTEMS[0], "seed", 1)))
    for i in range(30):  # 30 conversations on the same system prompt, all still running
        chosen = send(router, replicas, hint(conversation(SYSTEMS[0], f"user {i}", 1)))
        chosen.outstanding += 1
        total = sum(r.outstanding for r in replicas)
        assert chosen.outstanding <= max(BUSY_FLOOR, math.ceil(LOAD_SLACK * total / 3)), i
    assert home.outstanding == max(r.outstanding for r in replicas)  # the holder took most
    assert sum(r.outstanding > 0 for r in replicas) >= 2  # ... and the rest spilled over


def test_a_replica_below_the_busy_floor_keeps_its_conversations() -> None:
    # Four turns sharing a system prompt arrive together: the replica holding it takes
    # them all (it batches them), rather than one of them reading the prompt elsewhere.
    router, replicas = PrefixRouter(), [FakeReplica(i) for i in range(3)]
    home = send(router, replicas, hint(conversation(SYSTEMS[0], "seed", 1)))
    for i in range(3):  # the fourth turn arrives with three running there
        chosen = send(router, replicas, hint(conversation(SYSTEMS[0], f"user {i}", 1)))
        chosen.outstanding += 1
        assert chosen is home, i


def test_a_dead_replicas_claims_are_dropped() -> None:
    router, replicas = PrefixRouter(), [FakeReplica(i) for i in range(3)]
    h = hint(conversation(SYSTEMS[0], "q", 3))
    home = send(router, replicas, h)
    assert router.held(h.blocks, [home.index])[home.index] == len(h.blocks)
    router.forget(home.index)
    assert router.held(h.blocks, [home.index])[home.index] == 0


def test_a_replica_that_reports_misses_loses_its_pull() -> None:
    router, replicas = PrefixRouter(), [FakeReplica(i) for i in range(2)]
    h = hint(conversation(SYSTEMS[0], "q", 2))
    home = send(router, replicas, h)
    for _ in range(12):  # predicted a full hit, the engine keeps reporting none cached
        again = hint(conversation(SYSTEMS[0], "q", 2))
        assert router.choose(replicas, again).index in (0, 1)
        again.predicted, again.served_by = len(again.blocks), home.index
        router.reported(again, prompt_tokens=1000, cached_tokens=0)
    assert router.stats(home.index).reliability < 0.1
    router.reported(RouteHint(h.blocks, h.conversation, home.index, len(h.blocks)), 1000, 1000)
    assert router.stats(home.index).reliability > 0.1  # and it recovers when it holds


def test_memory_is_bounded() -> None:
    router, replicas = PrefixRouter(max_blocks=50), [FakeReplica(0)]
    for i in range(40):
        send(router, replicas, hint(conversation(SYSTEMS[0], f"q{i}", 1)))
    assert len(router._claims) <= 50


# ---- a gateway in front of canned engines ------------------------------------------------


def run_conversations(url: str, key: str, turns: int = 3) -> None:
    with httpx.Client(base_url=url, headers={"api-key": key}, timeout=30) as client:
        for turn in range(1, turns + 1):
            for system in SYSTEMS[:2]:
                for user in ("alpha", "beta", "gamma"):
                    body = {"model": "mimo-v2-flash",
                            "messages": conversation(system, user, turn)}  # fmt: skip
                    assert client.post("/v1/chat/completions", json=body).status_code == 200


def hit_rate(engines: list[Canned]) -> float:
    prompt = sum(len(p) for e in engines for p in e.served_prompts)
    reused = 0
    for engine in engines:
        for i, text in enumerate(engine.served_prompts):
            before = engine.served_prompts[:i]
            reused += max((_common(text, seen) for seen in before), default=0)
    return reused / prompt


def _common(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))  # fmt: skip


def conversations_per_replica(engines: list[Canned]) -> dict[str, set[int]]:
    where: dict[str, set[int]] = {}
    for index, engine in enumerate(engines):
        for request in engine.requests:
            first_user = request["messages"][1]["content"] + request["messages"][0]["content"]
            where.setdefault(first_user, set()).add(index)
    return where


@pytest.mark.parametrize("cache_aware", [True, False])
def test_conversations_keep_their_replica_and_their_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_aware: bool
) -> None:
    engines = [Canned(prefix_cache=True) for _ in range(3)]
    if not cache_aware:
        monkeypatch.setattr("tests.upstream.conftest.build_upstreams",
                            lambda entries: build_upstreams(entries, cache_aware=False))  # fmt: skip
    with (serve_in_thread(engines[0]) as a, serve_in_thread(engines[1]) as b,
          serve_in_thread(engines[2]) as c,
          running_gateway(tmp_path, registry_for(a, b, c)) as gw):  # fmt: skip
        run_conversations(gw.url, gw.key)
        metrics = httpx.get(gw.url + "/metrics").text
    rate = hit_rate(engines)
    if cache_aware:
        assert all(len(r) == 1 for r in conversations_per_replica(engines).values())
        assert rate > 0.8, rate
        assert 'mimoserve:fleet_routed_total{model="mimo-v2-flash"' in metrics
        assert 'predicted="hit"' in metrics and "mimoserve:fleet_cached_tokens_total" in metrics
    else:
        print(f"least outstanding: hit rate {rate:.2f}")
        assert "fleet_routed_total{" not in metrics


def test_a_dead_replica_is_routed_around_and_comes_back_unflooded(tmp_path: Path) -> None:
    engines = [Canned(prefix_cache=True) for _ in range(3)]
    with (serve_in_thread(engines[0]) as a, serve_in_thread(engines[1]) as b,
          serve_in_thread(engines[2]) as c,
          running_gateway(tmp_path, registry_for(a, b, c)) as gw):  # fmt: skip
        run_conversations(gw.url, gw.key, turns=1)
        busiest = max(range(3), key=lambda i: len(engines[i].requests))
        engines[busiest].healthy = False  # its health check fails: the breaker opens
        pool = gw.app_state.chat.catalogue.backend_for("mimo-v2-flash").model.pool  # type: ignore[attr-defined]
        until_sync(lambda: pool.replicas[busiest].failures >= 3, "the breaker opened")
        before = len(engines[busiest].requests)
        run_conversations(gw.url, gw.key, turns=2)  # every request still answered
        assert len(engines[busiest].requests) == before
        engines[busiest].healthy = True
        until_sync(lambda: pool.replicas[busiest].failures == 0, "the replica is back")
        counts = [len(e.requests) for e in engines]
        run_conversations(gw.url, gw.key, turns=3)
        # Its claims were dropped: the conversations stay where they moved.
        assert len(engines[busiest].requests) - counts[busiest] <= 2


# ---- gateways sharing claims through Redis ------------------------------------------------

URLS = [f"http://10.0.0.{i}:8000/v1" for i in range(3)]


def shared_router(redis_url: str, space: str) -> PrefixRouter:
    return PrefixRouter(shared=RedisClaims(redis_url, model="m", replicas=URLS, prefix=space))


async def send_shared(router: PrefixRouter, replicas: list[FakeReplica], h: RouteHint
                      ) -> FakeReplica:  # fmt: skip
    await router.prefetch(h)
    chosen = router.choose(replicas, h)
    router.routed(chosen.index, h)
    assert router.shared is not None
    await router.shared._writes.drain()  # the claim is written beside the request
    return chosen


async def test_a_turn_reaching_another_gateway_finds_its_replica_through_redis(
    redis_url: str,
) -> None:
    space = f"t{id(object())}"
    one, two = shared_router(redis_url, space), shared_router(redis_url, space)
    replicas = [FakeReplica(i, outstanding=1) for i in range(3)]
    try:
        for n in range(6):
            first = await send_shared(one, replicas, hint(conversation(SYSTEMS[n % 3], f"q{n}", 1)))
            first.outstanding += 1  # the busiest: on its own, gateway two would pick another
            second = await send_shared(
                two, replicas, hint(conversation(SYSTEMS[n % 3], f"q{n}", 2))
            )
            assert second.index == first.index, n
            first.outstanding -= 1
        # A replica whose breaker opened on one gateway is forgotten on the other too.
        h = hint(conversation(SYSTEMS[0], "q0", 3))
        await two.prefetch(h)
        home = max(h.shared, key=h.shared.__getitem__)
        one.forget(home)
        assert one.shared is not None
        await one.shared._writes.drain()
        again = hint(conversation(SYSTEMS[0], "q0", 3))
        await two.prefetch(again)
        assert home not in again.shared
    finally:
        await one.close()
        await two.close()


async def test_routing_goes_on_from_local_claims_when_redis_is_down() -> None:
    now = [0.0]
    shared = RedisClaims("redis://127.0.0.1:9", model="m", replicas=URLS, clock=lambda: now[0])
    router = PrefixRouter(shared=shared)
    replicas = [FakeReplica(i) for i in range(3)]
    reads = 0
    script = shared._held

    async def counted(**kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await script(**kwargs)

    shared._held = counted  # type: ignore[assignment]
    try:
        homes = {(await send_shared(router, replicas, hint(conversation(SYSTEMS[1], "q", t)))).index
                 for t in range(1, 4)}  # fmt: skip
        assert len(homes) == 1
        assert reads == 1  # a failed Redis is not asked again on every request...
        now[0] += RETRY_AFTER_S
        await router.prefetch(hint(conversation(SYSTEMS[1], "q", 1)))
        assert reads == 2  # ... but again after the interval
    finally:
        await router.close()
