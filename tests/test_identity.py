"""The broker's peer check: which pod a connecting process runs in.

The parser is tested on literal /proc/<pid>/cgroup texts for every kubelet
layout. peer_of() is tested on real processes placed in real kubelet-shaped
cgroups (v1 pids and name=systemd, and the v2 hierarchy) that connect to a
real Unix socket. The machine must mount those hierarchies (Debian 12 here
has v1 controllers under /sys/fs/cgroup/<name> and v2 at .../unified).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import overload

import pytest

from csi_async.broker import identity
from csi_async.broker.identity import SO_PEERPIDFD, cgroup_pod_uid, peer_of, proc_cgroup_pod_uid
from e2e.podcgroup import cgroup2_root, cgroup_v1_mounts, temporary_cgroup

A = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
B = "11111111-2222-3333-4444-555555555555"
A_ = A.replace("-", "_")
B_ = B.replace("-", "_")
CTR = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def cgroupfs(uid: str, qos: str = "burstable", prefix: str = "") -> str:
    qos_level = f"/{qos}" if qos != "guaranteed" else ""
    return f"{prefix}/kubepods{qos_level}/pod{uid}/{CTR}"


def systemd(uid: str, qos: str = "burstable", prefix: str = "", root: str = "kubepods") -> str:
    """The systemd driver's path; root is the slice stem of kubelet's cgroup root."""
    uid_ = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"{prefix}/{root}.slice/{root}-pod{uid_}.slice/cri-containerd-{CTR}.scope"
    return (
        f"{prefix}/{root}.slice/{root}-{qos}.slice/{root}-{qos}-pod{uid_}.slice"
        f"/cri-containerd-{CTR}.scope"
    )


def v1_text(path: str, *, systemd_path: str | None = None, v2: str = "/") -> str:
    """A cgroup v1 (or hybrid) node's /proc/<pid>/cgroup, the container in every hierarchy."""
    lines = [
        f"12:name=systemd:{systemd_path or path}",
        f"11:pids:{path}",
        f"10:memory:{path}",
        f"9:cpu,cpuacct:{path}",
        f"8:net_cls,net_prio:{path}",
        f"7:cpuset:{path}",
        "6:rdma:/",
        f"0::{v2}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- one path

QOS = ["guaranteed", "burstable", "besteffort"]
PREFIXES = ["", "/kubelet", "/system.slice/containerd.service", "/a/b/c"]


@pytest.mark.parametrize("qos", QOS)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_cgroupfs_layout(qos: str, prefix: str) -> None:
    assert cgroup_pod_uid(cgroupfs(A, qos, prefix)) == A


@pytest.mark.parametrize("qos", QOS)
@pytest.mark.parametrize("prefix", ["", "/system.slice/docker-1234.scope", "/x.slice"])
def test_systemd_layout(qos: str, prefix: str) -> None:
    assert cgroup_pod_uid(systemd(A, qos, prefix)) == A


@pytest.mark.parametrize("qos", QOS)
def test_systemd_layout_below_a_cgroup_root(qos: str) -> None:
    # kind: --cgroup-root=/kubelet makes kubelet.slice/kubelet-kubepods.slice/...
    assert cgroup_pod_uid(systemd(A, qos, "/kubelet.slice", root="kubelet-kubepods")) == A
    assert cgroup_pod_uid(systemd(A, qos, "/a.slice/a-b.slice", root="a-b-kubepods")) == A


def test_the_pod_level_itself_and_kubelets_own_containers() -> None:
    # The pod cgroup without a container below it (the e2e node puts
    # processes there) and any container name below it.
    assert cgroup_pod_uid(f"/csi-async-e2e/kubepods/pod{A}") == A
    assert cgroup_pod_uid(f"/kubepods/besteffort/pod{A}/") == A
    assert cgroup_pod_uid(f"/kubepods.slice/kubepods-pod{A_}.slice") == A
    assert cgroup_pod_uid(f"/kubepods.slice/kubepods-pod{A_}.slice/crio-{CTR}.scope") == A
    assert cgroup_pod_uid(f"/kubepods.slice/kubepods-pod{A_}.slice/docker-{CTR}.scope") == A


@pytest.mark.parametrize(
    "path",
    [
        # A pod naming another pod below its own container (delegation).
        f"{cgroupfs(A)}/pod{B}",
        f"{cgroupfs(A)}/kubepods/pod{B}",
        f"{cgroupfs(A)}/kubepods/burstable/pod{B}/{CTR}",
        f"{cgroupfs(A, 'guaranteed')}/kubepods.slice/kubepods-pod{B_}.slice",
        f"{systemd(A)}/kubepods-burstable-pod{B_}.slice",
        f"{systemd(A)}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{B_}.slice",
        f"{systemd(A, 'guaranteed')}/kubepods/besteffort/pod{B}/x",
        f"{systemd(A, 'besteffort', '/kubelet.slice', 'kubelet-kubepods')}/pod{B}",
    ],
)
def test_deeper_pod_names_are_ignored(path: str) -> None:
    assert cgroup_pod_uid(path) == A


@pytest.mark.parametrize(
    "path",
    [
        None,
        "",
        "/",
        f"/pod{A}",  # no kubepods above it
        f"/system.slice/pod{A}/{CTR}",
        f"/user.slice/user-0.slice/kubepods-pod{A_}.slice",  # a pod slice out of place
        "/kubepods",  # kubelet's own levels hold no container
        "/kubepods/burstable",
        "/kubepods.slice/kubepods-besteffort.slice",
        f"/kubepods/guaranteed/pod{A}/{CTR}",  # no such QoS level
        f"/kubepods/burstable/x/pod{A}/{CTR}",  # the pod one level too deep
        f"/kubepods/x/pod{A}",
        f"/kubepods/pod{A_}/{CTR}",  # cgroupfs keeps the dashes
        f"/kubepods/podABCDEF00-4b5a-6978-8a9b-0c1d2e3f4a5b/{CTR}",  # kubelet's UIDs are lowercase
        f"/kubepods/pod{A}x/{CTR}",
        f"/kubepods/pod{A[:-1]}/{CTR}",
        f"/kubepods/xpod{A}/{CTR}",
        f"/kubepods.slice/kubepods-pod{A}.slice/{CTR}",  # systemd escapes "-" as "_"
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{A_}.slice",
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-pod{A_}.slice",
        f"/kubepods.slice/kubepods-burstable-pod{A_}.slice",  # the QoS slice skipped
        f"/kubepods.slice/other-pod{A_}.slice",
        f"/kubelet.slice/kubelet-kubepods.slice/kubepods-pod{A_}.slice",  # the wrong stem
        f"/kubepods.slice/kubepods-pod{A_}.scope",
        f"/kubepods.slice/kubepods-pod{A_}.slice.slice",
        # The first kubepods from the root decides, even if a later one looks right.
        f"/kubepods/burstable/{CTR}/kubepods/pod{A}",
        f"/kubepods.slice/x/kubepods-pod{A_}.slice/kubepods/pod{A}",
        # Relative to a cgroup namespace: where kubepods is cannot be known.
        f"/../../kubepods-burstable-pod{A_}.slice/cri-containerd-{CTR}.scope",
        f"/../../../besteffort/pod{A}/{CTR}",
        f"/../kubepods/pod{A}/{CTR}",
    ],
)
def test_paths_not_in_the_layout_name_no_pod(path: str | None) -> None:
    assert cgroup_pod_uid(path) is None


# ---------------------------------------------------------------- whole files


@pytest.mark.parametrize("qos", QOS)
def test_pure_v2(qos: str) -> None:
    assert proc_cgroup_pod_uid(f"0::{systemd(A, qos)}\n") == A
    assert proc_cgroup_pod_uid(f"0::{cgroupfs(A, qos, '/kubelet')}\n") == A


@pytest.mark.parametrize("qos", QOS)
def test_pure_v1_cgroupfs(qos: str) -> None:
    # No v2 hierarchy in use: the 0:: line is the root.
    assert proc_cgroup_pod_uid(v1_text(cgroupfs(A, qos))) == A


@pytest.mark.parametrize("qos", QOS)
def test_v1_systemd(qos: str) -> None:
    assert proc_cgroup_pod_uid(v1_text(systemd(A, qos))) == A


def test_hybrid_systemd_names_the_pod_in_v1_and_v2() -> None:
    assert proc_cgroup_pod_uid(v1_text(systemd(A), v2=systemd(A))) == A


def test_hybrid_cgroupfs_leaves_v2_to_the_runtime() -> None:
    text = v1_text(cgroupfs(A), v2="/system.slice/containerd.service")
    assert proc_cgroup_pod_uid(text) == A


def test_each_decisive_hierarchy_is_enough_alone() -> None:
    pod = cgroupfs(A)
    assert proc_cgroup_pod_uid(f"5:pids:{pod}\n4:memory:/\n0::/\n") == A
    assert proc_cgroup_pod_uid(f"5:pids:/\n4:memory:{pod}\n0::/\n") == A
    assert proc_cgroup_pod_uid(f"1:name=systemd:{systemd(A)}\n5:pids:/\n0::/\n") == A
    assert proc_cgroup_pod_uid(f"4:memory,pids:{pod}\n0::/\n") == A
    assert proc_cgroup_pod_uid(f"5:pids:/\n0::{pod}\n") == A


def test_a_pod_only_in_a_minor_hierarchy_is_not_enough() -> None:
    pod = cgroupfs(A)
    text = f"8:net_cls,net_prio:{pod}\n7:perf_event:{pod}\n5:pids:/\n4:memory:/\n0::/\n"
    assert proc_cgroup_pod_uid(text) is None


def test_minor_hierarchies_that_agree_are_fine() -> None:
    assert proc_cgroup_pod_uid(f"8:perf_event:{cgroupfs(A)}\n5:pids:{cgroupfs(A)}\n0::/\n") == A


@pytest.mark.parametrize(
    "text",
    [
        v1_text(cgroupfs(A), v2=cgroupfs(B)),  # v1 and v2 disagree
        v1_text(cgroupfs(A), systemd_path=systemd(B)),  # name=systemd disagrees
        f"5:pids:{cgroupfs(A)}\n4:memory:{cgroupfs(B)}\n0::/\n",
        f"5:pids:{cgroupfs(A)}\n8:net_cls:{cgroupfs(B)}\n0::/\n",  # even a minor one
        f"0::{systemd(A)}\n0::{systemd(B)}\n",  # a second v2 line, however it got there
    ],
)
def test_hierarchies_that_name_different_pods_refuse(text: str) -> None:
    assert proc_cgroup_pod_uid(text) is None


def test_a_line_out_of_the_layout_refuses_even_if_others_name_the_pod() -> None:
    assert proc_cgroup_pod_uid(f"5:pids:{cgroupfs(A)}\n4:memory:/kubepods/burstable\n") is None
    assert proc_cgroup_pod_uid(f"5:pids:{cgroupfs(A)}\n0::/../kubepods/pod{A}\n") is None


def test_deeper_names_in_every_hierarchy_still_give_the_real_pod() -> None:
    deep = f"{cgroupfs(A)}/kubepods/burstable/pod{B}/x"
    assert proc_cgroup_pod_uid(v1_text(deep, v2=f"{cgroupfs(A)}/pod{B}")) == A


@pytest.mark.parametrize(
    "text",
    ["", "\n", "0::/\n", "garbage\n", v1_text("/"), v1_text("/system.slice/cron.service")],
)
def test_no_pod(text: str) -> None:
    assert proc_cgroup_pod_uid(text) is None


def test_a_colon_in_a_path_is_part_of_the_path() -> None:
    assert proc_cgroup_pod_uid(f"0::{cgroupfs(A)}/a:b\n") == A
    assert proc_cgroup_pod_uid(f"0::/x:y{cgroupfs(A)}\n") == A


# ---------------------------------------------------------------- real processes

# Joins the cgroups named by their cgroup.procs files, connects to the
# abstract socket in argv[1], then stays until its stdin is closed.
CHILD = """
import socket, sys
for procs in sys.argv[2:]:
    with open(procs, "w") as f:
        f.write("0")
s = socket.socket(socket.AF_UNIX)
s.connect(b"\\0" + sys.argv[1].encode())
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def v1() -> dict[str, Path]:
    mounts = cgroup_v1_mounts()
    assert "pids" in mounts, "these tests need the cgroup v1 pids hierarchy"
    assert "name=systemd" in mounts, "these tests need the cgroup v1 name=systemd hierarchy"
    return mounts


@pytest.fixture(scope="module")
def v2() -> Path:
    root = cgroup2_root()
    assert root is not None, "these tests need the cgroup v2 hierarchy"
    return root


@pytest.fixture(scope="module")
def hierarchies(v1: dict[str, Path], v2: Path) -> dict[str, Path]:
    return {"pids": v1["pids"], "name=systemd": v1["name=systemd"], "v2": v2}


# This run's own top directory in every hierarchy, as a kubelet's cgroup root
# would be, so that nothing here meets another run's or a real kubelet's cgroups.
TOP = f"csi-async-identity-{os.getpid()}"


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"csi-async-identity-{uuid.uuid4()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(b"\0" + name.encode())
    sock.listen(4)
    try:
        yield sock, name
    finally:
        sock.close()


def components(path: str) -> list[str]:
    return [TOP, *(c for c in path.split("/") if c)]


@contextlib.contextmanager
def cgroups(placements: dict[Path, str]) -> Iterator[list[Path]]:
    """Make each cgroup path in its hierarchy; yield their cgroup.procs files."""
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(temporary_cgroup(mount, *components(path))) / "cgroup.procs"
            for mount, path in placements.items()
        ]
        yield procs


@contextlib.contextmanager
def peer_in(
    listener: tuple[socket.socket, str], procs: list[Path]
) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    """A child process that joined these cgroups and connected; on exit it exits and is reaped."""
    sock, name = listener
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, name, *map(str, procs)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stderr is not None
    try:
        pidfd = os.pidfd_open(child.pid)
        try:
            # Either it connects or it dies (say, a cgroup it could not join).
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(30_000)}
        finally:
            os.close(pidfd)
        if sock.fileno() not in ready:
            child.wait(timeout=30)
            pytest.fail(f"the child did not connect: {child.stderr.read().decode()}")
        conn, _ = sock.accept()
        with conn:
            yield conn, child
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stderr.close()


LAYOUTS = {
    "cgroupfs-guaranteed": lambda uid: cgroupfs(uid, "guaranteed"),
    "cgroupfs-burstable": lambda uid: cgroupfs(uid, "burstable"),
    "cgroupfs-besteffort": lambda uid: cgroupfs(uid, "besteffort", "/kubelet"),
    "systemd-guaranteed": lambda uid: systemd(uid, "guaranteed"),
    "systemd-burstable": lambda uid: systemd(uid, "burstable"),
    "systemd-besteffort-kind": lambda uid: systemd(
        uid, "besteffort", "/kubelet.slice", "kubelet-kubepods"
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hierarchy", ["pids", "name=systemd", "v2"])
def test_a_real_process_in_a_pod_cgroup(
    hierarchies: dict[str, Path], listener: tuple[socket.socket, str], hierarchy: str, layout: str
) -> None:
    pod = str(uuid.uuid4())
    path = LAYOUTS[layout](pod)
    with (
        cgroups({hierarchies[hierarchy]: path}) as procs,
        peer_in(listener, procs) as (conn, child),
    ):
        own = Path(f"/proc/{child.pid}/cgroup").read_text()
        assert f"/{TOP}{path}\n" in own  # the kernel did place it there
        peer = peer_of(conn)
    assert (peer.pid, peer.uid, peer.gid) == (child.pid, os.getuid(), os.getgid())
    assert peer.cgroup_pod_uid == pod


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hierarchy", ["pids", "name=systemd", "v2"])
def test_a_real_process_naming_another_pod_below_its_container(
    hierarchies: dict[str, Path], listener: tuple[socket.socket, str], hierarchy: str, layout: str
) -> None:
    pod, other = str(uuid.uuid4()), str(uuid.uuid4())
    # Its own subtree, shaped like the other pod's cgroups, with the other
    # pod's level directly below its container and a whole layout below that.
    fake = LAYOUTS[layout](other)
    path = f"{LAYOUTS[layout](pod)}/pod{other}/{fake}"
    with cgroups({hierarchies[hierarchy]: path}) as procs, peer_in(listener, procs) as (conn, _):
        peer = peer_of(conn)
    assert peer.cgroup_pod_uid == pod


def test_a_real_process_in_the_same_pod_everywhere(
    hierarchies: dict[str, Path], listener: tuple[socket.socket, str]
) -> None:
    pod = str(uuid.uuid4())
    # A v1 node with the systemd driver: the same slices in every hierarchy.
    where = {h: systemd(pod) for h in hierarchies.values()}
    with cgroups(where) as procs, peer_in(listener, procs) as (conn, _):
        assert peer_of(conn).cgroup_pod_uid == pod


@pytest.mark.parametrize(
    ("first", "second"), [("pids", "name=systemd"), ("pids", "v2"), ("name=systemd", "v2")]
)
def test_a_real_process_in_two_pods_is_refused(
    hierarchies: dict[str, Path], listener: tuple[socket.socket, str], first: str, second: str
) -> None:
    pod, other = str(uuid.uuid4()), str(uuid.uuid4())
    where = {hierarchies[first]: cgroupfs(pod), hierarchies[second]: systemd(other)}
    with cgroups(where) as procs, peer_in(listener, procs) as (conn, _):
        assert peer_of(conn).cgroup_pod_uid is None


@pytest.mark.parametrize(
    "path",
    ["/kubepods/burstable", "/kubepods.slice/kubepods-besteffort.slice", "/kubepods", "/x/pod{}"],
)
def test_a_real_process_outside_any_pod_level(
    hierarchies: dict[str, Path], listener: tuple[socket.socket, str], path: str
) -> None:
    where = {hierarchies["pids"]: path.format(uuid.uuid4())}
    with cgroups(where) as procs, peer_in(listener, procs) as (conn, _):
        assert peer_of(conn).cgroup_pod_uid is None


def test_a_real_process_in_no_pod(listener: tuple[socket.socket, str]) -> None:
    with peer_in(listener, []) as (conn, child):
        peer = peer_of(conn)
    assert peer.pid == child.pid
    assert peer.cgroup_pod_uid is None


def test_a_peer_that_has_exited_names_no_pod(
    hierarchies: dict[str, Path], listener: tuple[socket.socket, str]
) -> None:
    pod = str(uuid.uuid4())
    with (
        cgroups({hierarchies["v2"]: cgroupfs(pod)}) as procs,
        peer_in(listener, procs) as (conn, child),
    ):
        pidfd = os.pidfd_open(child.pid)
        try:
            assert child.stdin is not None
            child.stdin.close()
            # Exited, not yet reaped: its pid is still its own, and its cgroup
            # still names the pod; only the exit check tells.
            assert select.select([pidfd], [], [], 30)[0]
            assert proc_cgroup_pod_uid(Path(f"/proc/{child.pid}/cgroup").read_text()) == pod
        finally:
            os.close(pidfd)
        assert peer_of(conn).cgroup_pod_uid is None


# ---------------------------------------------------------------- pidfds


def test_this_kernel_reports_an_unknown_socket_option_as_enoprotoopt() -> None:
    # What a kernel without SO_PEERPIDFD answers, and the only error on
    # which peer_of falls back to pidfd_open.
    a, b = socket.socketpair()
    with a, b, pytest.raises(OSError) as raised:
        a.getsockopt(socket.SOL_SOCKET, 0x7FFF, 4)
    assert raised.value.errno == errno.ENOPROTOOPT


def test_so_peerpidfd_pins_the_peer(listener: tuple[socket.socket, str]) -> None:
    with peer_in(listener, []) as (conn, child):
        pidfd = identity._peer_pidfd(conn, child.pid)
        assert pidfd is not None
        try:
            fdinfo = Path(f"/proc/self/fdinfo/{pidfd}").read_text()
            assert f"Pid:\t{child.pid}\n" in fdinfo
        finally:
            os.close(pidfd)


class _PeerPidfdFails(socket.socket):
    """A real connection whose SO_PEERPIDFD fails, as on other kernels or after the peer exited."""

    failure = errno.ENOPROTOOPT

    # The same two forms as socket.getsockopt: an int option, or a buffer of buflen bytes.
    @overload
    def getsockopt(self, level: int, option: int, /) -> int: ...
    @overload
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...
    def getsockopt(self, level: int, option: int, buflen: int | None = None, /) -> int | bytes:
        if (level, option) == (socket.SOL_SOCKET, SO_PEERPIDFD):
            raise OSError(self.failure, os.strerror(self.failure))
        if buflen is None:
            return super().getsockopt(level, option)
        return super().getsockopt(level, option, buflen)


@pytest.mark.parametrize(
    ("failure", "falls_back"),
    [
        (errno.ENOPROTOOPT, True),  # a kernel before 6.5
        (errno.EINVAL, False),  # 6.5+: the peer has exited (pidfd_prepare)
        (errno.ESRCH, False),  # no peer pid recorded (6.5)
        (errno.ENODATA, False),  # no peer pid recorded (later kernels)
    ],
)
def test_pidfd_open_only_without_so_peerpidfd(
    hierarchies: dict[str, Path],
    listener: tuple[socket.socket, str],
    failure: int,
    falls_back: bool,
) -> None:
    pod = str(uuid.uuid4())
    with (
        cgroups({hierarchies["pids"]: cgroupfs(pod)}) as procs,
        peer_in(listener, procs) as (conn, _),
    ):
        wrapped = _PeerPidfdFails(fileno=os.dup(conn.fileno()))
        wrapped.failure = failure
        with wrapped:
            peer = peer_of(wrapped)
    assert peer.cgroup_pod_uid == (pod if falls_back else None)
