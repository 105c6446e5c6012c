"""Tests of the e2e infrastructure itself: kubelet root, pod sandbox, kubelet emulator.

Real mounts, namespaces and processes; no CSI server (the driver's RPC paths
are tested against the real driver elsewhere). Every test is checked for
leftover mounts and child processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_async._proto.csi.v1 import NodeServiceCapabilityRpcType, VolumeCapabilityAccessModeMode
from csi_async.mount.mountinfo import read_mountinfo
from e2e.hostenv import KubeletRoot, lazy_umount, mount_tmpfs
from e2e.kubelet import CsiError, KubeletEmulator, Pod, StillMountedError
from e2e.mounts import is_mount_point, mounts_at_or_below
from e2e.sandbox import (
    EXIT_NOT_FOUND,
    EXIT_SETUP_FAILED,
    Container,
    PodSandbox,
    pids_in_pidns,
)

REPO = Path(__file__).resolve().parent.parent
FUSE_EXAMPLES = REPO / "build" / "fuse-examples"
HOST_FUSERMOUNT = Path("/usr/bin/fusermount3")
DRIVER = "csi-async.example.com"


def _fingerprint(path: Path) -> tuple[int, int, int, str]:
    st = path.stat()
    return st.st_mode, st.st_uid, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def _live_children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        state, ppid = data[data.rindex(")") + 2 :].split()[:2]
        if int(ppid) == me and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a mount, a child process or a changed fusermount3 behind."""
    # Not every kubelet root on the machine: another node may be running.
    # KubeletRoot.teardown itself fails if it cannot unmount everything.
    watched = (str(tmp_path), "/usr/bin", "/dev")
    before = {m.mount_point for m in read_mountinfo()}
    fusermount = _fingerprint(HOST_FUSERMOUNT)
    yield
    new = [
        m.mount_point
        for m in read_mountinfo()
        if m.mount_point not in before and m.mount_point.startswith(watched)
    ]
    assert new == [], f"mounts left behind: {new}"
    deadline = time.monotonic() + 5
    while _live_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_children() == []
    assert _fingerprint(HOST_FUSERMOUNT) == fusermount
    assert not is_mount_point(HOST_FUSERMOUNT)


@pytest.fixture
def kroot() -> Iterator[KubeletRoot]:
    # In /tmp, not tmp_path: the CSI socket path must fit in 107 bytes.
    with KubeletRoot() as root:
        yield root


@pytest.fixture
def marker_dir(tmp_path: Path) -> Path:
    d = tmp_path / "marker"
    d.mkdir()
    d.chmod(0o777)  # written by uid 65534 through a bind
    return d


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """A 'zipapp' that records how it was called into /run/marker, then fails."""
    script = tmp_path / "bin" / "fusermount3"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        '{ echo "uid=$(id -u)"; echo "argv=$*"; echo "commfd=${_FUSE_COMMFD:-}"; }'
        " > /run/marker/called\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture(scope="session")
def fuse_examples() -> Path:
    subprocess.run([REPO / "scripts" / "build_fuse_examples.sh"], check=True)
    return FUSE_EXAMPLES


def _status(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):[ \t]*(.*)$", text, re.MULTILINE))


# ------------------------------------------------------------------ KubeletRoot


