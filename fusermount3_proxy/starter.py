"""Starter mode: get a mounted /dev/fuse fd from the broker and run a program on it.

    fuse-starter [-o OPTIONS] [--keep-mount] -- PROGRAM [ARGS...]
    fusermount3 --start [-o OPTIONS] [--keep-mount] -- PROGRAM [ARGS...]

For FUSE programs that accept an already-mounted "/dev/fd/N" instead of a
mountpoint (libfuse >= 3.3, go-fuse; by their source, newer jacobsa/fuse
releases, untested here): no fusermount3 call and no /dev/fuse in the
container are needed. Each argument that is exactly
"/dev/fd/N" is replaced by the fd the program inherits.
"""

# Imports are deferred on purpose: "-h" and argument errors should not pay
# for subprocess and the broker client (zipimport compiles them on each run).
# ruff: noqa: PLC0415

from __future__ import annotations

import os

from fusermount3_proxy.output import error, write

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from types import FrameType


PLACEHOLDER = "/dev/fd/N"
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")

USAGE = """\
usage: %s [-o OPTIONS] [--keep-mount] -- PROGRAM [ARGS...]

Ask the csi-async broker to mount this volume, then run PROGRAM with the
mounted /dev/fuse fd. Every argument that is exactly /dev/fd/N is replaced
by /dev/fd/<fd>. When PROGRAM exits, the mount is detached (unless
--keep-mount) and its exit status is returned (128+signal if it was killed).

options:
  -o OPTIONS, --options=OPTIONS   mount options, as for fusermount3 -o
  --keep-mount                    leave the mount in place when PROGRAM exits
  -h, --help                      show this help
"""


def main(argv: list[str]) -> int:
    progname = argv[0] if argv else "fuse-starter"
    if os.path.basename(progname) == "fuse-starter":
        args = argv[1:]
        if args[:1] == ["--start"]:
            args = args[1:]
    else:
        args = argv[2:]
    try:
        return run(progname, args)
    except KeyboardInterrupt:
        return 130


def run(progname: str, args: list[str]) -> int:
    opts: str | None = None
    keep_mount = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-h", "--help"):
            write(1, USAGE % progname)
            return 0
        if arg == "--keep-mount":
            keep_mount = True
        elif arg in ("-o", "--options"):
            if i + 1 >= len(args):
                error(progname, f"option '{arg}' requires an argument")
                return 1
            i += 1
            opts = args[i]
        elif arg.startswith("-o"):
            opts = arg[2:]
        elif arg.startswith("--options="):
            opts = arg[len("--options=") :]
        elif arg.startswith("-") and arg != "-":
            error(progname, f"unrecognized option '{arg}'")
            return 1
        else:
            break
        i += 1
    program = args[i:]
    if not program:
        error(progname, "missing program to run (usage: [-o OPTIONS] [--keep-mount] -- PROGRAM)")
        return 1
    return _start(progname, opts, keep_mount, program)


def _start(progname: str, opts: str | None, keep_mount: bool, program: list[str]) -> int:
    import signal
    import subprocess

    from fusermount3_proxy import client
    from fusermount3_proxy.codec import split_options

    # Handlers go in before anything else: a SIGTERM while the broker mounts
    # must neither kill us (leaving a mount nobody serves) nor be lost.
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
            return
        try:
            child.send_signal(signum)
        except OSError:
            return

    for name in FORWARDED_SIGNALS:
        signal.signal(getattr(signal, name), forward)

    try:
        # A stop request ends the retries of a busy broker: there is nothing
        # to mount for any more, and kubelet's grace period is running.
        mount_id, fd = client.mount(
            split_options(opts or ""),
            PLACEHOLDER,
            auto_unmount=False,
            give_up=lambda: bool(pending),
        )
    except client.BrokerError as err:
        error(progname, str(err))
        return 128 + pending[0] if pending else 1
    if pending:
        # Told to stop before the program ran: nothing to forward to.
        os.close(fd)
        _unmount(progname, mount_id)
        return 128 + pending[0]

    os.set_inheritable(fd, True)
    devfd = f"/dev/fd/{fd}"
    command = [devfd if arg == PLACEHOLDER else arg for arg in program]
    try:
        child = subprocess.Popen(command, pass_fds=(fd,), close_fds=True)
    except OSError as err:
        error(progname, f"cannot execute {program[0]}: {err.strerror or err}")
        os.close(fd)
        _unmount(progname, mount_id)
        return 127
    # The child holds the FUSE connection now; our copy would keep it alive
    # (and the mount answering) after the child died.
    os.close(fd)
    for signum in pending:
        forward(signum, None)
    pending.clear()

    returncode = child.wait()
    if not keep_mount:
        _unmount(progname, mount_id)
    return returncode if returncode >= 0 else 128 - returncode


def _unmount(progname: str, mount_id: int | None) -> None:
    from fusermount3_proxy import client

    try:
        client.unmount(PLACEHOLDER, mount_id=mount_id)
    except client.BrokerError as err:
        error(progname, f"failed to unmount: {err}")
