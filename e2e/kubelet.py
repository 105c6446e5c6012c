"""A kubelet emulator for CSI inline volumes and static PersistentVolumes, over grpcio.

It speaks to the driver with grpcio (grpc-core, HTTP/2 in C) — a different
gRPC stack from the driver's grpclib — and behaves like kubelet's CSI volume
plugin (pkg/volume/csi, see docs in /work/shared/reference/csi-and-kubelet.md §2):

* a new connection per RPC, authority "localhost";
* target path  <root>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount,
  volume handle "csi-" + sha256(pod uid + volume name);
* SetUp: MkdirAll(volume dir, 0750), NodeGetCapabilities, vol_data.json,
  NodeGetCapabilities, NodePublishVolume — the driver creates `mount`;
* a final error removes the mount dir (removeMountDir); a non-final one
  (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED)
  is retried with exponential backoff starting at 500 ms, like the volume
  manager's reconciler, within a bounded total time;
* TearDown: NodeUnpublishVolume(volume id, target path), then removeMountDir:
  only if `mount` is no longer a mount point (mount-utils'
  IsLikelyNotMountPoint: a stat into it against an lstat of its parent) are
  `mount` (rmdir), vol_data.json and the volume dir removed;
* a pod's volumes (publish_volumes) are set up the way the volume manager's
  reconciler does it: one goroutine per volume, all at once, started in a
  random order (a real kubelet v1.36 sent the socket volume first for one pod
  and the FUSE volume first for the next), each retried on failure with the
  operation executor's exponential backoff (500 ms doubling, capped at
  2 min 2 s), final errors included, until the pod's volume wait gives up.

For a PersistentVolume (publish_pv; pkg/volume/csi with attachRequired false
and no STAGE_UNSTAGE_VOLUME advertised):

* target path  <root>/pods/<pod uid>/volumes/kubernetes.io~csi/<PV name>/mount,
  volume_id the PV's spec.csi.volumeHandle;
* MountDevice once per node while any pod uses the PV (csiAttacher):
  NodeGetCapabilities, MkdirAll(plugins/kubernetes.io/csi/<driver>/
  <sha256(handle)>/globalmount, 0750), vol_data.json {volumeHandle,
  driverName} beside it, then nothing more (no NodeStageVolume);
* SetUp: vol_data.json (specVolID = PV name, volumeLifecycleMode
  "Persistent") at NewMounter, NodeGetCapabilities (stage check),
  MkdirAll(volume dir), NodeGetCapabilities twice (VOLUME_MOUNT_GROUP, then
  the access-mode mapper), NodePublishVolume: volume_context =
  spec.csi.volumeAttributes + pod info with ephemeral "false", access mode
  from the PV's first access mode (asCSIAccessModeV1), mount_flags =
  spec.mountOptions, fs_type = spec.csi.fsType, readonly = the pod's
  persistentVolumeClaim.readOnly (the PV's csi.readOnly is only for
  ControllerPublish, never sent to the node);
* TearDown as for inline volumes (the volume_id from vol_data.json), and
  after the node's last pod of the PV, UnmountDevice: NodeGetCapabilities,
  then removeMountDir of globalmount.

Containers and pods (init containers, native sidecars, restarts, the
runtime's bind mounts) are in e2e.pods and e2e.sandbox.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import betterproto2
import grpc

from csi_async._proto.csi.v1 import (
    GetPluginInfoRequest,
    GetPluginInfoResponse,
    NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse,
    NodeGetInfoRequest,
    NodeGetInfoResponse,
    NodePublishVolumeRequest,
    NodePublishVolumeResponse,
    NodeServiceCapabilityRpcType,
    NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse,
    ProbeRequest,
    ProbeResponse,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityAccessModeMode,
    VolumeCapabilityMountVolume,
)
from e2e.csi_client import CsiClient

M = TypeVar("M", bound=betterproto2.Message)
T = TypeVar("T")

CSI_PLUGIN_NAME = "kubernetes.io/csi"
VOL_DATA_FILE = "vol_data.json"
GLOBAL_MOUNT = "globalmount"

KEY_POD_NAME = "csi.storage.k8s.io/pod.name"
KEY_POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
KEY_POD_UID = "csi.storage.k8s.io/pod.uid"
KEY_SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
KEY_EPHEMERAL = "csi.storage.k8s.io/ephemeral"

# kubelet's isFinalError(): these mean the operation may still be in
# progress on the driver, so the volume is "uncertain" and SetUp is retried.
NON_FINAL_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class CsiError(Exception):
    """A CSI RPC failed with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(f"{method or 'CSI call'}: {code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method

    @property
    def final(self) -> bool:
        """Whether kubelet would treat the operation as finished (not retried as uncertain)."""
        return self.code not in NON_FINAL_CODES


class StillMountedError(RuntimeError):
    """NodeUnpublishVolume returned OK but the target path is still a mount point."""


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account: str = "default"


@dataclass(frozen=True)
class PublishedVolume:
    pod: Pod
    volume_name: str
    volume_id: str
    target_path: Path
    request: NodePublishVolumeRequest


@dataclass(frozen=True)
class VolumeRequest:
    """One CSI volume of a pod spec: volumes[].csi (name, volumeAttributes, readOnly)."""

    name: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    readonly: bool = False
    # volumes[].persistentVolumeClaim instead: the PV bound to the claim
    # (attributes unused; readonly is the claim volume's readOnly).
    pv: PersistentVolume | None = None


@dataclass(frozen=True)
class PersistentVolume:
    """A statically provisioned PV of the driver, the fields kubelet reads of it.

    access_modes are the API's names; kubelet sends only the first one.
    csi_read_only is spec.csi.readOnly, which kubelet never sends to the node.
    """

    name: str
    volume_handle: str
    volume_attributes: Mapping[str, str] = field(default_factory=dict)
    access_modes: tuple[str, ...] = ("ReadWriteMany",)
    mount_options: tuple[str, ...] = ()
    fs_type: str = ""
    csi_read_only: bool = False


# kubelet's asCSIAccessModeV1, and asSingleNodeMultiWriterCapableCSIAccessModeV1
# for a driver that advertises SINGLE_NODE_MULTI_WRITER.
ACCESS_MODES = {
    "ReadWriteOnce": VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": VolumeCapabilityAccessModeMode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": VolumeCapabilityAccessModeMode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER,
}
ACCESS_MODES_MULTI_WRITER_CAPABLE = {
    **ACCESS_MODES,
    "ReadWriteOnce": VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER,
    "ReadWriteOncePod": VolumeCapabilityAccessModeMode.SINGLE_NODE_SINGLE_WRITER,
}


def escape_qualified_name(name: str) -> str:
    """kubelet's utilstrings.EscapeQualifiedName."""
    return name.replace("/", "~")


def make_volume_handle(pod_uid: str, volume_name: str) -> str:
    """kubelet's makeVolumeHandle for inline volumes: no separator between the parts."""
    return "csi-" + hashlib.sha256((pod_uid + volume_name).encode()).hexdigest()


def attachment_id(volume_handle: str, driver_name: str, node_name: str) -> str:
    """kubelet's getAttachmentName."""
    return "csi-" + hashlib.sha256((volume_handle + driver_name + node_name).encode()).hexdigest()


class KubeletEmulator:
    """Drives a CSI node plugin's socket the way kubelet does for inline ephemeral volumes."""

    def __init__(
        self,
        root: Path | str,
        csi_endpoint: str,
        driver_name: str,
        node_name: str = "node-1",
        *,
        rpc_timeout: float = 30.0,
        retry_timeout: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 122.0,
        pod_info_on_mount: bool = True,
    ) -> None:
        if not csi_endpoint.startswith("unix://"):
            raise ValueError(f"csi_endpoint must be unix:///path, got {csi_endpoint!r}")
        # Canonical, because target paths are compared with mountinfo.
        self.root = Path(os.path.realpath(root))
        self.csi_endpoint = csi_endpoint
        self.driver_name = driver_name
        self.node_name = node_name
        self.rpc_timeout = rpc_timeout
        self.retry_timeout = retry_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.pod_info_on_mount = pod_info_on_mount
        # Every RPC sent, in order: (method path, request). Holds secrets if
        # any were sent; tests only.
        self.calls: list[tuple[str, betterproto2.Message]] = []
        self._client = CsiClient(csi_endpoint, rpc_timeout)
        # The order in which publish_volumes starts its goroutines.
        self.rng = random.Random()
        # PV handle -> the pods of this node that have it set up (the actual
        # state of the world: MountDevice before the first, UnmountDevice
        # after the last).
        self._device_users: dict[str, set[str]] = {}
        self._device_lock = threading.Lock()

    # ---------------------------------------------------------------- paths

    def pod_dir(self, pod: Pod) -> Path:
        return self.root / "pods" / pod.uid

    def volume_dir(self, pod: Pod, volume_name: str) -> Path:
        """<root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>: holds `mount`, vol_data.json."""
        return (
            self.pod_dir(pod)
            / "volumes"
            / escape_qualified_name(CSI_PLUGIN_NAME)
            / escape_qualified_name(volume_name)
        )

    def target_path(self, pod: Pod, volume_name: str) -> Path:
        return self.volume_dir(pod, volume_name) / "mount"

    def volume_id(self, pod: Pod, volume_name: str) -> str:
        return make_volume_handle(pod.uid, volume_name)

    def vol_data(self, pod: Pod, volume_name: str) -> dict[str, str]:
        handle = self.volume_id(pod, volume_name)
        return {
            "specVolID": volume_name,
            "volumeHandle": handle,
            "driverName": self.driver_name,
            "nodeName": self.node_name,
            "volumeLifecycleMode": "Ephemeral",
            "attachmentID": attachment_id(handle, self.driver_name, self.node_name),
        }

    def write_vol_data(self, pod: Pod, volume_name: str) -> Path:
        """MkdirAll the volume dir (0750) and write vol_data.json into it."""
        vol_dir = self.volume_dir(pod, volume_name)
        os.makedirs(vol_dir, mode=0o750, exist_ok=True)
        path = vol_dir / VOL_DATA_FILE
        # Go's json.Marshal of a map sorts keys and adds no whitespace.
        path.write_text(
            json.dumps(self.vol_data(pod, volume_name), sort_keys=True, separators=(",", ":"))
        )
        return path

    def volume_context(self, pod: Pod, volume_attributes: Mapping[str, str]) -> dict[str, str]:
        """csi.volumeAttributes merged with pod info; pod info wins (kubelet's mergeMap)."""
        return self._with_pod_info(pod, volume_attributes, ephemeral=True)

    def _with_pod_info(
        self, pod: Pod, attributes: Mapping[str, str], *, ephemeral: bool
    ) -> dict[str, str]:
        """kubelet's mergeMap(attributes, getPodInfoAttrs(pod, lifecycle mode))."""
        context = dict(attributes)
        if self.pod_info_on_mount:
            context.update(
                {
                    KEY_POD_NAME: pod.name,
                    KEY_POD_NAMESPACE: pod.namespace,
                    KEY_POD_UID: pod.uid,
                    KEY_SERVICE_ACCOUNT: pod.service_account,
                    KEY_EPHEMERAL: "true" if ephemeral else "false",
                }
            )
        return context

    def pv_vol_data(self, pv: PersistentVolume) -> dict[str, str]:
        """csiPlugin.NewMounter's vol_data.json for a PV."""
        return {
            "specVolID": pv.name,
            "volumeHandle": pv.volume_handle,
            "driverName": self.driver_name,
            "nodeName": self.node_name,
            "volumeLifecycleMode": "Persistent",
            "attachmentID": attachment_id(pv.volume_handle, self.driver_name, self.node_name),
        }

    def device_mount_path(self, volume_handle: str) -> Path:
        """makeDeviceMountPath: plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount."""
        digest = hashlib.sha256(volume_handle.encode()).hexdigest()
        return (
            self.root / "plugins" / escape_qualified_name(CSI_PLUGIN_NAME)
            / self.driver_name / digest / GLOBAL_MOUNT
        )  # fmt: skip

    @staticmethod
    def _write_json(path: Path, data: Mapping[str, str]) -> None:
        # Go's json.Marshal of a map sorts keys and adds no whitespace.
        path.write_text(json.dumps(dict(data), sort_keys=True, separators=(",", ":")))

    def pv_volume_context(self, pod: Pod, pv: PersistentVolume) -> dict[str, str]:
        """spec.csi.volumeAttributes merged with pod info, ephemeral "false"."""
        return self._with_pod_info(pod, pv.volume_attributes, ephemeral=False)

    def build_pv_publish_request(
        self,
        pod: Pod,
        pv: PersistentVolume,
        readonly: bool = False,
        *,
        node_capabilities: frozenset[NodeServiceCapabilityRpcType] = frozenset(),
    ) -> NodePublishVolumeRequest:
        """The NodePublishVolumeRequest kubelet's csiMountMgr.SetUpAt sends for a PV."""
        modes = (
            ACCESS_MODES_MULTI_WRITER_CAPABLE
            if NodeServiceCapabilityRpcType.SINGLE_NODE_MULTI_WRITER in node_capabilities
            else ACCESS_MODES
        )
        # AccessModes[0], ReadWriteOnce when the PV lists none.
        first = pv.access_modes[0] if pv.access_modes else "ReadWriteOnce"
        mode = modes.get(first, VolumeCapabilityAccessModeMode.UNKNOWN)
        return NodePublishVolumeRequest(
            volume_id=pv.volume_handle,
            target_path=str(self.target_path(pod, pv.name)),
            volume_capability=VolumeCapability(
                mount=VolumeCapabilityMountVolume(
                    fs_type=pv.fs_type, mount_flags=list(pv.mount_options)
                ),
                access_mode=VolumeCapabilityAccessMode(mode=mode),
            ),
            readonly=readonly,
            volume_context=self.pv_volume_context(pod, pv),
        )

    def build_publish_request(
        self,
        pod: Pod,
        volume_name: str,
        volume_attributes: Mapping[str, str] | None = None,
        readonly: bool = False,
        fs_type: str = "",
        *,
        node_capabilities: frozenset[NodeServiceCapabilityRpcType] = frozenset(),
        fs_group: int | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> NodePublishVolumeRequest:
        """The NodePublishVolumeRequest kubelet sends, given the driver's node capabilities."""
        # Inline volumes are ReadWriteOnce; kubelet maps that to
        # SINGLE_NODE_MULTI_WRITER when the driver advertises it.
        mode = (
            VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER
            if NodeServiceCapabilityRpcType.SINGLE_NODE_MULTI_WRITER in node_capabilities
            else VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER
        )
        mount = VolumeCapabilityMountVolume(fs_type=fs_type, mount_flags=[])
        if fs_group is not None and NodeServiceCapabilityRpcType.VOLUME_MOUNT_GROUP in (
            node_capabilities
        ):
            mount.volume_mount_group = str(fs_group)
        return NodePublishVolumeRequest(
            volume_id=self.volume_id(pod, volume_name),
            target_path=str(self.target_path(pod, volume_name)),
            volume_capability=VolumeCapability(
                mount=mount, access_mode=VolumeCapabilityAccessMode(mode=mode)
            ),
            readonly=readonly,
            secrets=dict(secrets or {}),
            volume_context=self.volume_context(pod, volume_attributes or {}),
        )

    # ---------------------------------------------------------------- RPCs

    def call(
        self,
        method: str,
        request: betterproto2.Message,
        response_type: type[M],
        timeout: float | None = None,
    ) -> M:
        """One unary RPC on a fresh connection, like kubelet's newGrpcConn + defer Close."""
        self.calls.append((method, request))
        try:
            return self._client.call(method, request, response_type, timeout)
        except grpc.RpcError as e:
            raise CsiError(e.code(), e.details() or "", method) from None

    def get_plugin_info(self) -> GetPluginInfoResponse:
        return self.call(
            "/csi.v1.Identity/GetPluginInfo", GetPluginInfoRequest(), GetPluginInfoResponse
        )

    def probe(self, timeout: float | None = None) -> ProbeResponse:
        return self.call("/csi.v1.Identity/Probe", ProbeRequest(), ProbeResponse, timeout)

    def node_get_info(self) -> NodeGetInfoResponse:
        return self.call("/csi.v1.Node/NodeGetInfo", NodeGetInfoRequest(), NodeGetInfoResponse)

    def node_get_capabilities(self) -> NodeGetCapabilitiesResponse:
        return self.call(
            "/csi.v1.Node/NodeGetCapabilities",
            NodeGetCapabilitiesRequest(),
            NodeGetCapabilitiesResponse,
        )

    def node_capabilities(self) -> frozenset[NodeServiceCapabilityRpcType]:
        caps = self.node_get_capabilities().capabilities
        return frozenset(c.rpc.type for c in caps if c.rpc is not None)

    def register(self) -> NodeGetInfoResponse:
        """What node-driver-registrar and kubelet's plugin registration ask the driver."""
        info = self.get_plugin_info()
        if info.name != self.driver_name:
            raise RuntimeError(f"driver calls itself {info.name!r}, expected {self.driver_name!r}")
        return self.node_get_info()

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Poll Probe until it succeeds with ready unset or true (livenessprobe's rule)."""
        deadline = time.monotonic() + timeout
        last: str = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"CSI driver at {self.csi_endpoint} not ready: {last}")
            try:
                response = self.probe(timeout=min(self.rpc_timeout, max(remaining, 0.05)))
            except CsiError as e:
                last = str(e)
            else:
                if response.ready is not False:
                    return
                last = "driver responded but is not ready"
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))

    # ---------------------------------------------------------------- volumes

    def _with_retries(self, attempt: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_timeout
        delay = self.backoff_initial
        while True:
            try:
                return attempt()
            except CsiError as e:
                if e.final or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def publish(
        self,
        pod: Pod,
        volume_name: str,
        volume_attributes: Mapping[str, str] | None = None,
        readonly: bool = False,
        fs_type: str = "",
        *,
        fs_group: int | None = None,
        secrets: Mapping[str, str] | None = None,
        retries: bool = True,
    ) -> PublishedVolume:
        """Mount an inline CSI volume for `pod` (kubelet's csiMountMgr.SetUpAt, with retries).

        Raises CsiError on a final error (after removing the mount dir, as
        kubelet does) or when non-final errors outlast `retry_timeout`.
        Without `retries`, a single SetUpAt.
        """
        target = self.target_path(pod, volume_name)

        def attempt() -> PublishedVolume:
            os.makedirs(target.parent, mode=0o750, exist_ok=True)
            self.node_capabilities()  # VOLUME_MOUNT_GROUP check in SetUpAt
            self.write_vol_data(pod, volume_name)
            caps = self.node_capabilities()  # SINGLE_NODE_MULTI_WRITER check in the client
            request = self.build_publish_request(
                pod,
                volume_name,
                volume_attributes,
                readonly,
                fs_type,
                node_capabilities=caps,
                fs_group=fs_group,
                secrets=secrets,
            )
            self._publish_or_remove_mount_dir(target, request)
            return PublishedVolume(pod, volume_name, request.volume_id, target, request)

        return self._with_retries(attempt) if retries else attempt()

    def mount_device(self, pv: PersistentVolume) -> Path:
        """csiAttacher.MountDevice without STAGE_UNSTAGE_VOLUME: metadata, no RPC but the check."""
        caps = self.node_capabilities()
        device_path = self.device_mount_path(pv.volume_handle)
        os.makedirs(device_path, mode=0o750, exist_ok=True)
        self._write_json(
            device_path.parent / VOL_DATA_FILE,
            {"volumeHandle": pv.volume_handle, "driverName": self.driver_name},
        )
        if NodeServiceCapabilityRpcType.STAGE_UNSTAGE_VOLUME in caps:
            raise NotImplementedError("this emulator does not stage volumes")
        return device_path

    def unmount_device(self, volume_handle: str) -> None:
        """csiAttacher.UnmountDevice without STAGE_UNSTAGE_VOLUME: removeMountDir(globalmount)."""
        self.node_capabilities()
        self.remove_mount_dir(self.device_mount_path(volume_handle))

    def publish_pv(
        self,
        pod: Pod,
        pv: PersistentVolume,
        readonly: bool = False,
        *,
        retries: bool = True,
    ) -> PublishedVolume:
        """Set up a PV-backed volume of `pod`: MountDevice if the node has no pod of
        it yet, then csiMountMgr.SetUpAt. readonly is the pod's
        persistentVolumeClaim.readOnly. Errors as for publish()."""
        with self._device_lock:
            users = self._device_users.setdefault(pv.volume_handle, set())
            if not users:
                self.mount_device(pv)
            users.add(pod.uid)
        target = self.target_path(pod, pv.name)

        def attempt() -> PublishedVolume:
            # NewMounter: the volume dir and vol_data.json, before SetUpAt.
            os.makedirs(target.parent, mode=0o750, exist_ok=True)
            self._write_json(target.parent / VOL_DATA_FILE, self.pv_vol_data(pv))
            self.node_capabilities()  # NodeSupportsStageUnstage: no deviceMountPath
            os.makedirs(target.parent, mode=0o750, exist_ok=True)
            self.node_capabilities()  # VOLUME_MOUNT_GROUP check
            caps = self.node_capabilities()  # the access-mode mapper in the client
            request = self.build_pv_publish_request(pod, pv, readonly, node_capabilities=caps)
            self._publish_or_remove_mount_dir(target, request)
            return PublishedVolume(pod, pv.name, request.volume_id, target, request)

        try:
            return self._with_retries(attempt) if retries else attempt()
        except BaseException:
            # The pod gives up on the volume here; kubelet would UnmountDevice
            # once no pod of the node wants it, which for a test is now.
            self._release_device(pod, pv.volume_handle)
            raise

    def _release_device(self, pod: Pod, handle: str) -> None:
        """The pod no longer uses the PV; after the node's last one, UnmountDevice."""
        with self._device_lock:
            users = self._device_users.get(handle)
            if users is None:
                return
            users.discard(pod.uid)
            if users:
                return
            del self._device_users[handle]
            self.unmount_device(handle)

    def publish_volumes(
        self,
        pod: Pod,
        volumes: Sequence[VolumeRequest],
        *,
        timeout: float | None = None,
        retry_final: bool = True,
        on_published: Callable[[PublishedVolume], None] | None = None,
        before: Mapping[str, Callable[[], object]] | None = None,
    ) -> dict[str, PublishedVolume]:
        """Set up all of a pod's volumes at once, as the volume manager does.

        One thread per volume, started in a random order (self.rng); each
        retries its SetUpAt with exponential backoff (backoff_initial,
        doubling, capped at backoff_max) for up to `timeout` seconds
        (retry_timeout by default): non-final errors always, final ones with
        `retry_final` (the reconciler retries those too). `before` maps other
        volume names (emptyDirs) to their SetUp, run in the same random mix.
        `on_published` is called for each volume as it succeeds. Returns the
        published volumes by name; raises the first error, in spec order, of
        any volume that never succeeded, after every thread has finished.
        """
        timeout = self.retry_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        published: dict[str, PublishedVolume] = {}
        errors: dict[str, BaseException] = {}
        lock = threading.Lock()

        def set_up(volume: VolumeRequest) -> None:
            delay = self.backoff_initial
            while True:
                try:
                    if volume.pv is not None:
                        result = self.publish_pv(pod, volume.pv, volume.readonly, retries=False)
                    else:
                        result = self.publish(
                            pod, volume.name, volume.attributes, volume.readonly, retries=False
                        )
                except CsiError as e:
                    if (e.final and not retry_final) or time.monotonic() + delay > deadline:
                        with lock:
                            errors[volume.name] = e
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                except BaseException as e:
                    with lock:
                        errors[volume.name] = e
                    return
                with lock:
                    published[volume.name] = result
                if on_published is not None:
                    on_published(result)
                return

        def run_other(name: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except BaseException as e:
                with lock:
                    errors[name] = e

        jobs: list[tuple[str, Callable[[], None]]] = [(v.name, partial(set_up, v)) for v in volumes]
        jobs += [(name, partial(run_other, name, fn)) for name, fn in (before or {}).items()]
        self.rng.shuffle(jobs)
        threads = [
            threading.Thread(target=job, name=f"volume-{name}", daemon=True) for name, job in jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        order = [*(v.name for v in volumes), *(before or {})]
        for name in order:
            if name in errors:
                raise errors[name]
        return published

    def unpublish(self, pod: Pod, volume_name: str, *, strict: bool = True) -> bool:
        """Unmount an inline CSI volume (csiMountMgr.TearDownAt + removeMountDir).

        Returns whether the mount dir was removed. If the driver said OK but
        the target is still a mount point kubelet leaves everything in place;
        so does this, and with `strict` it raises StillMountedError.
        """
        target = self.target_path(pod, volume_name)
        volume_id = self.volume_id(pod, volume_name)
        # The unmounter is built from vol_data.json (NewUnmounter), which for
        # a PV holds its volumeHandle.
        data_file = target.parent / VOL_DATA_FILE
        vol_data: dict[str, str] = {}
        if data_file.exists():
            vol_data = json.loads(data_file.read_text())
            volume_id = vol_data.get("volumeHandle", volume_id)
        request = NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        self._with_retries(
            lambda: self.call(
                "/csi.v1.Node/NodeUnpublishVolume", request, NodeUnpublishVolumeResponse
            )
        )
        removed = self.remove_mount_dir(target)
        if not removed and strict:
            raise StillMountedError(f"{target} is still a mount point after NodeUnpublishVolume")
        if vol_data.get("volumeLifecycleMode") == "Persistent":
            self._release_device(pod, volume_id)
        return removed

    def _publish_or_remove_mount_dir(self, target: Path, request: NodePublishVolumeRequest) -> None:
        """NodePublishVolume; a final error removes the mount dir (csiMountMgr.SetUpAt)."""
        try:
            self.call("/csi.v1.Node/NodePublishVolume", request, NodePublishVolumeResponse)
        except CsiError as e:
            if e.final:
                self.remove_mount_dir(target)
            raise

    def remove_mount_dir(self, target: Path) -> bool:
        """kubelet's removeMountDir. Returns False (and removes nothing) if still mounted.

        Its isDirMounted is mount-utils' IsLikelyNotMountPoint: stat() of the
        target, which follows into whatever is mounted there (a live FUSE
        daemon is asked; a hung one would hang kubelet), against lstat() of
        its parent; a different st_dev is a mount. A stat error other than
        ENOENT (ENOTCONN on a dead FUSE mount) fails the teardown, which
        kubelet retries: here, False. A bind mount from the same filesystem
        has the same st_dev and passes; the rmdir then fails with EBUSY,
        which fails kubelet's teardown too: here, OSError.
        """
        try:
            mounted = os.stat(target).st_dev != os.lstat(target.parent).st_dev
        except FileNotFoundError:
            mounted = False
        except OSError:
            return False
        if mounted:
            return False
        for remove, path in (
            (os.rmdir, target),
            (os.unlink, target.parent / VOL_DATA_FILE),
            (os.rmdir, target.parent),
        ):
            try:
                remove(path)
            except FileNotFoundError:
                pass
        return True

    def cleanup_pod_dirs(self, pod: Pod) -> bool:
        """Remove the pod's now-empty volume dirs and pod dir, rmdir only.

        Returns False if something is left (a volume that was not unpublished).
        """
        pod_dir = self.pod_dir(pod)
        for d in (
            pod_dir / "volumes" / escape_qualified_name(CSI_PLUGIN_NAME),
            pod_dir / "volumes",
            pod_dir,
        ):
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    return False
                raise
        return True
