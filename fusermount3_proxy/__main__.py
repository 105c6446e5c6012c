"""Entry point of the zipapp: picks the mode from argv[0] and argv[1], nothing else.

    fuse-starter ... | fusermount3 --start ...   starter.py
    fusermount3 --wait ...                       wait.py
    fusermount3 [options] mountpoint             cli.py (fusermount, too)

This runs on every mount, and zipimport compiles every imported module from
source on every run (twice, in fact), so imports are kept to what each path
needs. fuser runs "<helper> -h" before each mount: that exact probe, and its
"-V" sibling, are answered here from output.py without compiling cli.py at
all; cli.py prints the same texts from there.
"""

# Imports are deferred on purpose, see above.
# ruff: noqa: PLC0415

from __future__ import annotations

import sys


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
        from fusermount3_proxy.output import USAGE, write

        write(1, USAGE % argv[0])
        sys.exit(1)
    if argv[1:] in (["-V"], ["--version"]):
        from fusermount3_proxy.output import version_line, write

        write(1, version_line())
        sys.exit(0)
    from fusermount3_proxy import cli

    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
