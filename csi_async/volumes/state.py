"""Published volumes on disk, so a restarted driver picks up where it left off.

One JSON file per published target under <state-dir>/volumes, written
atomically (temporary file, then rename) and never fsynced. A record
holds the NodePublishVolume arguments that matter, never secrets or tokens;
on start-up each one is validated again, exactly like a new request.

Why no fsync: the records exist for a restart of the driver process (a
crash, an OOM kill, an upgrade). A rename is atomic in the page cache, which
outlives the process, so a restarted driver reads either the old record or
the new one, never half of one. fsync would only add durability across a
power loss or kernel crash of the node, and after that every FUSE mount is
gone and kubelet publishes every volume of the node's pods again; a record
lost or resurrected by such a crash is at worst one that restore skips or
kubelet unpublishes. The fsyncs were about a third of the driver's busy
time in publish and unpublish (docs/performance.md).

Beside them, in <state-dir>/mounts, the brokers keep their mount records
(csi_async.broker.mount_records); a volume's go when the volume does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from csi_async._proto.csi import v1 as csi
from csi_async.broker.mount_records import MountRecords, record_file_name
from csi_async.kubelet.volume_context import without_tokens
from csi_async.volumes.trash import Trash

# The logger of every record the driver keeps (docs/operations.md).
log = logging.getLogger("csi_async.state")


class VolumeRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    volume_id: str
    target_path: str
    readonly: bool
    access_mode: int
    fs_type: str
    mount_flags: list[str]
    volume_context: dict[str, str]

    @classmethod
    def of(cls, request: csi.NodePublishVolumeRequest) -> VolumeRecord:
        capability = request.volume_capability
        assert capability is not None and capability.mount is not None
        assert capability.access_mode is not None
        return cls(
            volume_id=request.volume_id,
            target_path=request.target_path,
            readonly=request.readonly,
            access_mode=int(capability.access_mode.mode),
            fs_type=capability.mount.fs_type,
            mount_flags=list(capability.mount.mount_flags),
            volume_context=without_tokens(request.volume_context),
        )

    def request(self) -> csi.NodePublishVolumeRequest:
        return csi.NodePublishVolumeRequest(
            volume_id=self.volume_id,
            target_path=self.target_path,
            readonly=self.readonly,
            volume_capability=csi.VolumeCapability(
                mount=csi.VolumeCapabilityMountVolume(
                    fs_type=self.fs_type, mount_flags=list(self.mount_flags)
                ),
                access_mode=csi.VolumeCapabilityAccessMode(
                    mode=csi.VolumeCapabilityAccessModeMode(self.access_mode)
                ),
            ),
            volume_context=dict(self.volume_context),
        )


class StateStore:
    def __init__(self, state_dir: Path, trash: Trash | None = None) -> None:
        self.directory = state_dir / "volumes"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.mounts = MountRecords(state_dir)
        self._trash = trash if trash is not None else Trash(state_dir)

        # Plain strings: these paths are built on every publish and unpublish.
        self._prefix = os.path.join(self.directory, "")

    def _path(self, target_path: str) -> str:
        return self._prefix + record_file_name(target_path)

    def save(self, record: VolumeRecord) -> None:
        """Write the record atomically: a temporary file, then rename (no fsync, see above).

        Blocking: run it off the event loop.
        """
        path = self._path(record.target_path)
        temporary = f"{path[: -len('.json')]}.tmp{os.getpid()}"
        data = memoryview(record.model_dump_json().encode())
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while data:
                data = data[os.write(fd, data) :]
        except BaseException:
            os.close(fd)
            os.unlink(temporary)
            raise
        os.close(fd)
        os.replace(temporary, path)

    def remove(self, target_path: str) -> None:
        """Forget a target: its mount record, then its volume record. Blocking.

        The volume record is renamed into the trash rather than unlinked:
        as atomic, and it never waits for the disk (see trash.py).
        """
        self.mounts.remove(target_path)
        self._trash.move(self._path(target_path))

    def load(self) -> tuple[list[VolumeRecord], list[str]]:
        """Every record on disk, and the names of those that could not be read."""
        records = []
        unreadable = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(VolumeRecord.model_validate(json.loads(path.read_bytes())))
            except (OSError, ValueError, ValidationError) as err:
                # A record we cannot read is left for an operator to look at,
                # never guessed at.
                log.error("unreadable volume record %s: %s", path, type(err).__name__)
                unreadable.append(path.name)
        for stale in self.directory.glob("*.tmp*"):
            stale.unlink(missing_ok=True)  # a write that never finished
        self.mounts.remove_unfinished()
        return records, unreadable
