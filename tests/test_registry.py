from __future__ import annotations

from pathlib import Path

import pytest

from mimoserve.registry import ModelRegistry, RegistryError
from mimoserve.weights.catalog import DEFAULT_WEIGHTS


def test_default_registry_maps_mimo_ids_to_the_embedded_default() -> None:
    registry = ModelRegistry.load(None)
    ids = {e.id for e in registry.entries()}
    assert ids == {"mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni"}
    assert {e.weights for e in registry.entries()} == {DEFAULT_WEIGHTS}


def test_registry_file_and_weights_override(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[models.alpha]\nweights = "/models/a.gguf"\ncontext_length = 2048\n')
    registry = ModelRegistry.load(path)
    alpha = registry.get("alpha")
    assert alpha is not None and alpha.context_length == 2048
    other = registry.with_weights("smollm2-135m-instruct").get("alpha")
    assert other is not None and other.weights == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "text",
    [
        "[models.x]\n",
        "[models.x]\nweights = 3\n",
        "[models.x]\nweights='w'\nbogus=1\n",
        "not toml [",
        "",
    ],
)
def test_bad_registry_is_a_clear_error(text: str) -> None:
    with pytest.raises(RegistryError):
        ModelRegistry.from_toml(text)
