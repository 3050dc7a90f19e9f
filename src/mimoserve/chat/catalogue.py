"""What this server serves: its model ids, the engines behind them, their state.

`GET /v1/models` reads the cards, `/ready` the engines that are down, `/metrics` each
engine's load and KV pool (once per engine, however many ids name it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mimoserve.backends.base import Backend, engine_of
from mimoserve.errors import ModelNotFoundError
from mimoserve.events import KvCells
from mimoserve.protocol.chat import ModelCard, ModelList
from mimoserve.registry import ModelRegistry


class ModelCatalogue:
    def __init__(self, registry: ModelRegistry, backends: Mapping[str, Backend[Any]]) -> None:
        self._registry = registry
        self._backends = backends
        self._created = int(time.time())

    def engines_down(self) -> list[str]:
        return sorted(model for model, backend in self._backends.items() if not backend.healthy)

    def engines(self) -> dict[str, Backend[Any]]:
        """Each backend once, under the first model id that names it: ids naming the same
        weights share one engine, and one series per id would count its load and its
        pool once per id (a sum over `model` in Prometheus would be wrong)."""
        seen: dict[int, str] = {}
        for model, backend in self._backends.items():
            seen.setdefault(id(engine_of(backend)), model)
        return {model: engine_of(self._backends[model]) for model in seen.values()}

    def engine_load(self) -> dict[str, tuple[int, int]]:
        return {model: backend.load() for model, backend in self.engines().items()}

    def engine_memory(self) -> dict[str, KvCells]:
        found = {model: backend.kv_cells() for model, backend in self.engines().items()}
        return {model: cells for model, cells in found.items() if cells is not None}

    def list_models(self) -> ModelList:
        cards = [self.get_model(entry.id) for entry in self._registry.entries()]
        return ModelList(data=cards, first_id=cards[0].id if cards else None,
                         last_id=cards[-1].id if cards else None)  # fmt: skip

    def get_model(self, model_id: str) -> ModelCard:
        backend = self.backend_for(model_id)
        return ModelCard(
            id=model_id,
            created=self._created,
            root=backend.weights_name,
            context_length=backend.capabilities.context_length or None,
            display_name=model_id,
            created_at=datetime.fromtimestamp(self._created, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        )

    def backend_for(self, model_id: str) -> Backend[Any]:
        backend = self._backends.get(model_id)
        if backend is None:
            raise ModelNotFoundError(
                f"The model {model_id!r} does not exist; GET /v1/models lists the served models.",
                param="model",
            )
        return backend
