"""What one broker serves: its volume's target, and the names it is logged by."""

from __future__ import annotations

from dataclasses import dataclass

from csi_async import logs


@dataclass(frozen=True, slots=True)
class VolumeTarget:
    """Where this volume's FUSE mount goes, relative to the pinned kubelet root."""

    relative: str
    absolute: str
    pod_uid: str
    pod_namespace: str
    pod_name: str
    volume_name: str
    volume_id: str
    read_only: bool
    # From a PersistentVolume: its options are an administrator's (policy/options.py).
    persistent: bool
    options: tuple[str, ...]

    @property
    def parent_and_name(self) -> tuple[str, str]:
        """The target's parent (relative to the root) and its name in it."""
        parent, _, name = self.relative.rpartition("/")
        return parent, name

    def log_fields(self) -> dict[str, str]:
        """The fields every log and audit line about this volume carries."""
        return {
            logs.VOLUME_ID: self.volume_id,
            logs.TARGET: self.absolute,
            logs.POD_UID: self.pod_uid,
            logs.POD_NAMESPACE: self.pod_namespace,
            logs.POD_NAME: self.pod_name,
        }
