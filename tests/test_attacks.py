"""The threat model's attacks, each against the real driver and kernel.

Every test ends by checking that nothing refused got mounted anywhere and
that the driver holds no more file descriptors than before the attack.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from csi_async.mount.mountinfo import mounts_at
from e2e.kubelet import CsiError, Pod
from e2e.mounts import mounts_at_or_below
from e2e.node import FuseVolume, Node
from fusermount3_proxy import protocol

DATA = "/run/data"


@pytest.fixture
def open_node(tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path) -> Iterator[Node]:
    """A node whose broker skips the pod check, so raw clients on the host get
    past it and the checks behind it are what is tested."""
    binds = {"/run/examples": fuse_examples_on_host}
    with Node(tmp_path, zipapp, shared_binds=binds, driver_args=["--peer-check", "off"]) as node:
        yield node


def driver_fds(node: Node) -> int:
    assert node.driver.process is not None
    return len(os.listdir(f"/proc/{node.driver.process.pid}/fd"))


def fuse_mounts(node: Node) -> set[int]:
    """FUSE mounts on this node's kubelet root (other tests may mount elsewhere)."""
    return {m.mount_id for m in mounts_at_or_below(node.root.path) if m.is_fuse}


def socket_of(volume: FuseVolume) -> str:
    return str(volume.socket_binds["/run/csi-async"] / "fuse.sock")


def exchange_raw(path: str, payload: bytes, fds: list[int] | None = None) -> dict[str, object]:
    """Send raw bytes (and fds) and return the broker's decoded answer."""
    directory = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        try:  # through the directory's fd: the full path is over 107 bytes
            sock.connect(f"/proc/self/fd/{directory}/{os.path.basename(path)}")
        finally:
            os.close(directory)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sock.sendmsg([payload], ancillary)
        except BrokenPipeError:
            pass
        header = sock.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
        length = protocol.decode_header(header, protocol.KIND_RESPONSE)
        return dict(json.loads(sock.recv(length, socket.MSG_WAITALL)))


def mount_request(options: list[str]) -> bytes:
    body = {"op": "mount", "options": options, "mountpoint": DATA, "auto_unmount": False}
    return protocol.encode_frame(protocol.KIND_REQUEST, body)


def unmount_request() -> bytes:
    body = {"op": "unmount", "mountpoint": DATA, "lazy": True, "mount_id": None}
    return protocol.encode_frame(protocol.KIND_REQUEST, body)


def fds_until_all_closed(node: Node, clients: list[socket.socket], timeout: float) -> int:
    """Read each client until the broker has closed it (answered, refused or
    given up on); the most fds the driver held meanwhile."""
    poller = select.poll()
    open_clients = {sock.fileno(): sock for sock in clients}
    for fd in open_clients:
        poller.register(fd, select.POLLIN)  # (hang-ups are always reported)
    most = driver_fds(node)
    deadline = time.monotonic() + timeout
    while open_clients:
        left = len(open_clients)
        assert time.monotonic() < deadline, f"the broker still holds {left} silent connections"
        for fd, _ in poller.poll(50):
            try:
                if open_clients[fd].recv(4096):
                    continue  # an answer; the close follows
            except BlockingIOError:
                continue
            except OSError:
                pass  # reset, or never connected (the backlog was full)
            poller.unregister(fd)
            del open_clients[fd]
        most = max(most, driver_fds(node))
    return most


def wait_for_fd_count(node: Node, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := driver_fds(node)) > expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


# ---------------------------------------------------------------- the wire


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
        (struct.pack("!4sBBHI", b"CSAF", 9, 1, 0, 2) + b"{}", "version"),
        (struct.pack("!4sBBHI", b"CSAF", 1, 1, 0, 1 << 20), "exceeds"),
        (struct.pack("!4sBBHI", b"CSAF", 1, 1, 0, 5) + b"nope!", "not UTF-8 JSON"),
        (protocol.encode_frame(1, {"op": "mount"}), "invalid request"),
        (protocol.encode_frame(1, {"op": "mount", "options": [], "mountpoint": "/x",
                                   "auto_unmount": False, "fd": 3}), "Extra inputs"),
        (protocol.encode_frame(1, {"op": "mount", "options": ["x" * 2000], "mountpoint": "/x",
                                   "auto_unmount": False}), "longer than"),
    ],
)  # fmt: skip
def test_malformed_and_oversized_frames_are_refused_and_leak_nothing(
    open_node: Node, payload: bytes, message: str
) -> None:
    volume = open_node.publish_fuse_volume(Pod("app"))
    before_fds, before_mounts = driver_fds(open_node), fuse_mounts(open_node)
    answer = exchange_raw(socket_of(volume), payload)
    assert answer["ok"] is False
    assert answer["errno"] == 71  # EPROTO
    assert message in str(answer["message"])
    assert fuse_mounts(open_node) == before_mounts
    assert wait_for_fd_count(open_node, before_fds) <= before_fds


