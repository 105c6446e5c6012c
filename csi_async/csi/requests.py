"""What a valid NodePublishVolume / NodeUnpublishVolume request is.

Policy only: these functions read a request and either return a clean,
typed description of it or raise InvalidRequest with a message for the pod's
author. Nothing here touches the filesystem.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from csi_async import logs
from csi_async._proto.csi import v1 as csi
from csi_async.broker.policy import NodePolicy, OptionRefused, check_options
from fusermount3_proxy.protocol import split_options

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Pod volume names are DNS labels (RFC 1123), which kubelet does not escape.
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
DNS_LABEL = re.compile(rf"^{_DNS_LABEL}$")
# A file name for meta-fuse's socket: one path component, no hidden tricks.
# At most 80 characters: the broker binds it as /proc/self/fd/<dirfd>/<name>
# (the pod's directory is never named by path), and a Unix socket path holds
# 107 bytes: 14 for "/proc/self/fd/", up to 7 for the fd number, 1 for "/".
_SOCKET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")

_ALLOWED_MODES = {
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER,
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_READER_ONLY,
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_SINGLE_WRITER,
    csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER,
}
_READ_ONLY_MODES = {csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_READER_ONLY}

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
MAX_VOLUME_ID = 128
MAX_CONTEXT_BYTES = 64 * 1024


class InvalidRequest(Exception):
    """The request is malformed or asks for something unsupported (INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class TargetPath:
    """A kubelet target path, taken apart."""

    absolute: str
    relative: str  # below the kubelet root
    pod_uid: str
    volume_name: str

    @property
    def parent_relative(self) -> str:
        return self.relative.rpartition("/")[0]


def parse_target_path(kubelet_root: str, target_path: str) -> TargetPath:
    """Accept exactly <root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount."""
    pattern = (
        rf"^{re.escape(kubelet_root)}/(pods/(?P<uid>{_UUID})/volumes/kubernetes\.io~csi/"
        rf"(?P<name>{_DNS_LABEL})/mount)$"
    )
    match = re.match(pattern, target_path)
    if match is None:
        raise InvalidRequest(
            f"target_path {target_path!r} is not a kubelet CSI volume path "
            f"({kubelet_root}/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount)"
        )
    return TargetPath(target_path, match.group(1), match.group("uid"), match.group("name"))


def ephemeral_volume_id(pod_uid: str, volume_name: str) -> str:
    """The volume handle kubelet derives for an inline volume (makeVolumeHandle)."""
    return "csi-" + hashlib.sha256((pod_uid + volume_name).encode()).hexdigest()


class VolumeAttributes(BaseModel):
    """volumeAttributes a pod may set, plus the pod-info keys kubelet adds.

    Unknown keys are refused so that a typo fails loudly instead of
    silently mounting something other than what was meant.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # meta-fuse-csi-plugin compatibility: the socket goes into this emptyDir.
    fd_passing_empty_dir_name: Annotated[
        str | None, Field(alias="fdPassingEmptyDirName", pattern=DNS_LABEL.pattern)
    ] = None
    fd_passing_socket_name: Annotated[
        str | None, Field(alias="fdPassingSocketName", pattern=_SOCKET_NAME.pattern)
    ] = None
    # Options applied to the FUSE mount (meta-fuse accepts "o=<opt>" items).
    mount_options: Annotated[str | None, Field(alias="mountOptions", max_length=4096)] = None
    # Native mode: this volume is the broker socket directory for that FUSE volume.
    socket_for: Annotated[str | None, Field(alias="socketFor", pattern=DNS_LABEL.pattern)] = None

    pod_name: Annotated[str | None, Field(alias="csi.storage.k8s.io/pod.name")] = None
    pod_namespace: Annotated[str | None, Field(alias="csi.storage.k8s.io/pod.namespace")] = None
    pod_uid: Annotated[str | None, Field(alias="csi.storage.k8s.io/pod.uid")] = None
    service_account: Annotated[
        str | None, Field(alias="csi.storage.k8s.io/serviceAccount.name")
    ] = None
    ephemeral: Annotated[str | None, Field(alias="csi.storage.k8s.io/ephemeral")] = None
    tokens: Annotated[str | None, Field(alias=logs.TOKENS_KEY, repr=False)] = None

    @model_validator(mode="after")
    def _consistent(self) -> VolumeAttributes:
        if (self.fd_passing_empty_dir_name is None) != (self.fd_passing_socket_name is None):
            raise ValueError("fdPassingEmptyDirName and fdPassingSocketName must be set together")
        if self.fd_passing_socket_name in (".", ".."):
            raise ValueError("fdPassingSocketName must be a file name")
        if self.socket_for is not None and (
            self.fd_passing_empty_dir_name is not None or self.mount_options is not None
        ):
            raise ValueError("socketFor cannot be combined with the FUSE volume attributes")
        return self


@dataclass(frozen=True, slots=True)
class PublishSpec:
    """A validated NodePublishVolume request."""

    volume_id: str
    target: TargetPath
    read_only: bool
    access_mode: int
    attributes: VolumeAttributes
    mount_options: tuple[str, ...]
    kind: Literal["fuse", "socket"]
    # What makes two publishes "the same arguments" (idempotency); excludes
    # tokens and secrets, which kubelet refreshes on every republish.
    fingerprint: str


def _mount_options(
    attrs: VolumeAttributes, mount_flags: list[str], policy: NodePolicy
) -> list[str]:
    tokens: list[str] = []
    for item in [*split_options(attrs.mount_options or ""), *mount_flags]:
        # meta-fuse writes options as "o=noexec"; plain "noexec" works too.
        tokens.append(item.removeprefix("o="))
    try:
        check_options(tokens, policy)
    except OptionRefused as err:
        raise InvalidRequest(f"mountOptions: {err.message}") from None
    return tokens


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
    if sum(len(k) + len(v) for k, v in context.items()) > MAX_CONTEXT_BYTES:
        raise InvalidRequest("volume_context is too large")
    try:
        attrs = VolumeAttributes.model_validate(context)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "volume_context"
        raise InvalidRequest(f"volumeAttributes: {where}: {first['msg']}") from None

    if attrs.ephemeral != "true":
        raise InvalidRequest(
            "only inline ephemeral volumes are supported "
            f"(volume_context[{EPHEMERAL_KEY!r}] must be 'true'; is podInfoOnMount enabled?)"
        )
    expected_id = ephemeral_volume_id(target.pod_uid, target.volume_name)
    if request.volume_id != expected_id:
        raise InvalidRequest(
            f"volume_id {request.volume_id!r} does not belong to target_path "
            f"(expected {expected_id!r})"
        )
    if attrs.pod_uid is not None and attrs.pod_uid != target.pod_uid:
        raise InvalidRequest("csi.storage.k8s.io/pod.uid does not match the pod in target_path")
    if attrs.socket_for is not None and attrs.socket_for == target.volume_name:
        raise InvalidRequest("socketFor must name another volume of the pod")

    options = _mount_options(attrs, list(capability.mount.mount_flags), policy)
    read_only = request.readonly or mode in _READ_ONLY_MODES
    fingerprint_context = {k: v for k, v in sorted(context.items()) if k != logs.TOKENS_KEY}
    fingerprint = repr(
        (
            request.volume_id,
            read_only,
            int(mode),
            capability.mount.fs_type,
            tuple(capability.mount.mount_flags),
            tuple(fingerprint_context.items()),
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
