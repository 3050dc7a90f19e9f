from __future__ import annotations

from pathlib import Path

import pytest

from mimoserve.registry import ModelRegistry, RegistryError
from mimoserve.weights.catalog import DEFAULT_WEIGHTS


def test_default_registry_maps_mimo_ids_to_the_embedded_default() -> None:
    registry = ModelRegistry.load(None)
    ids = {e.id for e in registry.entries()}
    text = {"mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni", "mimo-v2.5-pro", "mimo-v2.5"}
    speech = {"mimo-v2.5-tts", "mimo-v2.5-tts-voicedesign", "mimo-v2.5-tts-voiceclone",
              "mimo-v2.5-asr"}  # fmt: skip
    assert ids == text | speech
    assert {e.weights for e in registry.entries() if e.id in text} == {DEFAULT_WEIGHTS}
    assert {e.backend for e in registry.entries() if e.id in speech} == {"tts", "asr"}
    omni = registry.get("mimo-v2.5")
    assert omni is not None and omni.input_modalities == {"text", "audio"}
    assert omni.speech_recognizer == "whisper-tiny-en"


def test_audio_on_the_embedded_engine_needs_a_recognizer() -> None:
    text = '[models.x]\nweights = "w"\ninput_modalities = ["text", "audio"]\n'
    with pytest.raises(RegistryError, match="speech_recognizer"):
        ModelRegistry.from_toml(text)
    ModelRegistry.from_toml(text + 'speech_recognizer = "whisper-tiny-en"\n')
    with pytest.raises(RegistryError, match="needs `weights`"):
        ModelRegistry.from_toml('[models.t]\nbackend = "tts"\n')


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


def test_the_fleet_example_registry_loads() -> None:
    from pathlib import Path

    from mimoserve.registry import ModelRegistry

    fleet = ModelRegistry.load(Path(__file__).parent.parent / "deploy" / "fleet.toml")
    entries = {e.id: e for e in fleet.entries()}
    assert set(entries) == {"mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni", "mimo-v2.5",
                            "mimo-v2.5-asr"}  # fmt: skip
    assert all(e.backend == "upstream" for e in entries.values())
    assert [u.kind for u in entries["mimo-v2-flash"].upstreams] == ["vllm", "vllm", "sglang"]
    assert "video" in entries["mimo-v2-omni"].input_modalities


def test_registry_refuses_half_configured_entries() -> None:
    import pytest

    from mimoserve.registry import ModelRegistry, RegistryError

    with pytest.raises(RegistryError, match="needs `upstreams`"):
        ModelRegistry.from_toml('[models.x]\nbackend = "upstream"\n')
    with pytest.raises(RegistryError, match="needs `weights`"):
        ModelRegistry.from_toml("[models.x]\n")
    with pytest.raises(RegistryError, match="takes text, and audio only"):
        ModelRegistry.from_toml('[models.x]\nweights = "w"\ninput_modalities = ["image"]\n')


def test_no_speech_leaves_out_the_speech_models() -> None:
    from mimoserve.config import Settings
    from mimoserve.server import load_registry

    registry = load_registry(Settings(speech=False))
    ids = {e.id for e in registry.entries()}
    assert ids == {"mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni", "mimo-v2.5-pro", "mimo-v2.5"}
    omni = registry.get("mimo-v2.5")
    assert omni is not None and omni.input_modalities == {"text"} and not omni.speech_recognizer
    assert len(load_registry(Settings()).entries()) == 9
