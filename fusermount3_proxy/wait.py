"""Wait mode: exit 0 as soon as a FUSE filesystem is mounted on a path.

    fusermount3 --wait PATH [--timeout SECONDS]

Made for a FUSE sidecar's startupProbe (or postStart hook): the probe returns
the moment the mount exists, so the containers that read it start then.

Only /proc/self/mountinfo is read. PATH itself is never stat()ed or opened:
a FUSE daemon that hangs would hang that call, and the probe with it. The
mount table is watched with poll(): the kernel flags POLLPRI|POLLERR on an
open mountinfo whenever the mount namespace changes (a mount propagated into
the container included), with a periodic re-read as a fallback.
"""

# Imports are deferred on purpose, as in the other modes (zipimport compiles
# what is imported on every run, and a probe runs every time it is called).
# ruff: noqa: PLC0415

from __future__ import annotations

import os

from fusermount3_proxy.output import error, write

MOUNTINFO = "/proc/self/mountinfo"
DEFAULT_TIMEOUT = 60.0
# Re-read the table at least this often (seconds), in case poll() never
# reports a change: a kernel or sandbox (gVisor, say) without mountinfo poll
# support would otherwise only be noticed at the deadline.
FALLBACK_INTERVAL = 0.1

USAGE = """\
usage: %s --wait PATH [--timeout SECONDS]

Exit 0 as soon as a FUSE filesystem (type fuse or fuse.*) is the topmost
mount on PATH; exit 1 if none is after SECONDS (default 60; 0 checks once
and does not wait). PATH is made absolute and normalised without touching
the filesystem, and compared with the mount points in /proc/self/mountinfo:
give the path this container mounts the volume at (its mountPath). Nothing
but mountinfo is read, so a hung FUSE daemon cannot hang the wait.

As a native sidecar's startupProbe (timeoutSeconds above --timeout, since
kubelet stops a probe at timeoutSeconds):

  startupProbe:
    exec:
      command: [fusermount3, --wait, /data, --timeout, "30"]
    timeoutSeconds: 35
    periodSeconds: 1
    failureThreshold: 2

options:
  --timeout SECONDS, --timeout=SECONDS   how long to wait (default 60)
  -h, --help                             show this help
"""


def main(argv: list[str]) -> int:
    progname = argv[0] if argv else "fusermount3"
    try:
        return run(progname, argv[2:])
    except KeyboardInterrupt:
        return 130


def run(progname: str, args: list[str]) -> int:
    path: str | None = None
    timeout = DEFAULT_TIMEOUT
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        value: str | None = None
        if arg in ("-h", "--help"):
            write(1, USAGE % progname)
            return 0
        if arg == "--timeout":
            if i >= len(args):
                error(progname, "option '--timeout' requires an argument")
                return 1
            value = args[i]
            i += 1
        elif arg.startswith("--timeout="):
            value = arg[len("--timeout=") :]
        elif arg == "--":
            rest = args[i:]
            if path is not None or len(rest) != 1:
                error(progname, "--wait takes exactly one PATH")
                return 1
            path = rest[0]
            break
        elif arg.startswith("-") and arg != "-":
            error(progname, f"unrecognized option '{arg}'")
            return 1
        elif path is not None:
            error(progname, "--wait takes exactly one PATH")
            return 1
        else:
            path = arg
        if value is not None:
            parsed = _seconds(value)
            if parsed is None:
                error(progname, f"invalid --timeout '{value}': give a number of seconds >= 0")
                return 1
            timeout = parsed
    if not path:
        error(progname, "missing PATH (usage: --wait PATH [--timeout SECONDS])")
        return 1

    target = os.path.abspath(path)
    try:
        found = wait_for_fuse(target, timeout)
    except OSError as err:
        error(progname, f"cannot read {MOUNTINFO}: {err.strerror or err}")
        return 1
    if found is None:
        return 0
    what = "nothing is mounted there" if not found else f"the topmost mount there is {found}"
    error(progname, f"no FUSE filesystem on {target} after {timeout:g} s ({what})")
    return 1


def wait_for_fuse(target: str, timeout: float) -> str | None:
    """Wait until a FUSE filesystem is the topmost mount on target.

    target must be absolute and normalised. Returns None once it is, else at
    the deadline the filesystem type on top there ("" if there is no mount).
    """
    import select
    import time

    deadline = time.monotonic() + timeout
    wanted = os.fsencode(target)
    table = MountTable()
    try:
        poller = select.poll()
        poller.register(table.fd, select.POLLPRI | select.POLLERR)
        while True:
            fstype = table.fstype_at(wanted)
            if is_fuse(fstype):
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return os.fsdecode(fstype or b"")
            # Whether poll() woke for a change or timed out, re-read: it
            # also reports a change that happened before it was called
            # (since the last poll), so no mount is missed in between.
            poller.poll(max(1, int(min(remaining, FALLBACK_INTERVAL) * 1000)))
    finally:
        table.close()


class MountTable:
    """An open /proc/self/mountinfo, re-read from the start on each look."""

    def __init__(self) -> None:
        self.fd = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def read(self) -> bytes:
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks: list[bytes] = []
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def fstype_at(self, mount_point: bytes) -> bytes | None:
        """The filesystem type of the topmost mount on mount_point, or None."""
        # Mounts are listed in the order they were made: the last one on a
        # path is the one on top, the one a process there sees.
        found = None
        # Cheap filter first: an escaped mount point contains the path's
        # escaped form, so most lines are never split.
        needle = b" " + escape(mount_point) + b" "
        for line in self.read().split(b"\n"):
            if needle not in line:
                continue
            entry = parse_line(line)
            if entry is not None and entry[0] == mount_point:
                found = entry[1]
        return found


def parse_line(line: bytes) -> tuple[bytes, bytes] | None:
    """(unescaped mount point, filesystem type) of one mountinfo line.

    The format (proc(5)): id parent major:minor root mount-point options
    [optional fields...] - fstype source super-options.
    """
    fields = line.split(b" ")
    try:
        separator = fields.index(b"-", 6)
        return unescape(fields[4]), fields[separator + 1]
    except (ValueError, IndexError):
        return None


def unescape(field: bytes) -> bytes:
    """Undo the kernel's octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 backslash)."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(octal) == 3 and all(0x30 <= c <= 0x37 for c in octal):
            out.append(int(octal, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def escape(path: bytes) -> bytes:
    """The kernel's escaping of a mount point in mountinfo (seq_path's " \\t\\n\\\\")."""
    for char in b"\\ \t\n":
        path = path.replace(bytes([char]), b"\\%03o" % char)
    return path


def is_fuse(fstype: bytes | None) -> bool:
    return fstype is not None and (fstype == b"fuse" or fstype.startswith(b"fuse."))


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    # float() also takes "nan" and "inf", which make no deadline.
    if not 0 <= value < float("inf"):
        return None
    return value
