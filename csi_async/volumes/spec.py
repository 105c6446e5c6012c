"""What the registry publishes: a NodePublishVolume request, validated.

csi_async.csi.requests makes one from a request (or from a volume record
after a restart); everything below the CSI service works from it and never
from the raw request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csi_async.kubelet.target_path import TargetPath
from csi_async.kubelet.volume_context import VolumeAttributes


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
    # From a PersistentVolume (its options are an administrator's), not inline.
    persistent: bool
    # What makes two publishes "the same arguments" (idempotency); excludes
    # tokens and secrets, which kubelet refreshes on every republish.
    fingerprint: str
