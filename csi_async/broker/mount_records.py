"""The FUSE mounts brokers made, on disk, so a restarted driver manages them the same way.

One JSON file per live mount under <state-dir>/mounts, written on every
MOUNT and removed when the mount goes. Atomic (write, rename) but not
fsynced: they only have to survive a crash of the driver process, which the
page cache does; after a node crash there is no FUSE mount left to describe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

# The logger of every record the driver keeps (docs/operations.md).
log = logging.getLogger("csi_async.state")


def record_file_name(target_path: str) -> str:
    """The file name of a target's records (its volume record and its mount record)."""
    return hashlib.sha256(target_path.encode()).hexdigest()[:32] + ".json"


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


class MountRecords:
    """<state-dir>/mounts: at most one record per target."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "mounts"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, target_path: str) -> Path:
        return self.directory / record_file_name(target_path)

    def save(self, record: MountRecord) -> None:
        path = self._path(record.target_path)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(record.model_dump_json().encode())
        os.replace(temporary, path)

    def remove(self, target_path: str) -> None:
        self._path(target_path).unlink(missing_ok=True)

    def load(self, target_path: str) -> MountRecord | None:
        path = self._path(target_path)
        try:
            return MountRecord.model_validate(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as err:
            log.error("unreadable mount record %s: %s", path, type(err).__name__)
            return None

    def remove_unfinished(self) -> None:
        """Delete the temporaries of writes that never finished (a crash mid-save)."""
        for stale in self.directory.glob("*.tmp*"):
            stale.unlink(missing_ok=True)
