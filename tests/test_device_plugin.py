"""The /dev/fuse device plugin: kubelet's API on the driver's loop, and programs run unchanged.

The device manager is e2e/device_manager.py (grpcio, kubelet's side of the API): it serves
Registration on kubelet.sock, dials the plugin back, reads its ListAndWatch stream and
calls Allocate. A sandboxed pod then gets exactly the DeviceSpecs Allocate returned (a
real /dev/fuse node, no stand-in), and sshfs (libfuse3) and bindfs (libfuse2) mount
through the broker with the command lines they have anywhere else.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import grpc
import pytest
from grpclib.client import Channel

from csi_async._proto import v1beta1 as dp
from csi_async._proto.csi import v1 as csi
from csi_async.config import DEFAULT_DEVICE_RESOURCE
from csi_async.deviceplugin.devices import AllocationError, FuseDevices
from csi_async.deviceplugin.plugin import DevicePlugin
from e2e.device_manager import DeviceManager, DeviceManagerError
from e2e.driver import DriverProcess
from e2e.kubelet import Pod
from e2e.node import Node
from e2e.sandbox import NOBODY, DeviceSpec, PodSandbox
from tests.test_fuse_programs import (
    DATA,
    SOURCE,
    SSH,
    assert_unprivileged_fuse,
    reads_and_writes_through_the_mount,
    shared_dir,
    source_dir,
    start,
    unmount_with_fusermount3,
)

RESOURCE = DEFAULT_DEVICE_RESOURCE
DEV_FUSE_SPEC = dp.DeviceSpec(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rw")


def allocate(request: list[list[str]], count: int = 1000) -> dp.AllocateResponse:
    containers = [dp.ContainerAllocateRequest(devices_ids=ids) for ids in request]
    return FuseDevices(count).allocate(dp.AllocateRequest(container_requests=containers))


# ---------------------------------------------------------------- Allocate's rules, in process


def test_each_container_gets_one_dev_fuse_read_write_and_nothing_else() -> None:
    response = allocate([["fuse-0"], ["fuse-7", "fuse-999"]])
    assert len(response.container_responses) == 2
    for container in response.container_responses:
        assert [bytes(d) for d in container.devices] == [bytes(DEV_FUSE_SPEC)]
        assert container.mounts == []
        assert container.envs == {}
        assert container.annotations == {}
        assert container.cdi_devices == []


@pytest.mark.parametrize(
    ("request_ids", "error"),
    [
        ([["fuse-1000"]], "unknown device id 'fuse-1000'"),
        ([["gpu-0"]], "unknown device id 'gpu-0'"),
        ([["fuse-01"]], "unknown device id 'fuse-01'"),
        ([["fuse-" + "9" * 500]], "unknown device id"),
        ([[]], "no device ids"),
        ([], "no container requests"),
        ([[f"fuse-{n}" for n in range(1001)]], "1001 device ids, but this plugin advertises only"),
        ([["fuse-3", "fuse-3"]], "listed twice"),
        ([["fuse-0"]] * 1001, "1001 container requests"),
    ],
)
def test_bad_allocate_requests_are_refused_with_the_reason(
    request_ids: list[list[str]], error: str
) -> None:
    with pytest.raises(AllocationError, match=error.replace("(", r"\(")):
        allocate(request_ids)


def test_the_device_list_has_every_id_once() -> None:
    listing = FuseDevices(1000).listing(healthy=True)
    assert [d.id for d in listing.devices] == [f"fuse-{n}" for n in range(1000)]
    assert {d.health for d in listing.devices} == {"Healthy"}
    assert {d.health for d in FuseDevices(3).listing(healthy=False).devices} == {"Unhealthy"}


# ---------------------------------------------------------------- health, over a real stream


def test_list_and_watch_sends_the_list_again_when_dev_fuse_comes_and_goes(
    tmp_path: Path,
) -> None:
    """The plugin, on an anyio loop, read by a grpclib client on its Unix socket."""
    device = tmp_path / "fuse"  # not there yet: Unhealthy
    plugin = DevicePlugin(
        tmp_path / "dp", RESOURCE, FuseDevices(3, str(device)), device_path=str(device),
        poll_interval=0.02,
    )  # fmt: skip
    seen: list[set[str]] = []

    async def watch(updates: AsyncIterator[dp.ListAndWatchResponse]) -> None:
        async for update in updates:
            seen.append({d.health for d in update.devices})
            if len(seen) == 1:
                os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(10, 229))
            elif len(seen) == 2:
                device.unlink()
                os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's
            else:
                return

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(plugin.run)
            channel = Channel(path=str(plugin.socket_path))
            try:
                with anyio.fail_after(10):
                    await watch(dp.DevicePluginStub(channel).list_and_watch(dp.Empty()))
            finally:
                channel.close()
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert seen == [{"Unhealthy"}, {"Healthy"}, {"Unhealthy"}]
    assert not plugin.socket_path.exists(), "stopping leaves no socket behind"


# ---------------------------------------------------------------- the driver and a kubelet


@pytest.fixture
def manager(node: Node) -> Iterator[DeviceManager]:
    """kubelet's device manager in the node's kubelet root, the driver's plugin registered.

    The manager starts after the driver, so it deletes the socket the plugin made, as a
    kubelet restart does: the plugin listens again and registers.
    """
    with DeviceManager(node.driver.device_plugin_dir) as device_manager:
        device_manager.wait_registered(RESOURCE)
        yield device_manager


def test_the_driver_registers_and_kubelet_gets_dev_fuse_from_allocate(
    node: Node, manager: DeviceManager
) -> None:
    assert manager.registrations[-1] == (RESOURCE, "fuse.csi-async.dev_fuse.sock", "")
    endpoint = manager.endpoints[RESOURCE]
    assert endpoint.options.pre_start_required is False
    assert endpoint.options.get_preferred_allocation_available is False
    devices = endpoint.devices()
    assert len(devices) == 1000
    assert set(devices.values()) == {"Healthy"}
    socket_mode = (node.driver.device_plugin_dir / endpoint.endpoint).lstat().st_mode
    assert stat.S_ISSOCK(socket_mode) and stat.S_IMODE(socket_mode) == 0o600

    response = manager.allocate(RESOURCE)
    assert [bytes(d) for d in response.devices] == [bytes(DEV_FUSE_SPEC)]
    assert (response.mounts, response.envs, response.annotations) == ([], {}, {})


def test_bad_requests_get_clear_errors_and_change_nothing(manager: DeviceManager) -> None:
    def refused(request: dp.AllocateRequest) -> DeviceManagerError:
        with pytest.raises(DeviceManagerError) as caught:
            manager.allocate_raw(RESOURCE, request)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        return caught.value

    def one(ids: list[str]) -> dp.AllocateRequest:
        return dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=ids)])

    assert "unknown device id 'nvidia-0'" in refused(one(["nvidia-0"])).details
    assert "no device ids" in refused(one([])).details
    huge = refused(one([f"fuse-{n}" for n in range(100_000)]))
    assert "100000 device ids, but this plugin advertises only 1000" in huge.details
    assert "no container requests" in refused(dp.AllocateRequest()).details
    with pytest.raises(DeviceManagerError) as caught:
        manager.call(
            RESOURCE, "GetPreferredAllocation", dp.PreferredAllocationRequest(),
            dp.PreferredAllocationResponse,
        )  # fmt: skip
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    # The plugin still answers, and its stream still runs.
    assert [bytes(d) for d in manager.allocate(RESOURCE).devices] == [bytes(DEV_FUSE_SPEC)]
    assert not manager.endpoints[RESOURCE].stream_ended


def test_a_kubelet_restart_makes_the_plugin_register_again(
    node: Node, manager: DeviceManager
) -> None:
    old = manager.endpoints[RESOURCE]
    manager.restart()  # deletes every socket in the directory, new kubelet.sock
    manager.wait_registered(RESOURCE, count=2)
    assert manager.endpoints[RESOURCE] is not old
    assert (node.driver.device_plugin_dir / "fuse.csi-async.dev_fuse.sock").exists()
    assert [bytes(d) for d in manager.allocate(RESOURCE).devices] == [bytes(DEV_FUSE_SPEC)]
    messages = [e.get("msg") for e in node.driver.log_entries()]
    # Once when the fixture's kubelet started after the driver, once for this restart.
    relistened = "device plugin socket removed (kubelet restarted?): listening again"
    assert messages.count(relistened) == 2
    assert messages.count("registered with kubelet") == 2


def test_a_refused_registration_is_retried_until_kubelet_accepts(node: Node) -> None:
    with DeviceManager(node.driver.device_plugin_dir, supported_versions=("v2",)) as manager:
        manager.wait_for("two refused registrations", lambda: len(manager.registrations) >= 2)
        assert all("'v1beta1' is not supported" in error for *_, error in manager.registrations)
        assert RESOURCE not in manager.endpoints
        manager.supported_versions = ("v1beta1",)
        manager.wait_registered(RESOURCE, timeout=20)  # the backoff: 1 s, 2 s, 4 s, ...
    failed = [
        e
        for e in node.driver.log_entries()
        if e.get("msg") == "device plugin registration failed; retrying"
    ]
    assert [e["retry_in_s"] for e in failed[:2]] == [1.0, 2.0]
    assert "is not supported" in str(failed[0]["error"])


def test_a_directory_it_cannot_listen_in_is_logged_once_per_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "device-plugins"
    blocked.write_text("a file where the directory should be")
    plugin = DevicePlugin(blocked, RESOURCE, FuseDevices(1))

    async def three_looks() -> None:
        for _ in range(3):
            await plugin.check_logged()

    with caplog.at_level(logging.DEBUG, logger="csi_async.deviceplugin"):
        anyio.run(three_looks)
    levels = [r.levelno for r in caplog.records if "cannot listen" in r.getMessage()]
    assert levels == [logging.ERROR, logging.DEBUG, logging.DEBUG]


def test_the_driver_is_ready_and_stops_cleanly_while_kubelet_never_answers_register() -> None:
    """A kubelet that accepts the connection and never answers must not hold up the driver."""
    root = Path(tempfile.mkdtemp(prefix="csi-async-dp-"))
    plugin_dir = root / "kubelet" / "device-plugins"
    plugin_dir.mkdir(parents=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.bind(str(plugin_dir / "kubelet.sock"))
        silent.listen(8)  # connections queue; nothing ever reads or answers them
        driver = DriverProcess(root, root / "kubelet").start()
        try:
            assert driver.client.call("/csi.v1.Identity/Probe", csi.ProbeRequest()).ready
            # Ready while the Register call is still waiting (its 15 s timeout has
            # not fired: no failure is logged yet), so readiness did not wait for it.
            messages = [e.get("msg") for e in driver.log_entries()]
            assert "serving" in messages
            assert "device plugin registration failed; retrying" not in messages
        finally:
            assert driver.stop(signal.SIGTERM) == 0
        assert not (plugin_dir / "fuse.csi-async.dev_fuse.sock").exists()
    finally:
        silent.close()
        subprocess.run(["rm", "-rf", str(root)], check=True)


def test_sigterm_ends_the_stream_and_removes_the_socket_and_off_means_no_plugin() -> None:
    root = Path(tempfile.mkdtemp(prefix="csi-async-dp-"))
    try:
        with DeviceManager(root / "kubelet" / "device-plugins") as manager:
            driver = DriverProcess(root, root / "kubelet").start()
            try:
                manager.wait_registered(RESOURCE)
                endpoint = manager.endpoints[RESOURCE]
            finally:
                assert driver.stop(signal.SIGTERM) == 0
            manager.wait_for("the ListAndWatch stream to end", lambda: endpoint.stream_ended)
            assert not (manager.plugin_dir / endpoint.endpoint).exists()

            off = DriverProcess(root, root / "kubelet", extra_args=["--no-device-plugin"])
            off.start()
            try:
                assert off.client.call("/csi.v1.Identity/Probe", csi.ProbeRequest()).ready
                assert sorted(p.name for p in manager.plugin_dir.iterdir()) == ["kubelet.sock"]
                assert len(manager.registrations) == 1
            finally:
                assert off.stop() == 0
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


# ---------------------------------------------------------------- programs, unchanged


def pod_with_devices(
    node: Node, binds: dict[str, Path], devices: list[dp.DeviceSpec]
) -> PodSandbox:
    """A container with no /dev/fuse stand-in, given exactly these device specs.

    This machine's /dev/fuse is 0600 (no udev): the runtime gives the node to the pod's
    user, as containerd does with device_ownership_from_security_context.
    """
    return node.sandbox(
        binds,
        dummy_dev_fuse=False,
        device_ownership_from_security_context=True,
        devices=[DeviceSpec(d.container_path, d.host_path, d.permissions) for d in devices],
    )


def sftp_binds(tmp_path: Path, source: Path) -> dict[str, Path]:
    bin_dir = shared_dir(tmp_path / "bin", 0o755)
    script = bin_dir / "ssh"
    script.write_text(f"#!/bin/sh\ncd {SOURCE} && exec /usr/lib/openssh/sftp-server\n")
    script.chmod(0o755)
    return {SOURCE: source, os.path.dirname(SSH): bin_dir}


def test_unchanged_sshfs_mounts_with_the_allocated_device_and_not_without_it(
    node: Node, manager: DeviceManager, tmp_path: Path
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    binds = {**volume.binds(DATA), **sftp_binds(tmp_path, source)}
    sshfs = ["sshfs", "-f", "-o", f"ssh_command={SSH}", f"localhost:{SOURCE}", DATA]

    # A restricted pod without the resource: no /dev/fuse, and libfuse gives up.
    bare = pod_with_devices(node, binds, [])
    failed = bare.run(sshfs, capture_output=True, timeout=30)
    assert failed.returncode != 0
    assert b"fuse: device not found" in failed.stderr

    allocated = manager.allocate(RESOURCE)
    sandbox = pod_with_devices(node, binds, list(allocated.devices))
    listing = sandbox.run(["sh", "-c", "stat -c '%n %F %t:%T %u' /dev/fuse"], capture_output=True)
    assert listing.stdout == f"/dev/fuse character special file a:e5 {NOBODY}\n".encode()
    program = start(sandbox, sshfs)
    mount = node.wait_mounted_by(program, volume.target)
    assert_unprivileged_fuse(mount, "fuse.sshfs")
    reads_and_writes_through_the_mount(node, volume, source)
    unmount_with_fusermount3(sandbox, volume, node)
    assert program.wait(15) == 0


def test_unchanged_bindfs_libfuse2_mounts_with_the_allocated_device(
    node: Node, manager: DeviceManager, tmp_path: Path
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = pod_with_devices(
        node, {**volume.binds(DATA), SOURCE: source}, list(manager.allocate(RESOURCE).devices)
    )
    bindfs = start(sandbox, ["bindfs", "-f", SOURCE, DATA])
    mount = node.wait_mounted_by(bindfs, volume.target)
    assert_unprivileged_fuse(mount, "fuse")
    reads_and_writes_through_the_mount(node, volume, source)
    unmount_with_fusermount3(sandbox, volume, node)
    assert bindfs.wait(15) == 0
