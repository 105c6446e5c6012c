"""Read the kernel's mount table.

"Is something mounted here?" is always answered from /proc/self/mountinfo,
never by stat()ing the path: a stat on a FUSE mount is a request to a daemon
that may be hung or hostile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    # Propagation tags such as "shared:2" or "master:5".
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")

    @property
    def shared(self) -> bool:
        return any(tag.startswith("shared:") for tag in self.optional)

    @property
    def slave(self) -> bool:
        return any(tag.startswith("master:") for tag in self.optional)


def parse_line(line: str) -> MountEntry:
    fields = line.split()
    separator = fields.index("-")
    major, minor = fields[2].split(":")
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major=int(major),
        minor=int(minor),
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        mount_options=tuple(fields[5].split(",")),
        optional=tuple(fields[6:separator]),
        fstype=fields[separator + 1],
        source=_unescape(fields[separator + 2]),
        super_options=tuple(fields[separator + 3].split(",")),
    )


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [parse_line(line) for line in f if line.strip()]


def _escape(path: str) -> str:
    return (
        path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
        .replace("\n", "\\012")
    )  # fmt: skip


def mounts_at(path: str, table: list[MountEntry] | None = None) -> list[MountEntry]:
    """Every mount whose mount point is exactly `path`, bottom first."""
    if table is not None:
        return [e for e in table if e.mount_point == path]
    # A node can have thousands of mounts and this runs on every publish and
    # mount: parse only the lines that can match (field 5 is the mount point).
    # Line by line rather than one read(): as fast, and it never holds the
    # whole table (~110 bytes a mount, twice over as bytes and str, plus the
    # list of lines): this runs in worker threads, whose malloc arenas keep
    # such peaks as resident memory long after they are freed.
    needle = f" {_escape(path)} "
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        lines = [line for line in f if needle in line]
    return [e for e in map(parse_line, lines) if e.mount_point == path]
