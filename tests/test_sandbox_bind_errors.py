"""What PodSandbox says when root cannot look at a bind source: the real errno and path.

A FUSE mount made without allow_other denies root (EACCES); one whose
daemon was killed answers ENOTCONN. Neither "does not exist": the sandbox
reports what containerd would, the stat's own error with the path, and
keeps "does not exist" for a source that really is missing (ENOENT).
Real kernel FUSE mounts: the libfuse hello example.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi_async.mount.mountinfo import mounts_at
from e2e.hostenv import lazy_umount
from e2e.kubelet import Pod
from e2e.node import Node
from e2e.sandbox import ContainerCreateError, PodSandbox
from tests.conftest import EXAMPLES_IN_CONTAINERS

DATA = "/run/data"


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a state"
        time.sleep(0.02)


@pytest.fixture
def dead_mount(tmp_path: Path, fuse_examples_on_host: Path) -> Iterator[Path]:
    """A FUSE mount whose daemon was SIGKILLed: every lookup answers ENOTCONN."""
    mnt = tmp_path / "dead"
    mnt.mkdir()
    # As root, libfuse mounts by itself: no helper stays to clean up.
    daemon = subprocess.Popen([str(fuse_examples_on_host / "hello"), "-f", str(mnt)])
    try:
        wait_for(lambda: any(m.is_fuse for m in mounts_at(os.fspath(mnt))))
    finally:
        daemon.kill()
        daemon.wait(15)
    try:
        yield mnt
    finally:
        lazy_umount(mnt)


def test_a_dead_fuse_mount_as_bind_source_is_reported_as_enotconn(
    dead_mount: Path, zipapp: Path
) -> None:
    with pytest.raises(OSError) as lstat:
        os.lstat(dead_mount)
    assert lstat.value.errno == errno.ENOTCONN
    with (
        PodSandbox({DATA: dead_mount}, zipapp) as sandbox,
        pytest.raises(ContainerCreateError) as info,
    ):
        sandbox.run(["true"], timeout=15)
    assert (info.value.errno, info.value.path) == (errno.ENOTCONN, str(dead_mount))
    assert f"stat {dead_mount}: transport endpoint is not connected" in info.value.message
    assert "does not exist" not in info.value.message


def test_a_fuse_mount_root_may_not_enter_is_reported_as_eacces(
    tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path
) -> None:
    binds = {str(EXAMPLES_IN_CONTAINERS): fuse_examples_on_host}
    # Without allow_other only the daemon's uid may enter the mount, root included.
    with Node(tmp_path, zipapp, driver_args=["--no-allow-other"], shared_binds=binds) as node:
        volume = node.publish_fuse_volume(Pod("app"))
        program = node.sandbox(volume.binds(DATA)).spawn(
            [str(EXAMPLES_IN_CONTAINERS / "hello"), "-f", DATA]
        )
        node.wait_mounted_by(program, volume.target)
        with pytest.raises(PermissionError):
            os.lstat(volume.target)
        reader = node.sandbox({DATA: volume.target}, uid=1000, gid=1000)
        with pytest.raises(ContainerCreateError) as info:
            reader.run(["true"], timeout=15)
        assert (info.value.errno, info.value.path) == (errno.EACCES, str(volume.target))
        assert f"stat {volume.target}: permission denied" in info.value.message
        assert "does not exist" not in info.value.message


def test_a_missing_bind_source_is_reported_as_missing(tmp_path: Path, zipapp: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        PodSandbox({DATA: missing}, zipapp)
    assert str(info.value) == f"bind source {missing} does not exist (ENOENT)"
