"""Entry point of the zipapp: fusermount3, fusermount, fuse-starter, or --wait.

This runs on every mount, and zipimport compiles every imported module from
source on every run (twice, in fact), so imports are kept to what each path
needs. fuser runs "<helper> -h" before each mount: that exact probe, and its
"-V" sibling, are answered here without compiling cli.py at all; cli.py
imports the texts from here so that both paths print the same bytes.
"""

# Imports are deferred on purpose, see above.
# ruff: noqa: PLC0415

from __future__ import annotations

import os
import sys

# fusermount3's own usage text, byte for byte, then csi-async's two extra
# modes after it (callers only look at whether "-h" ran, never at the text).
USAGE = (
    "%s: [options] mountpoint\n"
    "Options:\n"
    " -h\t\t    print help\n"
    " -V\t\t    print version\n"
    " -o opt[,opt...]    mount options\n"
    " -u\t\t    unmount\n"
    " -q\t\t    quiet\n"
    " -z\t\t    lazy unmount\n"
    "\n"
    "csi-async modes (each has its own --help):\n"
    " --start [-o opt[,opt...]] [--keep-mount] -- PROGRAM ARGS... /dev/fd/N\n"
    "\t\t    mount through the broker, run PROGRAM on the fd\n"
    " --wait PATH [--timeout SECONDS]\n"
    "\t\t    exit 0 once a FUSE filesystem is mounted on PATH\n"
    "\t\t    (reads /proc/self/mountinfo only; a startupProbe)\n"
)

# The libfuse version callers see. The csi-async version rides along so that
# "fusermount3 -V" in a FUSE image tells which drop-in is installed.
FUSERMOUNT_VERSION = "3.18.0"


def version_line() -> str:
    from fusermount3_proxy import __version__

    return f"fusermount3 version: {FUSERMOUNT_VERSION} (csi-async {__version__})\n"


def write(fd: int, text: str) -> None:
    """Write straight to the fd: no buffered stream left to flush (and fail) at exit."""
    data = text.encode("utf-8", "surrogateescape")
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        return


def main() -> None:
    argv = sys.argv
    name = argv[0].rpartition("/")[2] if argv else ""
    if name == "fuse-starter" or argv[1:2] == ["--start"]:
        from fusermount3_proxy import starter

        sys.exit(starter.main(argv))
    if argv[1:2] == ["--wait"]:
        from fusermount3_proxy import wait

        sys.exit(wait.main(argv))
    # Same output as cli.py gives for these argument lists, minus its cost.
    if argv[1:] in (["-h"], ["--help"]):
        write(1, USAGE % argv[0])
        sys.exit(1)
    if argv[1:] in (["-V"], ["--version"]):
        write(1, version_line())
        sys.exit(0)
    from fusermount3_proxy import cli

    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
