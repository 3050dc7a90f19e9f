from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import RunningServer, pull_test_weights, running_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def weights_path() -> Path:
    return pull_test_weights()


@pytest.fixture(scope="module")
def server(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("home"), "--n-ctx", "4096") as running:
        yield running