def test_file_descriptors_sent_with_a_request_never_reach_the_driver(
    open_node: Node, tmp_path: Path
) -> None:
    """The broker's sockets have SO_PASSRIGHTS off: the kernel refuses the send.

    (Kernels without SO_PASSRIGHTS are covered by the framing test in
    tests/test_broker_session.py: no control buffer, MSG_CTRUNC refused.)
    """
    volume = open_node.publish_fuse_volume(Pod("app"))
    before_fds, before_mounts = driver_fds(open_node), fuse_mounts(open_node)
    smuggled = [os.open(tmp_path, os.O_RDONLY) for _ in range(4)]
    try:
        with pytest.raises(PermissionError):
            exchange_raw(socket_of(volume), mount_request([]), smuggled)
    finally:
        for fd in smuggled:
            os.close(fd)
    assert fuse_mounts(open_node) == before_mounts
    assert wait_for_fd_count(open_node, before_fds) <= before_fds
    # The same socket still serves a request without fds.
    answer = exchange_raw(socket_of(volume), unmount_request())
    assert answer["errno"] == 22  # EINVAL: nothing mounted


def test_a_connection_flood_is_bounded_and_the_volume_still_mounts_afterwards(
    open_node: Node, fuse_examples: Path
) -> None:
    volume = open_node.publish_fuse_volume(Pod("app"))
    before_fds = driver_fds(open_node)
    idle: list[socket.socket] = []
    directory = os.open(os.path.dirname(socket_of(volume)), os.O_PATH | os.O_CLOEXEC)
    short_path = f"/proc/self/fd/{directory}/fuse.sock"
    try:
        for _ in range(200):  # connect and say nothing
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(short_path)
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                continue
            idle.append(sock)
        # The broker answers excess connections at once and gives up on
        # silent ones after the read deadline; it never holds more.
        most = fds_until_all_closed(open_node, idle, timeout=3 * protocol.READ_TIMEOUT + 10)
        assert most <= before_fds + 20
    finally:
        for sock in idle:
            sock.close()
        os.close(directory)
    assert wait_for_fd_count(open_node, before_fds) <= before_fds
    sandbox = open_node.sandbox(volume.binds(DATA))
    sandbox.spawn([str(fuse_examples / "hello"), "-f", DATA], stderr=subprocess.DEVNULL)
    open_node.wait_mounted(volume.target)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [
        ["max_read=4096,fd=7"],  # a comma inside one token
        ["fd=7", "fd=8", "rootmode=100000", "user_id=0", "group_id=0"],
        ["fsname=a,fd=7"],
    ],
)
def test_fd_and_ids_smuggled_in_options_never_reach_the_kernel(
    open_node: Node, options: list[str]
) -> None:
    volume = open_node.publish_fuse_volume(Pod("app"))
    answer = exchange_raw(socket_of(volume), mount_request(options))
    if answer["ok"]:
        # Accepted, but with the broker's own fd, mode and ids: the ids are
        # the caller's (this test runs as root), whatever the options said.
        mount = open_node.wait_mounted(volume.target)
        assert {"user_id=0", "group_id=0"} <= set(mount.super_options)
    else:
        assert answer["errno"] in (1, 22)
        assert not mounts_at(os.fspath(volume.target))


@pytest.mark.parametrize(
    "option", ["suid", "dev", "allow_root", "blkdev", "context=system_u:object_r:tmp_t:s0"]
)
def test_privileged_options_are_refused_and_nothing_is_mounted(
    open_node: Node, option: str
) -> None:
    volume = open_node.publish_fuse_volume(Pod("app"))
    before = fuse_mounts(open_node)
    answer = exchange_raw(socket_of(volume), mount_request(["rw", option]))
    assert answer["ok"] is False
    assert answer["errno"] == 1  # EPERM
    assert "refused" in str(answer["message"])
    assert fuse_mounts(open_node) == before


# ---------------------------------------------------------------- paths


