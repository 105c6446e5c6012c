"""The CSI Identity and Node services, driven over a Unix socket by grpcio."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest

from csi_async._proto.csi import v1 as csi
from e2e.driver import DriverProcess
from tests.helpers import AccessMode, publish_request, target_path, volume_id

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---------------------------------------------------------------- Identity


def test_get_plugin_info_names_the_driver_and_the_package_version(driver: DriverProcess) -> None:
    info: csi.GetPluginInfoResponse = driver.client.call(
        "/csi.v1.Identity/GetPluginInfo", csi.GetPluginInfoRequest()
    )
    assert info.name == "fuse.csi-async.dev"
    assert info.vendor_version == version("csi-async")


def test_plugin_capabilities_never_include_a_controller(driver: DriverProcess) -> None:
    caps: csi.GetPluginCapabilitiesResponse = driver.client.call(
        "/csi.v1.Identity/GetPluginCapabilities", csi.GetPluginCapabilitiesRequest()
    )
    assert caps.capabilities == []


def test_probe_reports_ready_once_serving(driver: DriverProcess) -> None:
    assert driver.client.call("/csi.v1.Identity/Probe", csi.ProbeRequest()).ready is True


def test_node_get_info_reports_the_node_id(driver: DriverProcess) -> None:
    info: csi.NodeGetInfoResponse = driver.client.call(
        "/csi.v1.Node/NodeGetInfo", csi.NodeGetInfoRequest()
    )
    assert info.node_id == "node-1"
    assert info.max_volumes_per_node == 0


def test_node_capabilities_advertise_nothing_unimplemented(driver: DriverProcess) -> None:
    caps: csi.NodeGetCapabilitiesResponse = driver.client.call(
        "/csi.v1.Node/NodeGetCapabilities", csi.NodeGetCapabilitiesRequest()
    )
    assert caps.capabilities == []


# ---------------------------------------------------------------- UNIMPLEMENTED


@pytest.mark.parametrize(
    "path",
    [
        "/csi.v1.Controller/CreateVolume",
        "/csi.v1.Controller/ControllerGetCapabilities",
        "/csi.v1.GroupController/GroupControllerGetCapabilities",
        "/csi.v1.SnapshotMetadata/GetMetadataAllocated",
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodeUnstageVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Node/NodeFutureMethod",
        "/some.other.Service/Method",
    ],
)
def test_every_other_rpc_is_unimplemented_not_unknown(driver: DriverProcess, path: str) -> None:
    err = rpc_error(lambda: driver.client.call(path, csi.ProbeRequest(), csi.ProbeResponse))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err.details()


# ---------------------------------------------------------------- NodePublishVolume validation


def test_publish_creates_the_target_directory(driver: DriverProcess, kubelet_root: Path) -> None:
    request = publish_request(kubelet_root)
    driver.client.node_publish(request)
    assert Path(request.target_path).is_dir()


@pytest.mark.parametrize("field", ["volume_id", "target_path", "volume_capability"])
def test_publish_without_a_required_field_is_invalid(
    driver: DriverProcess, kubelet_root: Path, field: str
) -> None:
    request = publish_request(kubelet_root)
    setattr(request, field, None if field == "volume_capability" else "")
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert field in err.details()


def test_block_access_is_invalid(driver: DriverProcess, kubelet_root: Path) -> None:
    request = publish_request(kubelet_root)
    request.volume_capability = csi.VolumeCapability(
        block=csi.VolumeCapabilityBlockVolume(),
        access_mode=csi.VolumeCapabilityAccessMode(mode=AccessMode.SINGLE_NODE_WRITER),
    )
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert "block" in err.details()


@pytest.mark.parametrize(
    "mode",
    [AccessMode.UNKNOWN, AccessMode.MULTI_NODE_MULTI_WRITER, AccessMode.MULTI_NODE_READER_ONLY],
)
def test_unsupported_access_modes_are_invalid(
    driver: DriverProcess, kubelet_root: Path, mode: AccessMode
) -> None:
    err = rpc_error(lambda: driver.client.node_publish(publish_request(kubelet_root, mode=mode)))
    assert err.code() == INVALID
    assert "access mode" in err.details()


BAD_TARGETS = [
    "relative/pods/{uid}/volumes/kubernetes.io~csi/data/mount",
    "{root}/pods/{uid}/volumes/kubernetes.io~csi/data/mount/",
    "{root}/pods/{uid}/volumes/kubernetes.io~csi/data/mount/extra",
    "{root}/pods/{uid}/volumes/kubernetes.io~csi/../data/mount",
    "{root}/pods/{uid}/../{uid}/volumes/kubernetes.io~csi/data/mount",
    "{root}/pods/{uid}/volumes/kubernetes.io~csi/data/../data/mount",
    "{root}/pods/{uid}/volumes/kubernetes.io~csi/Data/mount",
    "{root}/pods/{uid}/volumes/kubernetes.io~empty-dir/data/mount",
    "{root}/pods/not-a-uid/volumes/kubernetes.io~csi/data/mount",
    "{root}/../pods/{uid}/volumes/kubernetes.io~csi/data/mount",
    "/elsewhere/pods/{uid}/volumes/kubernetes.io~csi/data/mount",
    "{root}/pods/{uid}/volumes/kubernetes.io~csi/data/mount\0",
    "{root}//pods/{uid}/volumes/kubernetes.io~csi/data/mount",
]


@pytest.mark.parametrize("template", BAD_TARGETS)
def test_target_paths_outside_the_kubelet_layout_are_invalid(
    driver: DriverProcess, kubelet_root: Path, template: str
) -> None:
    request = publish_request(kubelet_root)
    uid = request.volume_context["csi.storage.k8s.io/pod.uid"]
    request.target_path = template.format(root=kubelet_root, uid=uid)
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert "target_path" in err.details()


def test_volume_id_must_be_the_one_kubelet_derives(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root)
    request.volume_id = volume_id(str(uuid.uuid4()), "data")
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert "volume_id" in err.details()


def test_pod_uid_in_context_must_match_the_target(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root)
    request.volume_context["csi.storage.k8s.io/pod.uid"] = str(uuid.uuid4())
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID


def test_an_inline_volume_posing_as_a_pv_is_invalid(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    # kubelet's own hash for an inline volume at this path, with a context
    # saying PV: refused, or inline attributes would get a PV's options.
    request = publish_request(kubelet_root)
    request.volume_context["csi.storage.k8s.io/ephemeral"] = "false"
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert "inline volume" in err.details()


@pytest.mark.parametrize("value", [None, "", "yes"])
def test_a_volume_of_unknown_kind_is_invalid(
    driver: DriverProcess, kubelet_root: Path, value: str | None
) -> None:
    request = publish_request(kubelet_root)
    if value is None:
        del request.volume_context["csi.storage.k8s.io/ephemeral"]
    else:
        request.volume_context["csi.storage.k8s.io/ephemeral"] = value
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert "csi.storage.k8s.io/ephemeral" in err.details()


@pytest.mark.parametrize(
    "attributes",
    [
        {"unknownAttribute": "x"},
        {"fdPassingEmptyDirName": "../../other"},
        {"fdPassingEmptyDirName": "fuse", "fdPassingSocketName": "../x.sock"},
        {"fdPassingEmptyDirName": "fuse"},
        {"mountOptions": "suid"},
        {"mountOptions": "o=dev"},
        {"mountOptions": "allow_root"},
        {"mountOptions": "context=system_u:object_r:fusefs_t:s0"},
        {"socketFor": "../data"},
    ],
)
def test_bad_volume_attributes_are_invalid_and_change_nothing(
    driver: DriverProcess, kubelet_root: Path, attributes: dict[str, str]
) -> None:
    request = publish_request(kubelet_root, attributes=attributes)
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == INVALID
    assert not Path(request.target_path).exists()


def test_missing_parent_directory_fails_the_precondition(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root, make_parent=False)
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---------------------------------------------------------------- idempotency


def test_publishing_again_with_the_same_arguments_is_ok(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root)
    driver.client.node_publish(request)
    driver.client.node_publish(request)
    # kubelet's requiresRepublish refreshes tokens: still "the same arguments".
    request.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] = '{"a":{"token":"t"}}'
    driver.client.node_publish(request)


def test_publishing_again_with_other_arguments_already_exists(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root)
    driver.client.node_publish(request)
    request.readonly = True
    err = rpc_error(lambda: driver.client.node_publish(request))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


def test_unpublish_removes_the_target_and_is_idempotent(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root)
    driver.client.node_publish(request)
    driver.client.node_unpublish(request.volume_id, request.target_path)
    assert not Path(request.target_path).exists()
    driver.client.node_unpublish(request.volume_id, request.target_path)


def test_unpublish_of_an_unknown_target_is_ok(driver: DriverProcess, kubelet_root: Path) -> None:
    uid = str(uuid.uuid4())
    driver.client.node_unpublish(volume_id(uid, "data"), target_path(kubelet_root, uid, "data"))


def test_unpublish_never_deletes_user_files_in_the_target(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root)
    driver.client.node_publish(request)
    keep = Path(request.target_path) / "precious"
    keep.write_text("data")
    driver.client.node_unpublish(request.volume_id, request.target_path)
    assert keep.read_text() == "data"


@pytest.mark.parametrize("field", ["volume_id", "target_path"])
def test_unpublish_without_a_required_field_is_invalid(
    driver: DriverProcess, kubelet_root: Path, field: str
) -> None:
    uid = str(uuid.uuid4())
    args = {
        "volume_id": volume_id(uid, "data"),
        "target_path": target_path(kubelet_root, uid, "data"),
    }
    args[field] = ""
    err = rpc_error(lambda: driver.client.node_unpublish(**args))
    assert err.code() == INVALID


def test_fifty_concurrent_publishes_on_distinct_targets_all_succeed(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    requests = [publish_request(kubelet_root) for _ in range(50)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(driver.client.node_publish, requests))
    for request in requests:
        assert Path(request.target_path).is_dir()
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda r: driver.client.node_unpublish(r.volume_id, r.target_path), requests))
    assert not any(Path(r.target_path).exists() for r in requests)


# ---------------------------------------------------------------- errors and logs


def test_unexpected_failures_become_internal_without_a_traceback(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    # Break the driver's own state directory so socket creation fails.
    shutil.rmtree(driver.state_dir)
    driver.state_dir.write_text("not a directory")
    err = rpc_error(lambda: driver.client.node_publish(publish_request(kubelet_root)))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in err.details()
    assert "Traceback" not in driver.log_text()


def test_every_rpc_logs_one_json_line_with_its_identifiers(
    driver: DriverProcess, kubelet_root: Path
) -> None:
    request = publish_request(kubelet_root, readonly=True)
    request.secrets = {"password": "hunter2-secret"}
    request.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] = "token-secret"
    driver.client.node_publish(request)
    entries = [e for e in driver.log_entries() if e.get("method") == "NodePublishVolume"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["volume_id"] == request.volume_id
    assert entry["target_path"] == request.target_path
    assert entry["pod_uid"] == request.volume_context["csi.storage.k8s.io/pod.uid"]
    assert entry["pod_namespace"] == "default"
    assert entry["pod_name"] == "app"
    assert entry["grpc_code"] == "OK"
    assert isinstance(entry["duration_ms"], float)
    assert "secret" not in driver.log_text()


# ---------------------------------------------------------------- process lifecycle


def test_sigterm_exits_zero_and_removes_the_endpoint(tmp_path: Path, kubelet_root: Path) -> None:
    process = DriverProcess(tmp_path, kubelet_root).start()
    request = publish_request(kubelet_root)
    process.client.node_publish(request)
    assert process.stop(signal.SIGTERM) == 0
    assert not process.socket_path.exists()
    assert any(e.get("msg") == "stopped" for e in process.log_entries())


def test_settings_come_from_the_environment(tmp_path: Path, kubelet_root: Path) -> None:
    env = {**os.environ, "CSI_ASYNC_DRIVER_NAME": "example.fuse.dev"}
    with DriverProcess(tmp_path, kubelet_root, env=env) as process:
        info: csi.GetPluginInfoResponse = process.client.call(
            "/csi.v1.Identity/GetPluginInfo", csi.GetPluginInfoRequest()
        )
    assert info.name == "example.fuse.dev"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint", "tcp://0.0.0.0:10000"], "--endpoint"),
        (["--driver-name", "-bad-"], "--driver-name"),
        (["--kubelet-root", "relative/dir"], "--kubelet-root"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "csi_async", "serve", "--node-id", "n", *args],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr


def test_a_node_id_is_required(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "CSI_ASYNC_NODE_ID")}
    result = subprocess.run(
        [sys.executable, "-m", "csi_async", "serve"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "node id" in result.stderr


def test_help_explains_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "csi_async", "serve", "--help"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0
    for flag in ["--endpoint", "--node-id", "--driver-name", "--kubelet-root", "--state-dir",
                 "--log-level"]:  # fmt: skip
        assert flag in result.stdout
