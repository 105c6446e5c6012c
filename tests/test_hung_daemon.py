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
from dataclasses import dataclass, field
from pathlib import Path

from csi_async.mount.mountinfo import mounts_at, mounts_at_or_below
from e2e.kubelet import Pod
from e2e.node import Node
from e2e.sandbox import Container

DATA = "/run/data"
HELLO_TEXT = "Hello World!\n"
# What a reader of an aborted FUSE connection gets.
ABORTED = (errno.ECONNABORTED, errno.ENOTCONN)
ABORTED_TEXT = ("Software caused connection abort", "Transport endpoint is not connected")


@dataclass
class BlockedRead:
    """os.listdir of a path in a thread; what it ended with, and when."""

    path: Path
    error: OSError | None = None
    result: list[str] | None = None
    ended: float | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="blocked-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = os.listdir(self.path)
        except OSError as err:
            self.error = err
        self.ended = time.monotonic()


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


def _timed(action: object) -> float:
    started = time.monotonic()
    assert callable(action)
    action()
    return time.monotonic() - started


def test_a_hung_daemon_blocks_readers_until_unpublish_aborts_it(
    node: Node, fuse_examples: Path
) -> None:
    pod = Pod("hung")
    volume = node.publish_fuse_volume(pod)
    # A consumer container binds the volume before anything is mounted (a
    # bind of a hung FUSE mount would itself hang) and reads as soon as the
    # mount propagates in: HostToContainer, as a consumer pod would.
    consumer = node.sandbox({DATA: volume.target}, uid=1000, gid=1000)
    wait_then_read = (
        f"until grep -q ' {DATA} .* - fuse' /proc/self/mountinfo; do sleep 0.05; done; "
        f"exec cat {DATA}/hello"
    )
    container_reader = consumer.spawn(
        ["sh", "-c", wait_then_read], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # The daemon that never answers: sleep holds the /dev/fuse fd.
    hung = node.sandbox(dict(volume.socket_binds)).spawn(
        ["fusermount3", "--start", "--", "sleep", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    node.wait_mounted(volume.target)
    assert hung.poll() is None

    # A reader on the node (kubelet, a monitoring agent...) blocks too.
    host_reader = BlockedRead(volume.target)
    deadline = time.monotonic() + 10
    while "cat" not in [_comm(p) for p in container_reader.processes()]:
        assert container_reader.poll() is None, container_reader.stderr.read()
        assert time.monotonic() < deadline, "the consumer never saw the mount"
        time.sleep(0.05)
    time.sleep(1.0)
    assert host_reader.thread.is_alive(), (host_reader.result, host_reader.error)
    assert container_reader.poll() is None
    cat = next(p for p in container_reader.processes() if _comm(p) == "cat")
    blocked_state = _state(cat)

    # The driver stays responsive: Probe, and the publish of another volume.
    assert _timed(lambda: node.kubelet.probe(timeout=1.0)) < 1.0
    other_pod = Pod("other")
    assert _timed(lambda: node.publish(other_pod, "data")) < 1.0
    assert _timed(lambda: node.publish(other_pod, "data-broker", {"socketFor": "data"},
                                       readonly=True)) < 1.0  # fmt: skip

    # A second MOUNT on the hung volume probes the daemon's liveness; the
    # probe hangs too and is given up on (the daemon counts as alive: EBUSY)
    # while the event loop keeps serving.
    retry = node.sandbox(dict(volume.socket_binds)).spawn(
        ["fusermount3", "--start", "--", "true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for_thread(node, "fuse-liveness-p")  # the probe is waiting on the daemon now
    assert _timed(lambda: node.kubelet.probe(timeout=1.0)) < 1.0
    assert retry.wait(15) == 1
    assert "already mounted" in retry.stderr.read().decode()

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

    # NodeUnpublishVolume returns promptly and aborts the connection.
    unpublished = time.monotonic()
    node.unpublish(pod, "data")
    assert time.monotonic() - unpublished < 2.0
    host_reader.thread.join(5.0)
    assert not host_reader.thread.is_alive(), "the host reader is still blocked"
    assert host_reader.error is not None, host_reader.result
    assert host_reader.error.errno in ABORTED, host_reader.error
    assert host_reader.ended is not None and host_reader.ended - unpublished < 5.0
    reader_status = _wait(container_reader, 5.0)
    assert reader_status not in (None, 0), f"cat is still blocked ({blocked_state})"
    message = container_reader.stderr.read().decode()
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
    assert _timed(lambda: node.kubelet.probe(timeout=1.0)) < 1.0
    assert (other_target / "hello").read_text() == HELLO_TEXT


def _wait_for_thread(node: Node, comm: str, timeout: float = 10.0) -> None:
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


def _wait(container: Container, timeout: float) -> int | None:
    try:
        return container.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
