"""Static PersistentVolumes: kubelet's PV path through the real driver, and real FUSE mounts.

The emulator plays kubelet for a PV exactly as pkg/volume/csi does it
(e2e/kubelet.py): MountDevice's metadata, vol_data.json with the PV's name
and volumeHandle, the PV name in the target path, the PV's first access
mode, its mountOptions as mount_flags, ephemeral "false" in the context.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from csi_async._proto.csi import v1 as csi
from csi_async.config import DEFAULT_DRIVER_NAME
from csi_async.mount.mountinfo import mounts_at
from e2e.driver import DriverProcess
from e2e.kubelet import CsiError, KubeletEmulator, PersistentVolume, Pod
from e2e.node import META_FUSE_SOCKET_ENV, FuseVolume, Node
from e2e.pods import (
    ALWAYS,
    ContainerSpec,
    PodSpec,
    RunningPod,
    fuse_claim_volume_spec,
    fuse_startup_probe,
)
from e2e.sandbox import HOST_TO_CONTAINER, Container
from tests.helpers import publish_request

HELLO_TEXT = "Hello World!\n"
DATA = "/run/data"
# A volumeHandle as a storage system might spell one: the CSI spec allows
# any string up to 128 bytes, and kubelet passes it through untouched.
ODD_HANDLE = "bucket/exports:team a/ü-" + "x" * 103
assert len(ODD_HANDLE.encode()) == 128


@pytest.fixture
def kubelet(driver: DriverProcess, kubelet_root: Path) -> KubeletEmulator:
    return KubeletEmulator(kubelet_root, driver.endpoint, DEFAULT_DRIVER_NAME, retry_timeout=5)


def sshfs_pv(
    name: str = "shared.sshfs",
    handle: str = ODD_HANDLE,
    access_modes: tuple[str, ...] = ("ReadWriteMany",),
) -> PersistentVolume:
    return PersistentVolume(name, handle, access_modes=access_modes)


def records(driver: DriverProcess) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (driver.state_dir / "volumes").glob("*.json")]


# ------------------------------------------------------------------ the CSI side, no mounts


def test_a_pv_is_published_at_its_name_with_its_handle_and_unpublished_with_kubelet_s_args(
    driver: DriverProcess, kubelet: KubeletEmulator
) -> None:
    pod, pv = Pod("app"), sshfs_pv()
    published = kubelet.publish_pv(pod, pv)

    assert published.target_path == kubelet.root / (
        f"pods/{pod.uid}/volumes/kubernetes.io~csi/{pv.name}/mount"
    )
    assert published.target_path.is_dir()
    vol_data = json.loads((published.target_path.parent / "vol_data.json").read_text())
    assert vol_data["specVolID"] == pv.name
    assert vol_data["volumeHandle"] == ODD_HANDLE
    assert vol_data["volumeLifecycleMode"] == "Persistent"
    device = kubelet.device_mount_path(ODD_HANDLE)
    assert device.is_dir()  # MountDevice's metadata, and no NodeStageVolume
    assert "/csi.v1.Node/NodeStageVolume" not in [method for method, _ in kubelet.calls]
    request = published.request
    assert request.volume_id == ODD_HANDLE
    assert request.volume_context["csi.storage.k8s.io/ephemeral"] == "false"
    assert request.volume_capability is not None
    assert request.volume_capability.access_mode is not None
    mode = request.volume_capability.access_mode.mode
    assert mode == csi.VolumeCapabilityAccessModeMode.MULTI_NODE_MULTI_WRITER
    [record] = records(driver)
    assert record["volume_id"] == ODD_HANDLE

    # Published again (kubelet's periodic remount): OK, nothing new.
    kubelet.publish_pv(pod, pv)
    assert len(records(driver)) == 1

    kubelet.unpublish(pod, pv.name)
    assert not published.target_path.parent.exists()
    assert not device.parent.exists()  # UnmountDevice after the node's last pod
    assert records(driver) == []
    unpublishes = [r for m, r in kubelet.calls if m.endswith("NodeUnpublishVolume")]
    assert [r.volume_id for r in unpublishes] == [ODD_HANDLE]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("access_mode", "expected"),
    [
        ("ReadWriteMany", csi.VolumeCapabilityAccessModeMode.MULTI_NODE_MULTI_WRITER),
        ("ReadOnlyMany", csi.VolumeCapabilityAccessModeMode.MULTI_NODE_READER_ONLY),
        ("ReadWriteOnce", csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER),
        ("ReadWriteOncePod", csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER),
    ],
)
def test_every_access_mode_kubelet_sends_for_a_pv_is_accepted(
    kubelet: KubeletEmulator, access_mode: str, expected: csi.VolumeCapabilityAccessModeMode
) -> None:
    pod = Pod("app")
    published = kubelet.publish_pv(pod, sshfs_pv(access_modes=(access_mode, "ReadWriteOnce")))
    capability = published.request.volume_capability
    assert capability is not None and capability.access_mode is not None
    assert capability.access_mode.mode == expected
    kubelet.unpublish(pod, "shared.sshfs")


def test_multi_node_modes_are_refused_on_inline_volumes(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(
        kubelet_root, mode=csi.VolumeCapabilityAccessModeMode.MULTI_NODE_READER_ONLY
    )
    with pytest.raises(grpc.RpcError) as info:
        driver.client.node_publish(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inline" in (info.value.details() or "")
    assert not Path(request.target_path).exists()


def test_a_handle_over_128_bytes_is_refused_and_changes_nothing(
    driver: DriverProcess, kubelet: KubeletEmulator
) -> None:
    pod = Pod("app")
    with pytest.raises(CsiError) as info:
        kubelet.publish_pv(pod, sshfs_pv(handle=ODD_HANDLE + "y"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "128 bytes" in info.value.message
    assert not kubelet.target_path(pod, "shared.sshfs").exists()
    assert records(driver) == []


def test_the_same_target_with_another_handle_is_a_conflict(kubelet: KubeletEmulator) -> None:
    pod = Pod("app")
    kubelet.publish_pv(pod, sshfs_pv())
    with pytest.raises(CsiError) as info:
        kubelet.publish_pv(pod, sshfs_pv(handle="another-export"), retries=False)
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_unpublish_with_another_volume_s_id_is_refused_and_changes_nothing(
    driver: DriverProcess, kubelet: KubeletEmulator
) -> None:
    pod = Pod("app")
    published = kubelet.publish_pv(pod, sshfs_pv())
    with pytest.raises(grpc.RpcError) as info:
        driver.client.node_unpublish("another-export", str(published.target_path))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert published.target_path.is_dir()
    assert len(records(driver)) == 1
    kubelet.unpublish(pod, "shared.sshfs")
    assert records(driver) == []


def test_an_inline_volume_cannot_pose_as_a_pv_or_a_pv_as_inline(
    driver: DriverProcess, kubelet: KubeletEmulator
) -> None:
    pod = Pod("app")
    pv = sshfs_pv(name="data")
    # An inline volume with a PV's context: kubelet's own hash for the path.
    inline_as_pv = kubelet.build_pv_publish_request(pod, pv)
    inline_as_pv.volume_id = kubelet.volume_id(pod, "data")
    # A PV request that says inline: the handle is not the path's hash.
    pv_as_inline = kubelet.build_pv_publish_request(pod, pv)
    pv_as_inline.volume_context["csi.storage.k8s.io/ephemeral"] = "true"
    # An inline volume at a PV's name, which is no pod volume name.
    dotted = kubelet.build_publish_request(pod, "shared.sshfs")
    for request in (inline_as_pv, pv_as_inline, dotted):
        Path(request.target_path).parent.mkdir(parents=True, exist_ok=True)
        with pytest.raises(grpc.RpcError) as info:
            driver.client.node_publish(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request.target_path
        assert not Path(request.target_path).exists()
    assert records(driver) == []


def test_socket_for_names_a_pv_backed_volume_by_the_pv_s_name(
    driver: DriverProcess, kubelet: KubeletEmulator
) -> None:
    pod = Pod("app")
    kubelet.publish_pv(pod, sshfs_pv())
    socket_dir = kubelet.publish(
        pod, "fuse-broker", {"socketFor": "shared.sshfs"}, True
    ).target_path
    assert (socket_dir / "fuse.sock").exists()
    # The broker's side of it: sockets/<pod uid>/<PV name>/.
    assert (driver.state_dir / "sockets" / pod.uid / "shared.sshfs" / "fuse.sock").exists()
    kubelet.unpublish(pod, "fuse-broker")
    kubelet.unpublish(pod, "shared.sshfs")


# ------------------------------------------------------------------ real FUSE mounts


def start_hello(node: Node, volume: FuseVolume, fuse_examples: Path, *args: str) -> Container:
    sandbox = node.sandbox(volume.binds(DATA))
    return sandbox.spawn(
        [str(fuse_examples / "hello"), "-f", *args, DATA],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_two_pods_on_one_node_share_a_pv_each_with_its_own_mount_and_socket(
    node: Node, fuse_examples: Path
) -> None:
    pv = PersistentVolume("team-export", "sshfs://files.example/export")
    first, second = Pod("reader-1"), Pod("reader-2")
    volumes = [node.publish_pv_fuse_volume(pod, pv) for pod in (first, second)]
    assert volumes[0].target != volumes[1].target
    sockets = [v.socket_binds["/run/csi-async"] for v in volumes]
    assert sockets[0] != sockets[1]

    # One pod's socket serves only that pod, though both mount the same PV.
    intruder = node.sandbox({DATA: volumes[1].target, "/run/csi-async": sockets[0]})
    result = intruder.run(
        [str(fuse_examples / "hello"), "-f", DATA], capture_output=True, timeout=30
    )
    assert result.returncode != 0
    assert "does not run in that pod" in result.stderr.decode()
    assert not mounts_at(os.fspath(volumes[0].target))
    assert not mounts_at(os.fspath(volumes[1].target))

    programs = [start_hello(node, v, fuse_examples) for v in volumes]
    mounts = [node.wait_mounted_by(p, v.target) for p, v in zip(programs, volumes, strict=True)]
    # Two superblocks, each served by its own pod's program.
    assert mounts[0].minor != mounts[1].minor
    for volume in volumes:
        assert (volume.target / "hello").read_text() == HELLO_TEXT

    # The first pod goes; the second pod's mount keeps serving.
    node.unpublish(first, "fuse-broker")
    node.unpublish(first, pv.name)
    assert not mounts_at(os.fspath(volumes[0].target))
    assert (volumes[1].target / "hello").read_text() == HELLO_TEXT
    assert node.kubelet.device_mount_path(pv.volume_handle).is_dir()
    node.unpublish(second, "fuse-broker")
    node.unpublish(second, pv.name)
    assert not mounts_at(os.fspath(volumes[1].target))
    assert not node.kubelet.device_mount_path(pv.volume_handle).parent.exists()
    for program in programs:
        program.wait(15)


def claim_pod(fuse_examples: Path, pv: PersistentVolume) -> PodSpec:
    """The documented pattern on a claim: hello as a native sidecar, then the app."""
    fuse = fuse_claim_volume_spec("data", pv)
    sidecar = ContainerSpec(
        "fuse", [str(fuse_examples / "hello"), "-f", DATA], fuse.fuse_container_mounts(DATA),
        restart_policy=ALWAYS, startup_probe=fuse_startup_probe(DATA),
    )  # fmt: skip
    idle = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]
    app = ContainerSpec(
        "app", idle, [fuse.consumer_mount(DATA, HOST_TO_CONTAINER)],
        run_as_user=1000, run_as_group=1000,
    )  # fmt: skip
    return PodSpec(
        containers=[app], init_containers=[sidecar], volumes=fuse.volumes,
        termination_grace_period_seconds=5,
    )  # fmt: skip


def test_two_running_pods_with_the_sidecar_pattern_share_a_pv(
    node: Node, fuse_examples: Path
) -> None:
    # The pod worker publishes each pod's volumes at once, in a random order
    # (the socket volume may come before the PV's), then starts the sidecar.
    pv = PersistentVolume("shared-hello", "hello/shared")
    running: list[RunningPod] = []
    for name in ("web-1", "web-2"):
        pod = node.run_pod(Pod(name), claim_pod(fuse_examples, pv))
        pod.wait_running(timeout=60)
        running.append(pod)
    for pod in running:
        ok, text = pod.read("app", f"{DATA}/hello")
        assert ok and text == HELLO_TEXT, pod.describe()
    targets = [node.kubelet.target_path(p.pod, pv.name) for p in running]
    assert len({node.wait_mounted(t).minor for t in targets}) == 2

    for pod in running:
        node.delete_pod(pod)
    for target in targets:
        assert not mounts_at(os.fspath(target))
        assert not target.parent.exists()
    assert not node.kubelet.device_mount_path(pv.volume_handle).parent.exists()


def test_a_read_only_many_pv_mounts_read_only_whatever_the_program_asks(
    node: Node, fuse_examples: Path
) -> None:
    pv = PersistentVolume("team-export-ro", "export-ro", access_modes=("ReadOnlyMany",))
    volume = node.publish_pv_fuse_volume(Pod("reader"), pv)
    program = start_hello(node, volume, fuse_examples, "-o", "rw")
    mount = node.wait_mounted_by(program, volume.target)
    assert "ro" in mount.mount_options
    assert (volume.target / "hello").read_text() == HELLO_TEXT


def test_a_pv_may_use_an_option_inline_volumes_may_not(
    tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path
) -> None:
    # On a node that keeps allow_other from pods, the PV's administrator may
    # still grant it, and the PV's noexec holds against the program's exec.
    binds = {"/run/examples": fuse_examples_on_host}
    with Node(tmp_path, zipapp, driver_args=["--no-allow-other"], shared_binds=binds) as node:
        pod = Pod("app")
        with pytest.raises(CsiError) as info:
            node.publish(pod, "inline", {"mountOptions": "allow_other"})
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "allow_other" in info.value.message

        pv = PersistentVolume(
            "granted", "export-granted", volume_attributes={"mountOptions": "allow_other"},
            mount_options=("noexec",),
        )  # fmt: skip
        volume = node.publish_pv_fuse_volume(pod, pv)
        program = start_hello(node, volume, Path("/run/examples"), "-o", "exec")
        mount = node.wait_mounted_by(program, volume.target)
        assert "allow_other" in mount.super_options
        assert "noexec" in mount.mount_options
        # allow_other for real: a container of another uid reads the mount.
        reader = node.sandbox({DATA: volume.target}, uid=1000, gid=1000)
        result = reader.run(["cat", f"{DATA}/hello"], capture_output=True, timeout=15)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == HELLO_TEXT


def test_meta_fuse_attributes_work_on_a_pv(node: Node, fuse_examples: Path) -> None:
    pod = Pod("app")
    empty_dir = node.make_empty_dir(pod, "fuse-fd-passing")
    pv = PersistentVolume(
        "meta-fuse-export", "export-meta",
        volume_attributes={
            "fdPassingEmptyDirName": "fuse-fd-passing",
            "fdPassingSocketName": "fuse-csi-ephemeral.sock",
        },
    )  # fmt: skip
    target = node.publish_pv(pod, pv)
    assert (empty_dir / "fuse-csi-ephemeral.sock").exists()
    sandbox = node.sandbox(
        {DATA: target, "/run/fusermount3-proxy": empty_dir},
        env={META_FUSE_SOCKET_ENV: "/run/fusermount3-proxy/fuse-csi-ephemeral.sock"},
    )  # fmt: skip
    program = sandbox.spawn(
        [str(fuse_examples / "hello"), "-f", DATA],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    node.wait_mounted_by(program, target)
    assert (target / "hello").read_text() == HELLO_TEXT


def test_a_pv_is_unpublished_after_a_driver_restart(node: Node, fuse_examples: Path) -> None:
    pv = PersistentVolume("restarted-export", "export/restarted", access_modes=("ReadWriteOnce",))
    pod = Pod("app")
    volume = node.publish_pv_fuse_volume(pod, pv)
    program = start_hello(node, volume, fuse_examples)
    node.wait_mounted_by(program, volume.target)
    assert (volume.target / "hello").read_text() == HELLO_TEXT

    node.driver.stop(signal.SIGKILL)
    node.driver.start()
    serving = [e for e in node.driver.log_entries() if e.get("msg") == "serving"][-1]
    assert serving["restored_volumes"] == 2  # the PV-backed volume and its socket volume
    assert (volume.target / "hello").read_text() == HELLO_TEXT

    # kubelet's real arguments: the handle from vol_data.json, the target.
    node.unpublish(pod, "fuse-broker")
    node.unpublish(pod, pv.name)
    assert not mounts_at(os.fspath(volume.target))
    assert not volume.target.parent.exists()
    assert not list((node.driver.state_dir / "volumes").iterdir())
    program.wait(15)


def test_an_unknown_pod_uid_in_a_pv_context_is_refused(
    driver: DriverProcess, kubelet: KubeletEmulator
) -> None:
    pod = Pod("app")
    request = kubelet.build_pv_publish_request(pod, sshfs_pv())
    request.volume_context["csi.storage.k8s.io/pod.uid"] = str(uuid.uuid4())
    Path(request.target_path).parent.mkdir(parents=True)
    with pytest.raises(grpc.RpcError) as info:
        driver.client.node_publish(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
