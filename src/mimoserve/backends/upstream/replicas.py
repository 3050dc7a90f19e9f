"""The replicas of one model: pick by where the prompt's prefix is likely cached, within
a load bound (routing.py), or else by least outstanding requests; a circuit breaker per
replica and active health checks.

A replica that fails `failure_threshold` times in a row is opened (skipped) for a
cooldown that doubles on each reopening, up to `max_cooldown_s`. After the cooldown one
trial request may go through (half-open); success closes the breaker. A health check
that fails opens the breaker at once; one that succeeds closes it, so a restarted
replica is back within one check interval.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mimoserve.backends.upstream.routing import PrefixRouter, RouteHint
from mimoserve.registry import UpstreamSpec


@dataclass
class Replica:
    spec: UpstreamSpec
    index: int
    headers: dict[str, str] = field(default_factory=dict)
    outstanding: int = 0
    failures: int = 0  # consecutive
    open_until: float = 0.0
    cooldown_s: float = 0.0
    trial_in_flight: bool = False

    @property
    def base_url(self) -> str:
        return self.spec.url.rstrip("/")

    @property
    def name(self) -> str:
        return f"{self.spec.kind}@{self.base_url}"


def auth_headers(spec: UpstreamSpec) -> dict[str, str]:
    # Every kind accepts Bearer (vLLM and SGLang accept nothing else).
    key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


class ReplicaPool:
    def __init__(
        self,
        specs: Sequence[UpstreamSpec],
        *,
        failure_threshold: int = 3,
        cooldown_s: float = 1.0,
        max_cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        router: PrefixRouter | None = None,
    ) -> None:
        self.router = router
        self.replicas = [Replica(spec, i, auth_headers(spec)) for i, spec in enumerate(specs)]
        self._threshold = failure_threshold
        self._base_cooldown_s = cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._turn = itertools.count()  # breaks ties between equally loaded replicas

    def _usable(self, replica: Replica, now: float) -> bool:
        if replica.failures < self._threshold:
            return True  # closed
        return now >= replica.open_until and not replica.trial_in_flight  # half-open: one trial

    def pick(self, exclude: set[int], hint: RouteHint | None = None) -> Replica | None:
        now = self._clock()
        usable = [r for r in self.replicas if r.index not in exclude and self._usable(r, now)]
        if not usable:
            return None
        if self.router is not None and hint is not None:
            replica = self.router.choose(usable, hint)
            self.router.routed(replica.index, hint)
        else:
            least = min(r.outstanding for r in usable)
            tied = [r for r in usable if r.outstanding == least]
            replica = tied[next(self._turn) % len(tied)]
        if replica.failures >= self._threshold:
            replica.trial_in_flight = True
        replica.outstanding += 1
        return replica

    def release(self, replica: Replica, *, ok: bool) -> None:
        """Ends one request on `replica`; `ok` is False when the replica is to blame."""
        replica.outstanding -= 1
        replica.trial_in_flight = False
        if ok:
            self.succeeded(replica)
        else:
            self.failed(replica)

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0
        replica.cooldown_s = 0.0
        replica.open_until = 0.0

    def failed(self, replica: Replica, *, at_once: bool = False) -> None:
        replica.failures = max(replica.failures + 1, self._threshold if at_once else 0)
        if replica.failures >= self._threshold:
            if self.router is not None:
                self.router.forget(replica.index)  # a restart empties its cache
            if self._clock() >= replica.open_until:  # (re)opening: back off further
                replica.cooldown_s = min(
                    self._max_cooldown_s, max(self._base_cooldown_s, replica.cooldown_s * 2)
                )
            replica.open_until = self._clock() + replica.cooldown_s

    def retry_after_s(self) -> int:
        """Seconds until some replica may be tried again (for 503s when all are down)."""
        now = self._clock()
        wait = min((r.open_until - now for r in self.replicas), default=1.0)
        return max(1, math.ceil(wait))
