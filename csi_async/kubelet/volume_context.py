"""The volume context kubelet gives NodePublishVolume, parsed once.

Two kinds of keys arrive in it: the volumeAttributes of the volume (written
by the pod's author for an inline volume, by an administrator in a
PersistentVolume's spec.csi.volumeAttributes), and the pod-info keys kubelet
adds for a CSIDriver with podInfoOnMount (csi.storage.k8s.io/*). For an
inline ephemeral volume kubelet also derives the volume id from the pod and
the volume's name (ephemeral_volume_id); volume_kind.py checks a request
against its own target with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from csi_async import logs
from csi_async.kubelet import layout
from csi_async.kubelet.errors import InvalidRequest

POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
POD_NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
POD_NAME_KEY = "csi.storage.k8s.io/pod.name"
SERVICE_ACCOUNT_KEY = "csi.storage.k8s.io/serviceAccount.name"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
# Bound service-account tokens; kubelet may put them in volume_context.
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"

MAX_CONTEXT_BYTES = 64 * 1024

DNS_LABEL = re.compile(rf"^{layout.VOLUME_NAME}$")
# What socketFor names: a pod volume (a DNS label) or, for a FUSE volume
# from a PersistentVolume, the PV's name (a DNS subdomain), both exactly as
# kubelet puts them in the target path.
SPEC_NAME = re.compile(rf"^{layout.PV_NAME}$")
# A file name for meta-fuse's socket: one path component, no hidden tricks.
# At most 80 characters: the broker binds it as /proc/self/fd/<dirfd>/<name>
# (the pod's directory is never named by path), and a Unix socket path holds
# 107 bytes: 14 for "/proc/self/fd/", up to 7 for the fd number, 1 for "/".
_SOCKET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")


class VolumeAttributes(BaseModel):
    """volumeAttributes a volume may set, plus the pod-info keys kubelet adds.

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
    socket_for: Annotated[
        str | None,
        Field(alias="socketFor", pattern=SPEC_NAME.pattern, max_length=layout.MAX_PV_NAME),
    ] = None

    pod_name: Annotated[str | None, Field(alias=POD_NAME_KEY)] = None
    pod_namespace: Annotated[str | None, Field(alias=POD_NAMESPACE_KEY)] = None
    pod_uid: Annotated[str | None, Field(alias=POD_UID_KEY)] = None
    service_account: Annotated[str | None, Field(alias=SERVICE_ACCOUNT_KEY)] = None
    ephemeral: Annotated[str | None, Field(alias=EPHEMERAL_KEY)] = None
    tokens: Annotated[str | None, Field(alias=TOKENS_KEY, repr=False)] = None

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


def parse_volume_context(context: Mapping[str, str]) -> VolumeAttributes:
    """The volume context as VolumeAttributes, or InvalidRequest naming the first problem."""
    if sum(len(k) + len(v) for k, v in context.items()) > MAX_CONTEXT_BYTES:
        raise InvalidRequest("volume_context is too large")
    try:
        return VolumeAttributes.model_validate(dict(context))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "volume_context"
        raise InvalidRequest(f"volumeAttributes: {where}: {first['msg']}") from None


def ephemeral_volume_id(pod_uid: str, volume_name: str) -> str:
    """The volume handle kubelet derives for an inline volume (makeVolumeHandle)."""
    return "csi-" + hashlib.sha256((pod_uid + volume_name).encode()).hexdigest()


def without_tokens(context: Mapping[str, str]) -> dict[str, str]:
    """The context minus service-account tokens: never stored, never compared."""
    return {k: v for k, v in context.items() if k != TOKENS_KEY}


def pod_fields(context: Mapping[str, str]) -> dict[str, str]:
    """The log fields naming the pod, from the pod-info keys."""
    fields = {}
    for log_key, context_key in (
        (logs.POD_UID, POD_UID_KEY),
        (logs.POD_NAMESPACE, POD_NAMESPACE_KEY),
        (logs.POD_NAME, POD_NAME_KEY),
    ):
        if context_key in context:
            fields[log_key] = context[context_key]
    return fields
