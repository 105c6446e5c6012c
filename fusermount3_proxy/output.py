"""What every mode prints, and how: fusermount3's usage and version texts, write and error.

A leaf module (it imports nothing of this package but __version__ and names.py): __main__
answers "-h" and "-V" from here without compiling cli.py, and cli.py prints
the same texts from here, so both paths give the same bytes.
"""

# posix, not os: see __init__.py. No "from __future__ import annotations"
# (it imports a module).
import posix

from fusermount3_proxy import __version__
from fusermount3_proxy.names import MERGERFS_FUSERMOUNT

# The helper's own usage text, byte for byte (libfuse 2.9's fusermount, and
# so mergerfs's, has one space less after "-o opt[,opt...]"), then
# csi-async's two extra modes after it (callers only look at whether "-h"
# ran, never at the text).
_HELPER_USAGE = (
    "%s: [options] mountpoint\n"
    "Options:\n"
    " -h\t\t    print help\n"
    " -V\t\t    print version\n"
    " -o opt[,opt...]    mount options\n"
    " -u\t\t    unmount\n"
    " -q\t\t    quiet\n"
    " -z\t\t    lazy unmount\n"
)
_MODES = (
    "\n"
    "csi-async modes (each has its own --help):\n"
    " --start [-o opt[,opt...]] [--keep-mount] -- PROGRAM ARGS... /dev/fd/N\n"
    "\t\t    mount through the broker, run PROGRAM on the fd\n"
    " --wait PATH [--timeout SECONDS]\n"
    "\t\t    exit 0 once a FUSE filesystem is mounted on PATH\n"
    "\t\t    (reads /proc/self/mountinfo only; a startupProbe)\n"
)
USAGE = _HELPER_USAGE + _MODES
_LIBFUSE2_USAGE = _HELPER_USAGE.replace("...]    mount", "...]   mount") + _MODES

# The libfuse version callers see. The csi-async version rides along so that
# "fusermount3 -V" in a FUSE image tells which drop-in is installed.
FUSERMOUNT_VERSION = "3.18.0"
# What Debian 12's mergerfs-fusermount prints for -V (the mergerfs 2.33.5 package:
# its bundled helper still names the fork it came from, 2.30.0).
MERGERFS_FUSERMOUNT_VERSION = "fusermount version: 2.9.7-mergerfs_2.30.0"


def print_usage(helper: str, progname: str) -> None:
    """The -h text of this helper (names.py), where it prints it.

    fusermount3 prints it on stdout; libfuse 2.9's fusermount, and so
    mergerfs's, on stderr.
    """
    if helper == MERGERFS_FUSERMOUNT:
        write(2, _LIBFUSE2_USAGE % progname)
    else:
        write(1, USAGE % progname)


def version_line(helper: str = "fusermount3") -> str:
    if helper == MERGERFS_FUSERMOUNT:
        return f"{MERGERFS_FUSERMOUNT_VERSION} (csi-async {__version__})\n"
    return f"fusermount3 version: {FUSERMOUNT_VERSION} (csi-async {__version__})\n"


def write(fd: int, text: str) -> None:
    """Write straight to the fd: no buffered stream left to flush (and fail) at exit."""
    data = text.encode("utf-8", "surrogateescape")
    try:
        while data:
            data = data[posix.write(fd, data) :]
    except OSError:
        return


def error(progname: str, message: str) -> None:
    """One error line on stderr, after "argv[0]: " as fusermount3 prints them."""
    write(2, f"{progname}: {message}\n")
