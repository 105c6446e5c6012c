"""A FUSE daemon that never answers must not hang the driver or the node.

The "daemon" is `fusermount3 --start -- sleep 600`: the starter gets the
mounted /dev/fuse fd from the broker and hands it to `sleep`, which holds it
and never reads it, so the kernel's INIT and every request after it wait
forever. Readers of the mount block. The driver must stay responsive
throughout, and NodeUnpublishVolume must return promptly and abort the FUSE
connection, so that the blocked readers fail (ECONNABORTED/ENOTCONN) instead
of hanging until the node reboots.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import mounts_at
from e2e.kubelet import Pod
from e2e.mounts import mounts_at_or_below
from e2e.node import Node
from e2e.sandbox import Container

DATA = "/run/data"
HELLO_TEXT = "Hello World!\n"
# What a reader of an aborted FUSE connection gets.
ABORTED = (errno.ECONNABORTED, errno.ENOTCONN)
ABORTED_TEXT = ("Software caused connection abort", "Transport endpoint is not connected")
# A driver that waited on the hung daemon would not answer for as long as the
# daemon hangs, which here is forever; a loaded 2-core machine answers a CSI
# call in well under a second. "Promptly" is a bound far from both.
PROMPT = 10.0


class FuseConnections:
    """The kernel's per-connection FUSE counters (fusectl), read from a private
    detached instance: no mount table changes, whether or not the host mounted
    fusectl at /sys/fs/fuse/connections."""

    def __init__(self) -> None:
        fs_fd = sc.fsopen("fusectl")
        try:
            sc.fsconfig_create(fs_fd)
            self._fd = sc.fsmount(fs_fd, 0)
        finally:
            os.close(fs_fd)

    def waiting(self, minor: int) -> int:
        """Requests sent to the connection's daemon and not answered yet."""
        fd = os.open(f"{minor}/waiting", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
        try:
            return int(os.read(fd, 64))
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def fuse_connections() -> Iterator[FuseConnections]:
    connections = FuseConnections()
    try:
        yield connections
    finally:
        connections.close()


@dataclass
class BlockedRead:
    """os.listdir of a path in a thread, and what it ended with."""

    path: Path
    error: OSError | None = None
    result: list[str] | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="blocked-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = os.listdir(self.path)
        except OSError as err:
            self.error = err


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    """The process state letter and its kernel wait channel."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "gone"
    return f"{stat.rpartition(')')[2].split()[0]} {wchan}"


def _timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = PROMPT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_a_hung_daemon_blocks_readers_until_unpublish_aborts_it(
    node: Node, fuse_examples: Path, fuse_connections: FuseConnections
) -> None:
    pod = Pod("hung")
    volume = node.publish_fuse_volume(pod)
    # A consumer container binds the volume before anything is mounted (a
    # bind of a hung FUSE mount would itself hang) and reads once the mount
    # has propagated in (HostToContainer, as a consumer pod would) and the
    # test says go, so that the test can tell its request from the host's.
    consumer = node.sandbox({DATA: volume.target}, uid=1000, gid=1000)
    wait_then_read = (
        f"until grep -q ' {DATA} .* - fuse' /proc/self/mountinfo; do sleep 0.05; done; "
        f"read -r go; exec cat {DATA}/hello"
    )
    container_reader = consumer.spawn(
        ["sh", "-c", wait_then_read],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # The daemon that never answers: sleep holds the /dev/fuse fd.
    hung = node.sandbox(dict(volume.socket_binds)).spawn(
        ["fusermount3", "--start", "--", "sleep", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    minor = node.wait_mounted(volume.target).minor
    assert hung.poll() is None
    # Nothing has asked the daemon anything yet but the kernel's INIT.
    unanswered = fuse_connections.waiting(minor)

    def blocked_readers() -> int:
        return fuse_connections.waiting(minor) - unanswered

    # A reader on the node (kubelet, a monitoring agent...) blocks: its
    # request waits on the daemon.
    host_reader = BlockedRead(volume.target)
    _wait_until(lambda: blocked_readers() >= 1, "the host reader's request reached the daemon")
    # So does the consumer's, once it has seen the mount.
    assert container_reader.stdin is not None
    container_reader.stdin.write(b"go\n")
    container_reader.stdin.close()

    def consumer_blocked_or_ended() -> bool:
        if container_reader.poll() is not None:
            return True  # it failed: shown below, with its stderr
        cat_started = "cat" in [_comm(p) for p in container_reader.processes()]
        return cat_started and blocked_readers() >= 2

    _wait_until(consumer_blocked_or_ended, "the consumer's read reached the daemon")
    assert container_reader.poll() is None, _stderr(container_reader)
    assert host_reader.thread.is_alive(), (host_reader.result, host_reader.error)
    cat = next(p for p in container_reader.processes() if _comm(p) == "cat")
    blocked_state = _state(cat)

    # The driver stays responsive: Probe, and the publish of another volume.
    assert _timed(lambda: node.kubelet.probe(timeout=PROMPT)) < PROMPT
    other_pod = Pod("other")
    assert _timed(lambda: node.publish(other_pod, "data")) < PROMPT
    assert _timed(lambda: node.publish(other_pod, "data-broker", {"socketFor": "data"},
                                       readonly=True)) < PROMPT  # fmt: skip

    # A second MOUNT on the hung volume probes the daemon's liveness; the
    # probe hangs too and is given up on (the daemon counts as alive: EBUSY)
    # while the event loop keeps serving.
    retry = node.sandbox(dict(volume.socket_binds)).spawn(
        ["fusermount3", "--start", "--", "true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for_thread(node, "fuse-liveness-p")  # the probe is waiting on the daemon now
    assert _timed(lambda: node.kubelet.probe(timeout=PROMPT)) < PROMPT
    assert retry.wait(PROMPT + 15) == 1
    assert "already mounted" in _stderr(retry)

    # The other pod's FUSE program mounts and serves as usual meanwhile.
    other_dir = node.kubelet.target_path(other_pod, "data-broker")
    other_target = node.kubelet.target_path(other_pod, "data")
    hello = node.sandbox({DATA: other_target, "/run/csi-async": other_dir}).spawn(
        [str(fuse_examples / "hello"), "-f", DATA],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    node.wait_mounted(other_target)
    assert (other_target / "hello").read_text() == HELLO_TEXT
    assert hello.poll() is None

    # Still blocked: nothing so far has touched the hung connection.
    assert host_reader.thread.is_alive()
    assert container_reader.poll() is None

    # NodeUnpublishVolume returns promptly and aborts the connection: the
    # blocked readers fail now, where they would otherwise wait forever.
    assert _timed(lambda: node.unpublish(pod, "data")) < PROMPT
    host_reader.thread.join(PROMPT)
    assert not host_reader.thread.is_alive(), "the host reader is still blocked"
    assert host_reader.error is not None, host_reader.result
    assert host_reader.error.errno in ABORTED, host_reader.error
    reader_status = _wait(container_reader, PROMPT)
    assert reader_status not in (None, 0), f"cat is still blocked ({blocked_state})"
    message = _stderr(container_reader)
    assert any(text in message for text in ABORTED_TEXT), message

    # Nothing is left: no mount on the target or anywhere below the pod.
    node.unpublish(pod, "data-broker")
    assert not mounts_at(os.fspath(volume.target))
    assert not volume.target.exists()
    pod_dir = node.kubelet.pod_dir(pod)
    assert not [m for m in mounts_at_or_below(os.fspath(pod_dir)) if m.is_fuse]
    # The hung daemon itself is untouched (it is the kubelet's to kill).
    assert hung.poll() is None
    # The driver is still fine and the other volume still serves.
    assert _timed(lambda: node.kubelet.probe(timeout=PROMPT)) < PROMPT
    assert (other_target / "hello").read_text() == HELLO_TEXT


def _wait_for_thread(node: Node, comm: str, timeout: float = PROMPT) -> None:
    assert node.driver.process is not None
    tasks = Path(f"/proc/{node.driver.process.pid}/task")
    deadline = time.monotonic() + timeout
    while True:
        names = []
        for task in tasks.iterdir():
            try:
                names.append((task / "comm").read_text().strip())
            except OSError:
                continue  # the thread ended meanwhile
        if comm in names:
            return
        assert time.monotonic() < deadline, f"no {comm} thread in the driver: {names}"
        time.sleep(0.02)


def _stderr(container: Container) -> str:
    """What the container wrote to its stderr (a pipe), once it has exited."""
    assert container.stderr is not None
    return bytes(container.stderr.read()).decode(errors="replace")


def _wait(container: Container, timeout: float) -> int | None:
    try:
        return container.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
