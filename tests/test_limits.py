"""Out of file descriptors, the broker backs off instead of spinning, and recovers."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.kubelet import Pod
from e2e.node import Node


@pytest.fixture
def open_node(tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path) -> Iterator[Node]:
    binds = {"/run/examples": fuse_examples_on_host}
    with Node(tmp_path, zipapp, shared_binds=binds, driver_args=["--peer-check", "off"]) as node:
        yield node


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def out_of_fds(pid: int, limit: int) -> bool:
    """Every fd number below the soft limit is taken: the next accept() gets EMFILE."""
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return taken >= set(range(limit))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_emfile_makes_the_broker_back_off_and_it_recovers(
    open_node: Node, fuse_examples: Path
) -> None:
    volume = open_node.publish_fuse_volume(Pod("app"))
    assert open_node.driver.process is not None
    pid = open_node.driver.process.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    directory = os.open(volume.socket_binds["/run/csi-async"], os.O_PATH | os.O_CLOEXEC)
    clients: list[socket.socket] = []
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = in_use + 4
    # Only the soft limit: raising a hard limit again needs CAP_SYS_RESOURCE.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for _ in range(12):  # more pending connections than the driver has fds for
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(f"/proc/self/fd/{directory}/fuse.sock")
            clients.append(sock)
        # The silent connections it accepted hold their fds until the read
        # deadline, while the rest wait in the backlog: measure in there.
        wait_until(lambda: out_of_fds(pid, limit), "the driver ran out of fds")
        before = cpu_seconds(pid)
        time.sleep(2)
        # A loop that retried accept() at once would burn a whole core here.
        assert cpu_seconds(pid) - before < 0.5
    finally:
        for sock in clients:
            sock.close()
        os.close(directory)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    sandbox = open_node.sandbox(volume.binds("/run/data"))
    program = sandbox.spawn([str(fuse_examples / "hello"), "-f", "/run/data"],
                            stderr=subprocess.PIPE)  # fmt: skip
    open_node.wait_mounted_by(program, volume.target)
