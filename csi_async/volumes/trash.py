"""<state-dir>/removed: what an unpublish deletes, moved out of the way now and deleted later.

On ext4 mounted with online discard (as the benchmark machine's disk is),
freeing a block waits for the device to discard it: an rmdir of a socket
dir, or the unlink of a volume record that writeback has given a block,
takes 1 to 4 ms there, and an unpublish made up to four of them. A rename
within the state dir takes microseconds, and is as atomic: once renamed,
the record is not in volumes/ for a restarted driver to restore, and the
socket dir is not in sockets/ for a publish to reuse. The registry empties
the trash in a worker thread after each unpublish and at start-up, so it
holds at most what the unpublishes since the last pass put there.

Only files and directories the driver made go here: never anything in a
kubelet or pod directory.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from pathlib import Path

TRASH_DIR = "removed"


class Trash:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / TRASH_DIR
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Unique names, across restarts too (the clock moves on).
        self._names = itertools.count(time.time_ns())

    def move(self, path: Path | str) -> None:
        """Move a file or directory of the state dir into the trash (blocking); gone is fine."""
        for _ in range(2):
            try:
                os.rename(path, self.directory / str(next(self._names)))
                return
            except FileNotFoundError:
                if not os.path.lexists(path):
                    return  # gone already
                # The trash itself was removed: made again, once.
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                break  # not on the trash's filesystem: deleted in place below
        _delete(Path(path))

    def empty(self) -> None:
        """Delete what is in the trash (blocking): files, and directories of files."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return
        for name in names:
            try:
                _delete(self.directory / name)
            except OSError:
                # Something this driver did not put there (a non-empty
                # directory), or gone already: left, and tried again next time.
                continue


def _delete(path: Path) -> None:
    """unlink a file; rmdir a directory after unlinking the files and empty dirs in it."""
    try:
        os.unlink(path)
        return
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return
    for inner in os.listdir(path):
        try:
            os.unlink(path / inner)
        except IsADirectoryError:
            os.rmdir(path / inner)  # a socket dir retired inside its pod dir
    os.rmdir(path)
