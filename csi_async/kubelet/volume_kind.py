"""Which of kubelet's two kinds of CSI volume a request is, checked against its own target.

kubelet publishes a CSI volume of a pod either inline (volumes[].csi in the
pod spec, written by the pod's author) or from a PersistentVolume (written
by an administrator, bound through a PVC). With podInfoOnMount it says which
in volume_context["csi.storage.k8s.io/ephemeral"], "true" or "false", and it
merges that key after the volume's own attributes, so no volumeAttributes
can change it. What else kubelet sends follows from the kind:

    inline   target <root>/pods/<uid>/volumes/kubernetes.io~csi/<pod volume>/mount
             volume_id "csi-" + sha256(<uid> + <pod volume>)   (makeVolumeHandle)
    PV       target <root>/pods/<uid>/volumes/kubernetes.io~csi/<PV name>/mount
             volume_id the PV's spec.csi.volumeHandle, any string

The kind decides what the volume may do (access modes, options), so a
request that contradicts itself is refused rather than guessed at.
"""

from __future__ import annotations

import re
from typing import Literal

from csi_async.kubelet import layout
from csi_async.kubelet.errors import InvalidRequest
from csi_async.kubelet.target_path import TargetPath
from csi_async.kubelet.volume_context import (
    EPHEMERAL_KEY,
    POD_UID_KEY,
    VolumeAttributes,
    ephemeral_volume_id,
)

VolumeKind = Literal["inline", "persistent"]

_POD_VOLUME_NAME = re.compile(rf"^{layout.VOLUME_NAME}$")


def volume_kind(volume_id: str, target: TargetPath, attrs: VolumeAttributes) -> VolumeKind:
    """The request's kind, once it is kubelet's for a volume of the pod its target names."""
    if attrs.pod_uid is not None and attrs.pod_uid != target.pod_uid:
        raise InvalidRequest(f"{POD_UID_KEY} does not match the pod in target_path")
    if attrs.socket_for is not None and attrs.socket_for == target.volume_name:
        raise InvalidRequest("socketFor must name another volume of the pod")
    inline_id = ephemeral_volume_id(target.pod_uid, target.volume_name)
    if attrs.ephemeral == "true":
        if not _POD_VOLUME_NAME.match(target.volume_name):
            raise InvalidRequest(
                f"target_path names {target.volume_name!r}, which is no pod volume name "
                f"(a DNS label), but volume_context[{EPHEMERAL_KEY!r}] says it is inline"
            )
        if volume_id != inline_id:
            raise InvalidRequest(
                f"volume_id {volume_id!r} does not belong to target_path (expected {inline_id!r})"
            )
        return "inline"
    if attrs.ephemeral == "false":
        # Only kubelet's own hash for an inline volume at this very path is
        # refused: a PV with that handle would be an inline volume in disguise.
        if volume_id == inline_id:
            raise InvalidRequest(
                "volume_id is the one kubelet derives for an inline volume at this "
                f"target_path, but volume_context[{EPHEMERAL_KEY!r}] says it is a PersistentVolume"
            )
        return "persistent"
    if attrs.ephemeral is None:
        raise InvalidRequest(
            f"volume_context[{EPHEMERAL_KEY!r}] is missing, so inline volumes and "
            "PersistentVolumes cannot be told apart (is podInfoOnMount enabled?)"
        )
    raise InvalidRequest(f"volume_context[{EPHEMERAL_KEY!r}] must be 'true' or 'false'")
