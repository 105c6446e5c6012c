"""Where kubelet puts a pod's volumes: the one place that knows its directory layout.

Below kubelet's root directory (--root-dir, /var/lib/kubelet):

    pods/<pod uid>/volumes/kubernetes.io~csi/<spec name>/mount      a CSI volume's target path
    pods/<pod uid>/volumes/kubernetes.io~empty-dir/<volume name>     an emptyDir volume

<spec name> is the pod's volume name for an inline volume and the
PersistentVolume's name for a PV (kubelet's specVolID, escaped with
EscapeQualifiedName, which changes nothing in a name the API accepts).

kubelet creates everything down to <volume name> and hands the driver the
whole target path; the driver creates (and removes) only the last component.
"""

from __future__ import annotations

import re

# Pod UIDs are UUIDs as the API spells them.
POD_UID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Pod volume names are DNS labels (RFC 1123), which kubelet does not escape.
VOLUME_NAME = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
# PersistentVolume names are DNS subdomains: dot-separated labels, at most
# 253 characters in all (checked apart from the pattern, see MAX_PV_NAME).
PV_NAME = rf"{VOLUME_NAME}(?:\.{VOLUME_NAME})*"
MAX_PV_NAME = 253

# A CSI target path relative to the kubelet root, taken apart by name. Its
# name is either kind's: the request's volume context says which it is.
CSI_TARGET = re.compile(
    rf"pods/(?P<uid>{POD_UID})/volumes/kubernetes\.io~csi/(?P<name>{PV_NAME})/mount"
)


def csi_target(pod_uid: str, volume_name: str) -> str:
    """A CSI volume's target path relative to the kubelet root (the shape CSI_TARGET matches)."""
    return f"pods/{pod_uid}/volumes/kubernetes.io~csi/{volume_name}/mount"


def empty_dir(pod_uid: str, volume_name: str) -> str:
    """An emptyDir volume's directory relative to the kubelet root."""
    return f"pods/{pod_uid}/volumes/kubernetes.io~empty-dir/{volume_name}"
