"""Entry point of the zipapp: picks the mode from argv[0] and argv[1], nothing else.

    fuse-starter ... | fusermount3 --start ...   starter.py
    fusermount3 --wait ...                       wait.py
    fusermount3 [options] mountpoint             cli.py (fusermount and
                                                 mergerfs-fusermount, too: names.py)

This runs on every mount, and every module imported costs start-up time, so
imports are kept to what each path needs. fuser runs "<helper> -h" before
each mount: that exact probe, and its "-V" sibling, are answered here from
output.py without loading cli.py at all; cli.py prints the same texts from
there.

The archive's shebang line runs main() through `python3 -c` rather than
through runpy (scripts/build_zipapp.py says why); `python3 fusermount3`
reaches it through the archive's __main__.py, with the same result.
"""

# Imports are deferred on purpose, see above; no "from __future__ import
# annotations" either (it imports a module).
# ruff: noqa: PLC0415

import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


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
        from fusermount3_proxy.names import helper_for
        from fusermount3_proxy.output import print_usage

        print_usage(helper_for(argv[0]), argv[0])
        _exit(1)
    if argv[1:] in (["-V"], ["--version"]):
        from fusermount3_proxy.names import helper_for
        from fusermount3_proxy.output import version_line, write

        write(1, version_line(helper_for(argv[0])))
        _exit(0)
    from fusermount3_proxy import cli

    _exit(cli.main(argv))


def _exit(status: int) -> "NoReturn":
    """Exit now, skipping the interpreter's teardown.

    Tearing down what was imported takes longer than the whole mount path
    once the fd has been handed over, and libfuse waits for the helper to be
    reaped. Nothing is left to do on the command line's paths: output went
    straight to the fds (output.write), no thread runs, no atexit handler
    was registered, and no file of ours is open but the fds the kernel
    closes at exit. The standard streams are flushed all the same, in case
    a caller of this package wrote to them. The starter and --wait modes
    exit the normal way: they run child processes and longer-lived code.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    posix._exit(status)


if __name__ == "__main__":
    main()
