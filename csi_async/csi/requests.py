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
    parse_volume_context,
    without_tokens,
)
from csi_async.kubelet.volume_kind import VolumeKind, volume_kind
from csi_async.policy.node import NodePolicy
from csi_async.policy.options import OptionRefused, volume_options
from csi_async.volumes.spec import PublishSpec
from csi_async.volumes.state import VolumeRecord

_Mode = csi.VolumeCapabilityAccessModeMode
# What kubelet sends for an inline volume (always ReadWriteOnce) and for a
# PV's first access mode (docs/design.md says what each means here). Every
# pod's FUSE program serves its own mount, so many nodes are no harder than one.
_SINGLE_NODE_MODES = {
    _Mode.SINGLE_NODE_WRITER,
    _Mode.SINGLE_NODE_READER_ONLY,
    _Mode.SINGLE_NODE_SINGLE_WRITER,
    _Mode.SINGLE_NODE_MULTI_WRITER,
}
_MULTI_NODE_MODES = {
    _Mode.MULTI_NODE_READER_ONLY,
    _Mode.MULTI_NODE_SINGLE_WRITER,
    _Mode.MULTI_NODE_MULTI_WRITER,
}
_ALLOWED_MODES: dict[VolumeKind, set[_Mode]] = {
    "inline": _SINGLE_NODE_MODES,
    "persistent": _SINGLE_NODE_MODES | _MULTI_NODE_MODES,
}
_READ_ONLY_MODES = {_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY}

# The CSI spec's size limit for an id, in bytes.
MAX_VOLUME_ID = 128


def _mount_options(
    attrs: VolumeAttributes, mount_flags: list[str], policy: NodePolicy, origin: VolumeKind
) -> list[str]:
    try:
        return volume_options(
            attrs.mount_options or "", mount_flags, policy, administrator=origin == "persistent"
        )
    except OptionRefused as err:
        raise InvalidRequest(f"mountOptions: {err.message}") from None


def _check_volume_id(volume_id: str) -> None:
    if not volume_id:
        raise InvalidRequest("volume_id is required")
    if len(volume_id.encode()) > MAX_VOLUME_ID:
        raise InvalidRequest(f"volume_id is longer than {MAX_VOLUME_ID} bytes")


def validate_publish(
    request: csi.NodePublishVolumeRequest, kubelet_root: str, policy: NodePolicy
) -> PublishSpec:
    _check_volume_id(request.volume_id)
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
    if request.staging_target_path:
        raise InvalidRequest("staging_target_path must be empty (NodeStageVolume is not supported)")

    target = parse_target_path(kubelet_root, request.target_path)
    context = dict(request.volume_context)
    attrs = parse_volume_context(context)
    # Inline or a PV: what the volume may do depends on who wrote it.
    origin = volume_kind(request.volume_id, target, attrs)
    if mode not in _ALLOWED_MODES[origin]:
        allowed = "single-node modes only" if origin == "inline" else "single- and multi-node modes"
        raise InvalidRequest(
            f"access mode {mode!r} is not supported for {origin} volumes ({allowed})"
        )

    options = _mount_options(attrs, list(capability.mount.mount_flags), policy, origin)
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
        persistent=origin == "persistent",
        fingerprint=fingerprint,
    )


def validate_unpublish(request: csi.NodeUnpublishVolumeRequest, kubelet_root: str) -> TargetPath:
    """The target to unpublish. kubelet sends the volume_id from vol_data.json, which
    for a PV is its volumeHandle: whether it is the id published at the target is
    for the registry to check (VolumeManager.unpublish)."""
    _check_volume_id(request.volume_id)
    if not request.target_path:
        raise InvalidRequest("target_path is required")
    return parse_target_path(kubelet_root, request.target_path)


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
