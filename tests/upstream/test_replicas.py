from __future__ import annotations

from mimoserve.backends.upstream.replicas import ReplicaPool
from mimoserve.registry import UpstreamSpec


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def pool(n: int, clock: Clock) -> ReplicaPool:
    specs = [UpstreamSpec(url=f"http://10.0.0.{i}/v1") for i in range(n)]
    return ReplicaPool(specs, failure_threshold=2, cooldown_s=1.0, max_cooldown_s=8.0, clock=clock)


def test_least_outstanding_wins_and_ties_rotate() -> None:
    p = pool(3, Clock())
    first = p.pick(set())
    second = p.pick(set())
    third = p.pick(set())
    assert first and second and third
    assert {first.index, second.index, third.index} == {0, 1, 2}
    p.release(second, ok=True)
    again = p.pick(set())
    assert again is not None and again.index == second.index  # the only one with 0 outstanding
    assert p.pick({0, 1, 2}) is None


def test_breaker_opens_backs_off_half_opens_and_closes() -> None:
    clock = Clock()
    p = pool(1, clock)
    for _ in range(2):
        r = p.pick(set())
        assert r is not None
        p.release(r, ok=False)
    assert p.pick(set()) is None and p.retry_after_s() == 1  # open for the first cooldown
    clock.now += 1.0
    trial = p.pick(set())
    assert trial is not None and p.pick(set()) is None  # half-open: one trial at a time
    p.release(trial, ok=False)  # the trial failed: open again, for twice as long
    assert p.pick(set()) is None and p.retry_after_s() == 2
    clock.now += 2.0
    trial = p.pick(set())
    assert trial is not None
    p.release(trial, ok=True)
    assert p.pick(set()) is not None and p.pick(set()) is not None  # closed: no limit


def test_health_check_failure_opens_at_once_and_success_closes() -> None:
    clock = Clock()
    p = pool(2, clock)
    down = p.replicas[0]
    p.failed(down, at_once=True)
    picks = {p.pick(set()).index for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {1}
    p.succeeded(down)
    assert p.pick({1}) is not None
