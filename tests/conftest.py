from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.driver import DriverProcess
from e2e.node import Node

REPO = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="session")
def zipapp() -> Iterator[Path]:
    """The fusermount3 zipapp, built fresh, somewhere uid 65534 can execute it."""
    directory = Path(tempfile.mkdtemp(prefix="csi-async-zipapp-"))
    directory.chmod(0o755)
    output = directory / "fusermount3"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_zipapp.py"), "-o", str(output)],
        check=True, capture_output=True,
    )  # fmt: skip
    yield output
    output.unlink()
    directory.rmdir()


@pytest.fixture(scope="session")
def fuse_examples() -> Path:
    """libfuse3's example filesystems (hello, passthrough), compiled from Debian's sources."""
    out = REPO / "build" / "fuse-examples"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build_fuse_examples.sh"), str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


@pytest.fixture
def node(tmp_path: Path, zipapp: Path) -> Iterator[Node]:
    """A simulated node: shared kubelet root, the real driver, a kubelet emulator."""
    with Node(tmp_path, zipapp) as simulated:
        yield simulated
