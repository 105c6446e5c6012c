"""What a row of the matrix declares: its FUSE library, its program, and what it serves.

These are the words catalogue.py is written in. The container paths and
files below are shared by every row and by the checks that run them
(runner.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from e2e.matrix.services import Services
from e2e.matrix.versions import Probe

# Container paths.
DATA = "/run/data"  # where the pod's containers mount the FUSE volume
SOURCE = "/run/src"  # a host directory some programs serve
EXAMPLES = "/run/examples"  # libfuse's example binaries (bound into every container)
FS_SCRIPTS = "/run/fs"  # e2e/fs (bound into every container)
OWN_MOUNTPOINT = "/run/own-mnt"  # an empty directory the program's uid owns
STARTER_MOUNTPOINT = "/dev/fd/N"  # the starter replaces it with the fd it passes

PROXY = "proxy"
STARTER = "starter"
READER_UID = 1000
KNOWN_FILE = "known.txt"
KNOWN_TEXT = "served from the host\n"
WRITTEN_FILE = "matrix-write.txt"
WRITTEN_TEXT = "written through the mount\n"


@dataclass
class Workspace:
    """A fresh host directory (mode 0755) for one row and mode, and the shared servers."""

    path: Path
    services: Services

    def shared_dir(self, name: str, mode: int = 0o777) -> Path:
        path = self.path / name
        path.mkdir()
        path.chmod(mode)
        return path


@dataclass
class Served:
    """What a row's setup prepared for the program."""

    # container path -> host path, for the program's container
    binds: dict[str, Path] = field(default_factory=dict)
    # more substitutions for the program's argv
    values: dict[str, str] = field(default_factory=dict)
    # the file the read check reads (relative to the mount), and what it
    # must hold; None: list the mount's root instead
    read_file: str = KNOWN_FILE
    read_text: str | None = KNOWN_TEXT
    # where the write check writes WRITTEN_FILE (relative to the mount)
    write_dir: str = ""
    # checks that WRITTEN_FILE reached the backing store; raises CheckFailed
    verify_write: Callable[[], None] | None = None
    # the same, for programs that save changes only when they unmount
    # (archives); run by the unmount check once the program has exited
    verify_after_unmount: Callable[[], None] | None = None


Setup = Callable[[Workspace], Served]


@dataclass(frozen=True)
class Library:
    """A FUSE library, and what pod authors must know about every program built on it."""

    name: str
    version: Probe
    takes_dev_fd: bool  # accepts an already-mounted /dev/fd/N mountpoint (starter mode)
    notes: tuple[str, ...] = ()
    # What a pod must change in the program's command line (or its pod) when
    # the node serves no /dev/fuse device plugin; with one, nothing changes.
    without_device_plugin: str = "nothing: it never opens /dev/fuse itself"


@dataclass(frozen=True)
class Implementation:
    """One row: a FUSE program and how to run it.

    argv is the proxy-mode command line: "{mnt}" is the mountpoint (and
    becomes /dev/fd/N in starter mode), "{examples}" and "{fs}" are the
    container directories of libfuse's examples and of e2e/fs, and the rest
    comes from the setup's values.
    """

    name: str
    library: Library
    version: Probe
    argv: tuple[str, ...]
    setup: Setup
    writable: bool = True
    # False: proxy mode only even where the library would allow starter mode
    starter: bool = True
    notes: tuple[str, ...] = ()
    # host files that must exist ("{examples}" as in Probe); if one is
    # missing the row is not run, which fails the matrix unless optional
    requires: tuple[str, ...] = ()
    optional: bool = False
    why_missing: str = ""

    @property
    def modes(self) -> tuple[str, ...]:
        if self.starter and self.library.takes_dev_fd:
            return (PROXY, STARTER)
        return (PROXY,)

    def command(self, mode: str, values: dict[str, str]) -> list[str]:
        substitutions = {
            "mnt": STARTER_MOUNTPOINT if mode == STARTER else DATA,
            "examples": EXAMPLES,
            "fs": FS_SCRIPTS,
            **values,
        }
        argv = [arg.format(**substitutions) for arg in self.argv]
        return ["fusermount3", "--start", "--", *argv] if mode == STARTER else argv

    def missing(self, examples: Path) -> list[str]:
        paths = [p.replace("{examples}", str(examples)) for p in self.requires]
        return [p for p in paths if not os.path.exists(p)]


@dataclass(frozen=True)
class CannotWork:
    """A FUSE program that cannot mount through csi-async, and why.

    The matrix still runs it, proxy mode, as it runs a row (argv and setup
    as for an Implementation, without "{mnt}" becoming /dev/fd/N): the
    check passes when the program exits, nothing is mounted and the broker
    was never asked, so the reason stays true for the installed version.
    """

    name: str
    version: Probe
    argv: tuple[str, ...]
    setup: Setup
    reason: str
    requires: tuple[str, ...] = ()

    def command(self, values: dict[str, str]) -> list[str]:
        substitutions = {"mnt": DATA, "examples": EXAMPLES, "fs": FS_SCRIPTS, **values}
        return [arg.format(**substitutions) for arg in self.argv]

    def missing(self) -> list[str]:
        return [p for p in self.requires if not os.path.exists(p)]
