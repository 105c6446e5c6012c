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


# Where the example binaries appear inside every sandboxed container.
EXAMPLES_IN_CONTAINERS = Path("/run/examples")


@pytest.fixture(scope="session")
def fuse_examples_on_host() -> Path:
    """libfuse3's example filesystems (hello, passthrough), compiled from Debian's sources."""
    out = REPO / "build" / "fuse-examples"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build_fuse_examples.sh"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def fuse_examples(fuse_examples_on_host: Path) -> Path:
    """The examples' directory as the node's containers see it."""
    return EXAMPLES_IN_CONTAINERS


@pytest.fixture
def node(tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path) -> Iterator[Node]:
    """A simulated node: shared kubelet root, the real driver, a kubelet emulator.

    Every container gets the example binaries bound at /run/examples: the
    checkout may live somewhere a sandbox cannot see (e.g. below /tmp).
    """
    binds = {str(EXAMPLES_IN_CONTAINERS): fuse_examples_on_host}
    with Node(tmp_path, zipapp, shared_binds=binds) as simulated:
        yield simulated
