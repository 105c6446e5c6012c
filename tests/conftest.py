from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.driver import DriverProcess


@pytest.fixture
def kubelet_root(tmp_path: Path) -> Path:
    root = tmp_path / "kubelet"
    root.mkdir()
    return root


@pytest.fixture
def driver(tmp_path: Path, kubelet_root: Path) -> Iterator[DriverProcess]:
    """The real driver over a Unix socket; no mounts needed for these tests."""
    process = DriverProcess(tmp_path, kubelet_root).start()
    try:
        yield process
    finally:
        process.stop()
