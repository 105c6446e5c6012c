"""Published volumes on disk, so a restarted driver picks up where it left off.

One JSON file per published target under <state-dir>/volumes, written
atomically (temporary file, fsync, rename, fsync of the directory). A record
holds the NodePublishVolume arguments that matter, never secrets or tokens;
on start-up each one is validated again, exactly like a new request.
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
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "volumes"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.mounts = MountRecords(state_dir)

    def _path(self, target_path: str) -> Path:
        return self.directory / record_file_name(target_path)

    def save(self, record: VolumeRecord) -> None:
        path = self._path(record.target_path)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        data = record.model_dump_json().encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        self._sync_directory()

    def remove(self, target_path: str) -> None:
        self.mounts.remove(target_path)
        try:
            self._path(target_path).unlink()
        except FileNotFoundError:
            return
        self._sync_directory()

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

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
