"""Published volumes on disk, so a restarted driver picks up where it left off.

One JSON file per published target under <state-dir>/volumes, written
atomically (temporary file, fsync, rename, fsync of the directory). A record
holds the NodePublishVolume arguments that matter, never secrets or tokens;
on start-up each one is validated again, exactly like a new request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from csi_async import logs
from csi_async._proto.csi import v1 as csi

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
            volume_context={
                k: v for k, v in request.volume_context.items() if k != logs.TOKENS_KEY
            },
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


class MountRecord(BaseModel):
    """A live FUSE mount a broker made, so a restarted driver manages it the same way.

    The token is what the program's auto-unmount watcher (or the starter)
    will name in its UNMOUNT; the daemons are the processes whose exit means
    the mount may be dead, each as (pid, start time in clock ticks since
    boot) so that a recycled pid is never mistaken for the daemon.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    target_path: str
    token: int
    # The FUSE superblock's device minor: the adopted mount must be this one.
    minor: int
    daemons: list[tuple[int, int]]


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "volumes"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.mounts = state_dir / "mounts"
        self.mounts.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, target_path: str) -> Path:
        return self.directory / (hashlib.sha256(target_path.encode()).hexdigest()[:32] + ".json")

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
        self.remove_mount(target_path)
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
        for stale in [*self.directory.glob("*.tmp*"), *self.mounts.glob("*.tmp*")]:
            stale.unlink(missing_ok=True)  # a write that never finished
        return records, unreadable

    # Mount records: written on every MOUNT and removed when the mount goes.
    # Atomic (write, rename) but not fsynced: they only have to survive a
    # crash of the driver process, which the page cache does; after a node
    # crash there is no FUSE mount left to describe.

    def _mount_path(self, target_path: str) -> Path:
        return self.mounts / self._path(target_path).name

    def save_mount(self, record: MountRecord) -> None:
        path = self._mount_path(record.target_path)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(record.model_dump_json().encode())
        os.replace(temporary, path)

    def remove_mount(self, target_path: str) -> None:
        self._mount_path(target_path).unlink(missing_ok=True)

    def load_mount(self, target_path: str) -> MountRecord | None:
        path = self._mount_path(target_path)
        try:
            return MountRecord.model_validate(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as err:
            log.error("unreadable mount record %s: %s", path, type(err).__name__)
            return None

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