def test_a_symlink_swapped_in_for_the_target_is_never_mounted_on(
    open_node: Node, tmp_path: Path
) -> None:
    volume = open_node.publish_fuse_volume(Pod("app"))
    victim = tmp_path / "victim"
    victim.mkdir()
    volume.target.rmdir()
    volume.target.symlink_to(victim)  # after publish, before the pod's MOUNT
    before = fuse_mounts(open_node)
    answer = exchange_raw(socket_of(volume), mount_request([]))
    assert answer["ok"] is False
    assert fuse_mounts(open_node) == before
    assert not mounts_at(os.fspath(victim))
    volume.target.unlink()
    volume.target.mkdir()


def test_a_symlink_in_the_parent_path_is_refused(open_node: Node, tmp_path: Path) -> None:
    pod = Pod("app")
    volume = open_node.publish_fuse_volume(pod)
    victim = tmp_path / "victim"
    (victim / "mount").mkdir(parents=True)
    parent = volume.target.parent
    moved = parent.with_name("moved")
    parent.rename(moved)
    parent.symlink_to(victim)
    try:
        answer = exchange_raw(socket_of(volume), mount_request([]))
        assert answer["ok"] is False
        assert not mounts_at(os.fspath(victim / "mount"))
    finally:
        parent.unlink()
        moved.rename(parent)


def test_meta_fuse_attributes_cannot_reach_another_pods_directories(node: Node) -> None:
    victim = Pod("victim")
    victim_dir = node.make_empty_dir(victim, "secret")
    attacker = Pod("attacker")
    node.make_empty_dir(attacker, "fuse-fd-passing")
    escape = f"../../../{victim.uid}/volumes/kubernetes.io~empty-dir/secret"
    with pytest.raises(CsiError) as refused:
        node.publish(attacker, "data", {"fdPassingEmptyDirName": escape,
                                        "fdPassingSocketName": "s.sock"})  # fmt: skip
    assert refused.value.code.name == "INVALID_ARGUMENT"
    # A symlink planted as the emptyDir is not followed either.
    planted = node.kubelet.pod_dir(attacker) / "volumes" / "kubernetes.io~empty-dir" / "link"
    planted.symlink_to(victim_dir)
    with pytest.raises(CsiError) as not_followed:
        node.publish(attacker, "data2", {"fdPassingEmptyDirName": "link",
                                         "fdPassingSocketName": "s.sock"})  # fmt: skip
    assert not_followed.value.code.name == "FAILED_PRECONDITION"
    assert list(victim_dir.iterdir()) == []
    assert victim_dir.stat().st_uid == 0


def test_a_symlink_planted_at_the_socket_name_is_replaced_not_followed(
    node: Node, tmp_path: Path
) -> None:
    pod = Pod("app")
    empty_dir = node.make_empty_dir(pod, "fuse-fd-passing")
    victim = tmp_path / "victim-file"
    victim.write_text("keep")
    victim.chmod(0o600)
    (empty_dir / "fuse-csi-ephemeral.sock").symlink_to(victim)
    node.publish(pod, "data", {"fdPassingEmptyDirName": "fuse-fd-passing",
                               "fdPassingSocketName": "fuse-csi-ephemeral.sock"})  # fmt: skip
    assert victim.read_text() == "keep"
    assert oct(victim.stat().st_mode & 0o777) == oct(0o600)
    assert (empty_dir / "fuse-csi-ephemeral.sock").is_socket()


# ---------------------------------------------------------------- identity


def test_a_pod_cannot_mount_through_another_pods_socket(node: Node, fuse_examples: Path) -> None:
    owner = node.publish_fuse_volume(Pod("owner"))
    intruder = node.publish_fuse_volume(Pod("intruder"))
    # The intruder's container somehow has the owner's socket directory.
    sandbox = node.sandbox({DATA: intruder.target, "/run/csi-async": owner.socket_binds[
        "/run/csi-async"]})  # fmt: skip
    before = fuse_mounts(node)
    result = sandbox.run([str(fuse_examples / "hello"), "-f", DATA], capture_output=True,
                         timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "does not run in that pod" in result.stderr.decode()
    assert fuse_mounts(node) == before
    refusals = [
        e for e in node.driver.log_entries()
        if e.get("logger") == "csi_async.audit" and e.get("decision") == "refused"
    ]  # fmt: skip
    # The audit record's peer_pid is the JSON int SO_PEERCRED gave the broker.
    assert refusals and cast("int", refusals[-1]["peer_pid"]) > 0
    assert refusals[-1]["pod_uid"] == owner.pod.uid
