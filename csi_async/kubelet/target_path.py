"""The target path kubelet gives NodePublishVolume, parsed once.

The driver never mounts anywhere else, so only the exact shape kubelet uses
for a CSI volume is accepted (see layout.py): a path with '..', a symlink
name, another plugin's directory or a pod UID that is not a UUID is refused
before anything touches the filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from csi_async.kubelet import layout
from csi_async.kubelet.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class TargetPath:
    """A kubelet target path, taken apart."""

    absolute: str
    relative: str  # below the kubelet root
    pod_uid: str
    # kubelet's spec name: the pod's volume name (inline) or the PV's name.
    volume_name: str

    @property
    def parent_relative(self) -> str:
        """The volume's directory, which kubelet creates (the target's parent)."""
        return self.relative.rpartition("/")[0]

    @property
    def name(self) -> str:
        """The target's own name in its parent, the one directory the driver creates."""
        return self.relative.rpartition("/")[2]


def parse_target_path(kubelet_root: str, target_path: str) -> TargetPath:
    """Accept exactly <root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount.

    <name> is a DNS label (a pod's volume) or a DNS subdomain (a PV); which
    of the two the request is, is checked with its volume context
    (csi_async.kubelet.volume_kind).
    """
    pattern = rf"^{re.escape(kubelet_root)}/({layout.CSI_TARGET.pattern})$"
    match = re.match(pattern, target_path)
    if match is None:
        raise InvalidRequest(
            f"target_path {target_path!r} is not a kubelet CSI volume path "
            f"({kubelet_root}/{layout.csi_target('<pod uid>', '<volume>')})"
        )
    name = match.group("name")
    if len(name) > layout.MAX_PV_NAME:
        raise InvalidRequest(
            f"target_path names a volume longer than {layout.MAX_PV_NAME} characters"
        )
    return TargetPath(target_path, match.group(1), match.group("uid"), name)
