"""The driver is killed and restarted: mounts keep serving, sockets come back."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

from csi_async.mount.mountinfo import mounts_at
from e2e.kubelet import Pod
from e2e.node import FuseVolume, Node
from e2e.sandbox import Container

HELLO_TEXT = "Hello World!\n"
DATA = "/run/data"
LIVE = 50
PENDING = 10


def start_hello(node: Node, volume: FuseVolume, fuse_examples: Path) -> Container:
    sandbox = node.sandbox(volume.binds(DATA))
    return sandbox.spawn(
        [str(fuse_examples / "hello"), "-f", DATA],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_after_sigkill_and_restart_mounts_serve_and_pending_volumes_mount(
    node: Node, fuse_examples: Path
) -> None:
    live = [node.publish_fuse_volume(Pod(f"live-{i}")) for i in range(LIVE)]
    pending = [node.publish_fuse_volume(Pod(f"pending-{i}")) for i in range(PENDING)]
    programs = [start_hello(node, volume, fuse_examples) for volume in live]
    for volume in live:
        node.wait_mounted(volume.target, timeout=60)
        # Served, not only mounted: the mount shows in mountinfo before the
        # broker has handed hello the fd, and a driver killed in between
        # takes the only copy of it along.
        assert _read_when_served(volume.target / "hello") == HELLO_TEXT

    node.driver.stop(signal.SIGKILL)
    node.driver.start()
    restored = [e for e in node.driver.log_entries() if e.get("msg") == "serving"][-1]
    assert restored["restored_volumes"] == 2 * (LIVE + PENDING)  # each with its socket volume

    # Established mounts never noticed: their daemons hold the FUSE fds.
    for volume in live:
        assert (volume.target / "hello").read_text() == HELLO_TEXT
    # Volumes whose program had not started yet get a listening socket again,
    # in the same directory the pod already has bound.
    late = [start_hello(node, volume, fuse_examples) for volume in pending]
    for volume in pending:
        node.wait_mounted(volume.target, timeout=60)
        assert (volume.target / "hello").read_text() == HELLO_TEXT
    assert all(program.poll() is None for program in [*programs, *late])

    for volume in [*live, *pending]:
        for name in [volume.name, *volume.companion_volumes]:
            node.unpublish(volume.pod, name)
        assert not mounts_at(os.fspath(volume.target))
        assert not volume.target.exists()
    assert not list((node.driver.state_dir / "volumes").iterdir())


def test_a_dead_adopted_mount_is_replaced_by_the_next_mount(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    first = start_hello(node, volume, fuse_examples)
    node.wait_mounted(volume.target)
    node.driver.stop(signal.SIGKILL)
    first.kill()  # nobody watches it now: the mount stays, dead
    first.wait(15)
    node.driver.start()
    # The restarted driver adopted the dead mount; the next MOUNT replaces it.
    restarter = node.sandbox(dict(volume.socket_binds))
    restarter.spawn(
        [str(fuse_examples / "hello"), "-f", "/tmp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    node.wait_mounted(volume.target)
    assert _read_when_served(volume.target / "hello") == HELLO_TEXT


def _read_when_served(path: Path, timeout: float = 15.0) -> str:
    """Read once the new mount serves. Until then the dead mount answers
    ENOTCONN, and between its detach (by the adopting driver or by the next
    MOUNT, whichever comes first) and the new mount the bare directory
    answers ENOENT."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return path.read_text()
        except OSError as err:
            transient = (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT)
            if err.errno not in transient or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
