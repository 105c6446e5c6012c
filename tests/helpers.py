"""Building kubelet-shaped CSI requests for tests."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from csi_async._proto.csi import v1 as csi

AccessMode = csi.VolumeCapabilityAccessModeMode


def volume_id(pod_uid: str, name: str) -> str:
    return "csi-" + hashlib.sha256((pod_uid + name).encode()).hexdigest()


def target_path(kubelet_root: Path, pod_uid: str, name: str) -> str:
    return f"{kubelet_root}/pods/{pod_uid}/volumes/kubernetes.io~csi/{name}/mount"


def pod_context(pod_uid: str, **attributes: str) -> dict[str, str]:
    return {
        **attributes,
        "csi.storage.k8s.io/pod.name": "app",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": pod_uid,
        "csi.storage.k8s.io/serviceAccount.name": "default",
        "csi.storage.k8s.io/ephemeral": "true",
    }


def publish_request(
    kubelet_root: Path,
    *,
    pod_uid: str | None = None,
    name: str = "data",
    readonly: bool = False,
    mode: AccessMode = AccessMode.SINGLE_NODE_WRITER,
    attributes: dict[str, str] | None = None,
    make_parent: bool = True,
) -> csi.NodePublishVolumeRequest:
    """A NodePublishVolume exactly as kubelet sends it for an inline volume."""
    pod_uid = pod_uid or str(uuid.uuid4())
    target = target_path(kubelet_root, pod_uid, name)
    if make_parent:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    return csi.NodePublishVolumeRequest(
        volume_id=volume_id(pod_uid, name),
        target_path=target,
        volume_capability=csi.VolumeCapability(
            mount=csi.VolumeCapabilityMountVolume(),
            access_mode=csi.VolumeCapabilityAccessMode(mode=mode),
        ),
        readonly=readonly,
        volume_context=pod_context(pod_uid, **(attributes or {})),
    )
