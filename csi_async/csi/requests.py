"""What a valid NodePublishVolume / NodeUnpublishVolume request is.

Only CSI's own rules live here: ids, capabilities, access modes, staging.
What kubelet put into the request is parsed by csi_async.kubelet (the target
path, the volume context), and the mount options are checked by
csi_async.policy. These functions read a request and either return a clean,
typed description of it or raise InvalidRequest with a message for the pod's
author. Nothing here touches the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass

from csi_async._proto.csi import v1 as csi
from csi_async.kubelet.errors import InvalidRequest
from csi_async.kubelet.target_path import TargetPath, parse_target_path
from csi_async.kubelet.volume_context import (
    VolumeAttributes,
    check_inline_volume,
    ephemeral_volume_id,
    parse_volume_context,
    without_tokens,
)
from csi_async.policy.node import NodePolicy
from csi_async.policy.options import OptionRefused, volume_options
from csi_async.volumes.spec import PublishSpec
from csi_async.volumes.state import VolumeRecord

_ALLOWED_MODES = {
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER,
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_READER_ONLY,
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_SINGLE_WRITER,
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER,
}
_READ_ONLY_MODES = {csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_READER_ONLY}

MAX_VOLUME_ID = 128


def _mount_options(
    attrs: VolumeAttributes, mount_flags: list[str], policy: NodePolicy
) -> list[str]:
    try:
        return volume_options(attrs.mount_options or "", mount_flags, policy)
    except OptionRefused as err:
        raise InvalidRequest(f"mountOptions: {err.message}") from None


def validate_publish(
    request: csi.NodePublishVolumeRequest, kubelet_root: str, policy: NodePolicy
) -> PublishSpec:
    if not request.volume_id:
        raise InvalidRequest("volume_id is required")
    if len(request.volume_id) > MAX_VOLUME_ID:
        raise InvalidRequest(f"volume_id is longer than {MAX_VOLUME_ID} characters")
    if not request.target_path:
        raise InvalidRequest("target_path is required")
    capability = request.volume_capability
    if capability is None:
        raise InvalidRequest("volume_capability is required")
    if capability.block is not None:
        raise InvalidRequest("block access is not supported: FUSE volumes are filesystems")
    if capability.mount is None:
        raise InvalidRequest("volume_capability.mount is required")
    if capability.mount.fs_type not in ("", "fuse"):
        raise InvalidRequest(
            f"fs_type {capability.mount.fs_type!r} is not supported (leave it empty)"
        )
    if capability.access_mode is None:
        raise InvalidRequest("volume_capability.access_mode is required")
    mode = capability.access_mode.mode
    if mode not in _ALLOWED_MODES:
        raise InvalidRequest(f"access mode {mode!r} is not supported (single-node modes only)")
    if request.staging_target_path:
        raise InvalidRequest("staging_target_path must be empty (NodeStageVolume is not supported)")

    target = parse_target_path(kubelet_root, request.target_path)
    context = dict(request.volume_context)
    attrs = parse_volume_context(context)
    check_inline_volume(request.volume_id, target, attrs)

    options = _mount_options(attrs, list(capability.mount.mount_flags), policy)
    read_only = request.readonly or mode in _READ_ONLY_MODES
    fingerprint = repr(
        (
            request.volume_id,
            read_only,
            int(mode),
            capability.mount.fs_type,
            tuple(capability.mount.mount_flags),
            tuple(sorted(without_tokens(context).items())),
        )
    )
    return PublishSpec(
        volume_id=request.volume_id,
        target=target,
        read_only=read_only,
        access_mode=int(mode),
        attributes=attrs,
        mount_options=tuple(options),
        kind="socket" if attrs.socket_for is not None else "fuse",
        fingerprint=fingerprint,
    )


def validate_unpublish(request: csi.NodeUnpublishVolumeRequest, kubelet_root: str) -> TargetPath:
    if not request.volume_id:
        raise InvalidRequest("volume_id is required")
    if not request.target_path:
        raise InvalidRequest("target_path is required")
    target = parse_target_path(kubelet_root, request.target_path)
    if request.volume_id != ephemeral_volume_id(target.pod_uid, target.volume_name):
        raise InvalidRequest("volume_id does not belong to target_path")
    return target


@dataclass(frozen=True, slots=True)
class RecordValidator:
    """Validates a volume record from before a restart exactly like a new NodePublishVolume.

    What VolumeManager.restore takes: a record that no longer passes (a
    changed kubelet root or node policy, a tampered file) raises
    InvalidRequest and is dropped.
    """

    kubelet_root: str
    policy: NodePolicy

    def __call__(self, record: VolumeRecord) -> PublishSpec:
        return validate_publish(record.request(), self.kubelet_root, self.policy)