def test_kubelet_root_is_a_shared_mount_and_teardown_removes_everything(tmp_path: Path) -> None:
    with KubeletRoot(tmp_path) as root:
        path = root.path
        own = [m for m in read_mountinfo() if m.mount_point == str(path)]
        assert len(own) == 1
        assert own[0].shared
        assert (root.pods_dir.is_dir(), root.plugins_dir.is_dir()) == (True, True)

        # Nested and stacked mounts, a mount inside a mount, and a busy one.
        a = root.pods_dir / "a"
        b = a / "b"
        a.mkdir()
        mount_tmpfs(a)
        mount_tmpfs(a)
        b.mkdir()
        mount_tmpfs(b)
        busy = os.open(b, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert len(root.mounts()) == 4
        finally:
            os.close(busy)
    assert not path.exists()
    assert mounts_at_or_below(path) == []


def test_kubelet_root_teardown_runs_when_the_test_fails(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), KubeletRoot(tmp_path) as root:
        path = root.path
        (root.pods_dir / "x").mkdir()
        mount_tmpfs(root.pods_dir / "x")
        raise Boom
    assert not path.exists()
    assert mounts_at_or_below(path) == []


def test_kubelet_root_csi_socket_path() -> None:
    with KubeletRoot() as root:
        assert root.path.parent == Path("/tmp").resolve()
        assert root.csi_endpoint(DRIVER) == f"unix://{root.path}/plugins/{DRIVER}/csi.sock"
        assert (root.plugins_dir / DRIVER).is_dir()
    with KubeletRoot(Path("/tmp") / ("x" * 80)) as root, pytest.raises(ValueError, match="107"):
        root.csi_socket(DRIVER)
    (Path("/tmp") / ("x" * 80)).rmdir()


# ------------------------------------------------------------------ PodSandbox


def test_sandbox_user_capabilities_and_pid_namespace(stand_in: Path) -> None:
    with PodSandbox({}, stand_in) as sandbox:
        result = sandbox.run(
            ["/bin/sh", "-c", "echo pid=$$; cat /proc/self/status; echo --proc--; ls /proc"],
            capture_output=True,
            text=True,
            check=True,
        )
    status = _status(result.stdout)
    assert "pid=1" in result.stdout.splitlines()
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1"
    # A fresh /proc: only the shell and `cat`/`ls` exist in this PID namespace.
    listing = result.stdout.split("--proc--")[1]
    pids = {int(n) for n in listing.split() if n.isdigit()}
    assert 1 in pids
    assert max(pids) < 10


def test_sandbox_dev_and_fuse_mount_fails_with_eperm(stand_in: Path) -> None:
    probe = (
        "import ctypes, os\n"
        "fd = os.open('/dev/fuse', os.O_RDWR)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "opts = f'fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}'\n"
        "print(libc.mount(b'fuse', b'/tmp', b'fuse', 0, opts.encode()), ctypes.get_errno())\n"
    )
    with PodSandbox({}, stand_in) as sandbox:
        devs = sandbox.run(
            ["/bin/sh", "-c", "ls /dev; stat -c '%n %t:%T %F' /dev/fuse /dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        mounted = sandbox.run(
            ["/usr/bin/python3", "-c", probe], capture_output=True, text=True, check=True
        ).stdout
    names = set(devs.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "fuse", "shm"} <= names
    assert "/dev/fuse 1:3 character special file" in devs
    assert "/dev/null 1:3 character special file" in devs
    assert mounted.split() == ["-1", str(errno.EPERM)]
    assert Path("/dev/fuse").stat().st_rdev != Path("/dev/null").stat().st_rdev


def test_libfuse_falls_back_to_the_bound_fusermount3(
    stand_in: Path, marker_dir: Path, fuse_examples: Path
) -> None:
    binds = {"/run/marker": marker_dir, "/run/fuse-examples": fuse_examples}
    with PodSandbox(binds, stand_in) as sandbox:
        result = sandbox.run(
            ["/bin/sh", "-c", "mkdir /tmp/mnt && exec /run/fuse-examples/hello -f /tmp/mnt"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0, result
    called = (marker_dir / "called").read_text().splitlines()
    assert called[0] == "uid=65534"
    assert called[1].startswith("argv=-o ")
    assert called[1].endswith(" -- /tmp/mnt")
    assert re.fullmatch(r"commfd=\d+", called[2])


def test_sandbox_sees_mounts_made_later_in_the_kubelet_root(
    kroot: KubeletRoot, stand_in: Path
) -> None:
    volume = kroot.pods_dir / "pod" / "vol"
    volume.mkdir(parents=True)
    script = (
        "echo ready; read go; cat /run/vol/hello.txt;"
        " grep ' /run/vol ' /proc/self/mountinfo | awk '{print $9}'"
    )
    with PodSandbox({"/run/vol": volume}, stand_in) as sandbox:
        container = sandbox.spawn(
            ["/bin/sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert container.stdout is not None
        assert container.stdout.readline() == "ready\n"
        mount_tmpfs(volume)
        try:
            (volume / "hello.txt").write_text("hi\n")
            out, _ = container.communicate("go\n", timeout=30)
        finally:
            lazy_umount(volume)
    assert container.returncode == 0
    lines = out.splitlines()
    assert lines[0] == "hi"
    assert lines[-1] == "tmpfs"  # the propagated mount is on top


@pytest.mark.parametrize("how", ["Popen.kill", "os.kill", "parent thread exits"])
def test_killing_a_container_leaves_no_process(stand_in: Path, how: str) -> None:
    script = (
        "sleep 1000 & setsid sleep 1000 & (sleep 1000 &);"
        " /bin/sh -c 'trap \"\" HUP TERM; sleep 1000' & echo started; wait"
    )
    die_with_parent = how == "parent thread exits"
    with PodSandbox({}, stand_in, die_with_parent=die_with_parent) as sandbox:
        spawned: list[Container] = []
        if die_with_parent:
            thread = threading.Thread(
                target=lambda: spawned.append(
                    sandbox.spawn(["/bin/sh", "-c", script], stdout=subprocess.PIPE, text=True)
                )
            )
            thread.start()
            thread.join()
        else:
            spawned.append(
                sandbox.spawn(["/bin/sh", "-c", script], stdout=subprocess.PIPE, text=True)
            )
        container = spawned[0]
        assert container.stdout is not None
        ns = container.pidns
        assert ns is not None
        if how == "Popen.kill":
            assert container.stdout.readline() == "started\n"
            assert len(container.processes()) >= 5
            container.kill()
        elif how == "os.kill":
            assert container.stdout.readline() == "started\n"
            assert len(container.processes()) >= 5
            # Only `unshare` dies here; --kill-child (re-armed after the uid
            # change) must take PID 1 and with it the namespace.
            os.kill(container.pid, signal.SIGKILL)
        else:
            # The spawning thread is gone: the container dies with it.
            assert container.stdout.readline() in ("started\n", "")
        container.wait_gone(10)
        assert pids_in_pidns(ns) == []
        assert container.processes() == []


def test_terminate_reaches_pid1_and_exit_status_is_passed_through(stand_in: Path) -> None:
    script = "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done"
    with PodSandbox({}, stand_in) as sandbox:
        container = sandbox.spawn(["/bin/sh", "-c", script], stdout=subprocess.PIPE, text=True)
        assert isinstance(container, Container)
        assert container.stdout is not None
        assert container.stdout.readline() == "ready\n"
        assert container.stop(grace=10) == 7
        container.wait_gone()


def test_sandbox_setup_errors(stand_in: Path, tmp_path: Path) -> None:
    with PodSandbox({"/nonexistent-e2e-dir/x": tmp_path}, stand_in) as sandbox:
        result = sandbox.run(["/bin/true"], capture_output=True, text=True)
    assert result.returncode == EXIT_SETUP_FAILED
    assert "outside the sandbox" in result.stderr
    assert not Path("/nonexistent-e2e-dir").exists()
    with PodSandbox({}, stand_in) as sandbox:
        result = sandbox.run(["no-such-program"], capture_output=True, text=True)
    assert result.returncode == EXIT_NOT_FOUND
    private = tmp_path / "private"
    private.write_text("")
    private.chmod(0o700)
    with pytest.raises(PermissionError, match="a\\+rx"):
        PodSandbox({}, private)


def test_sandbox_binds_files_read_only_and_hides_host_tmp(
    stand_in: Path, tmp_path: Path, marker_dir: Path
) -> None:
    data = tmp_path / "data.txt"
    data.write_text("payload\n")
    data.chmod(0o644)
    script = (
        "cat /run/cfg/data.txt; echo x > /run/cfg/data.txt || echo ro;"
        f" test -e {tmp_path} || echo hidden; echo w > /run/marker/w && echo rw"
    )
    with PodSandbox(
        {"/run/marker": marker_dir}, stand_in, ro_binds={"/run/cfg/data.txt": data}
    ) as sb:
        out = sb.run(["/bin/sh", "-c", script], capture_output=True, text=True).stdout
    assert out.split() == ["payload", "ro", "hidden", "rw"]
    assert data.read_text() == "payload\n"


# ------------------------------------------------------------------ KubeletEmulator (no server)


def _expected_volume_id(pod_uid: str, name: str) -> str:
    return "csi-" + hashlib.sha256(f"{pod_uid}{name}".encode()).hexdigest()


def test_kubelet_paths_volume_id_and_vol_data(kroot: KubeletRoot) -> None:
    kubelet = KubeletEmulator(kroot.path, kroot.csi_endpoint(DRIVER), DRIVER, "node-a")
    pod = Pod("app", "team", "11111111-2222-4333-8444-555555555555")
    volume_id = kubelet.volume_id(pod, "data")
    assert volume_id == _expected_volume_id(pod.uid, "data")
    assert len(volume_id) == 68
    target = kubelet.target_path(pod, "data")
    volumes = kroot.path / "pods" / pod.uid / "volumes"
    assert target == volumes / "kubernetes.io~csi" / "data" / "mount"

    data_file = kubelet.write_vol_data(pod, "data")
    assert data_file == target.parent / "vol_data.json"
    assert not target.exists()  # the driver creates `mount`
    assert target.parent.stat().st_mode & 0o777 == 0o750
    data = json.loads(data_file.read_text())
    assert data == {
        "specVolID": "data",
        "volumeHandle": volume_id,
        "driverName": DRIVER,
        "nodeName": "node-a",
        "volumeLifecycleMode": "Ephemeral",
        "attachmentID": "csi-" + hashlib.sha256(f"{volume_id}{DRIVER}node-a".encode()).hexdigest(),
    }
    assert list(data) == sorted(data)


def test_kubelet_publish_request(kroot: KubeletRoot) -> None:
    kubelet = KubeletEmulator(kroot.path, kroot.csi_endpoint(DRIVER), DRIVER)
    pod = Pod("app", service_account="runner")
    uuid.UUID(pod.uid)
    attributes = {"image": "x", "csi.storage.k8s.io/pod.name": "spoofed"}
    request = kubelet.build_publish_request(pod, "data", attributes, readonly=True)
    assert request.volume_id == _expected_volume_id(pod.uid, "data")
    assert request.target_path == str(kubelet.target_path(pod, "data"))
    assert request.readonly is True
    assert request.staging_target_path == ""
    assert request.volume_context == {
        "image": "x",
        "csi.storage.k8s.io/pod.name": "app",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": pod.uid,
        "csi.storage.k8s.io/serviceAccount.name": "runner",
        "csi.storage.k8s.io/ephemeral": "true",
    }
    cap = request.volume_capability
    assert cap is not None and cap.mount is not None and cap.access_mode is not None
    assert cap.mount.fs_type == "" and cap.mount.mount_flags == []
    assert cap.mount.volume_mount_group == ""
    assert cap.access_mode.mode == VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER

    caps = frozenset(
        {
            NodeServiceCapabilityRpcType.SINGLE_NODE_MULTI_WRITER,
            NodeServiceCapabilityRpcType.VOLUME_MOUNT_GROUP,
        }
    )
    request = kubelet.build_publish_request(pod, "data", node_capabilities=caps, fs_group=2000)
    cap = request.volume_capability
    assert cap is not None and cap.mount is not None and cap.access_mode is not None
    assert cap.access_mode.mode == VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER
    assert cap.mount.volume_mount_group == "2000"
    # Round trip through the wire format the driver sees.
    assert type(request).parse(bytes(request)) == request


def test_kubelet_remove_mount_dir_leaves_mounted_volumes_alone(kroot: KubeletRoot) -> None:
    kubelet = KubeletEmulator(kroot.path, kroot.csi_endpoint(DRIVER), DRIVER)
    pod = Pod("app")
    kubelet.write_vol_data(pod, "a")
    kubelet.write_vol_data(pod, "b")
    for name in ("a", "b"):
        kubelet.target_path(pod, name).mkdir()
    mounted = kubelet.target_path(pod, "b")
    mount_tmpfs(mounted)
    try:
        assert kubelet.remove_mount_dir(kubelet.target_path(pod, "a")) is True
        assert not kubelet.volume_dir(pod, "a").exists()
        assert kubelet.remove_mount_dir(mounted) is False
        assert (mounted.parent / "vol_data.json").exists()
        assert kubelet.cleanup_pod_dirs(pod) is False
    finally:
        lazy_umount(mounted)
    assert kubelet.remove_mount_dir(mounted) is True
    assert kubelet.cleanup_pod_dirs(pod) is True
    assert not kubelet.pod_dir(pod).exists()


def test_kubelet_rpc_errors_without_a_server(kroot: KubeletRoot) -> None:
    kubelet = KubeletEmulator(
        kroot.path, kroot.csi_endpoint(DRIVER), DRIVER, rpc_timeout=2, retry_timeout=1.2
    )
    with pytest.raises(CsiError) as info:
        kubelet.probe()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert not info.value.final
    with pytest.raises(TimeoutError):
        kubelet.wait_ready(timeout=0.3)

    pod = Pod("app")
    kubelet.calls.clear()
    start = time.monotonic()
    with pytest.raises(CsiError) as info:
        kubelet.publish(pod, "data")
    elapsed = time.monotonic() - start
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # Attempts at 0 s and 0.5 s; the next (after 1 s more) would overrun 1.2 s.
    methods = [m for m, _ in kubelet.calls]
    assert methods == ["/csi.v1.Node/NodeGetCapabilities"] * 2
    assert 0.5 <= elapsed < 1.2
    # Non-final: the volume is "uncertain", kubelet keeps its directory.
    assert kubelet.volume_dir(pod, "data").is_dir()
    assert CsiError(grpc.StatusCode.INVALID_ARGUMENT, "x").final
    assert issubclass(StillMountedError, RuntimeError)
