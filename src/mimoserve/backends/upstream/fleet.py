"""Every upstream-served model of the registry, sharing one connection pool."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from mimoserve.backends.upstream.backend import UpstreamBackend
from mimoserve.backends.upstream.client import UpstreamModel, new_session
from mimoserve.backends.upstream.media import MediaLimits
from mimoserve.events import ReplicaRoutingCounts


class UpstreamFleet:
    def __init__(self, models: Mapping[str, UpstreamModel], media: MediaLimits) -> None:
        self.backends = {
            model_id: UpstreamBackend(model, media) for model_id, model in models.items()
        }
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Inside the running loop: one keep-alive pool for all, and health checks."""
        if not self.backends:
            return
        self._session = new_session()
        for backend in self.backends.values():
            backend.start(self._session)

    def routing(self) -> dict[str, list[ReplicaRoutingCounts]]:
        """What cache-aware routing counted, per model and replica (for /metrics)."""
        found: dict[str, list[ReplicaRoutingCounts]] = {}
        for model_id, backend in self.backends.items():
            pool, counts = backend.model.pool, []
            if pool.router is None:
                continue
            for replica in pool.replicas:
                s = pool.router.stats(replica.index)
                counts.append(ReplicaRoutingCounts(
                    replica.name, s.routed, s.predicted_hits, s.prompt_tokens, s.cached_tokens,
                    s.reliability,
                ))  # fmt: skip
            found[model_id] = counts
        return found

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()
        if self._session is not None:
            await self._session.close()
