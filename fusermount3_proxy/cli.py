"""The fusermount3 command line, relayed to the csi-async broker: parse, then act.

Installed as mergerfs-fusermount it speaks that helper's (libfuse 2.9's)
command line instead; names.py says which name speaks which.

Behaves like fusermount3 3.14-3.18 towards its callers (libfuse 2/3, go-fuse,
bazil and jacobsa, each run by the compatibility matrix): same options, same messages, same
exit codes, and the /dev/fuse fd delivered over _FUSE_COMMFD with exactly one
sendmsg. The mount itself is made by the broker.

The pieces this puts in order are each in their own module: getopt.py (the
option parsing), mountpoint.py (the mountpoint argument), commfd.py (the
socket the fd goes back over), client.py (the broker), watcher.py (the
auto-unmount watcher).
"""

# client and watcher are imported where they are used: each module costs
# start-up time, and a refused call should not pay for what only a mount
# uses. posix, not os (see __init__.py), and no "from __future__ import
# annotations" (it imports a module).
# ruff: noqa: PLC0415

import posix

from fusermount3_proxy import getenv
from fusermount3_proxy.commfd import is_socket, parse_commfd, send_fd
from fusermount3_proxy.getopt import GetoptError, GetoptLong
from fusermount3_proxy.mountpoint import MountpointError, resolve_mountpoint
from fusermount3_proxy.names import MERGERFS_FUSERMOUNT, helper_for
from fusermount3_proxy.output import error, print_usage, version_line, write

SHORT_OPTIONS = "hVo:uzq"
# long name -> (short key, takes an argument). "--sync-init" is deliberately
# absent: glibc then rejects it as unrecognized, which is what makes libfuse
# >= 3.19 fall back to the classic protocol.
LONG_OPTIONS: dict[str, tuple[str, bool]] = {
    "unmount": ("u", False),
    "lazy": ("z", False),
    "quiet": ("q", False),
    "help": ("h", False),
    "version": ("V", False),
    "options": ("o", True),
    "auto-unmount": ("U", False),
    "comm-fd": ("c", True),
}
# libfuse 2.9's fusermount (mergerfs's fork of it) knows only these.
LIBFUSE2_LONG_OPTIONS = {
    name: LONG_OPTIONS[name] for name in ("unmount", "lazy", "quiet", "help", "version")
}


class _Args:
    """What the command line asked for."""

    def __init__(self, helper: str) -> None:
        # Whose command line this is (names.py): what -h and -V print.
        self.helper = helper
        self.opts: str | None = None
        self.unmount = False
        self.lazy = False
        self.quiet = False
        self.auto_unmount_only = False
        self.commfd: str | None = None
        self.positional: list[str] = []


def main(argv: list[str]) -> int:
    progname = argv[0] if argv else "fusermount"
    try:
        return _run(progname, argv[1:])
    except KeyboardInterrupt:
        return 130


def _run(progname: str, argv: list[str]) -> int:
    parsed = _parse(progname, argv)
    if isinstance(parsed, int):
        return parsed
    args = parsed

    if args.lazy and not args.unmount:
        error(progname, "-z can only be used with -u")
        return 1
    if not args.positional:
        error(progname, "missing mountpoint argument")
        return 1
    if len(args.positional) > 1:
        error(progname, "extra arguments after the mountpoint")
        return 1

    try:
        mnt = resolve_mountpoint(args.positional[0])
    except MountpointError as err:
        error(progname, str(err))
        return 1

    if args.unmount and not args.auto_unmount_only:
        return _unmount(progname, mnt, lazy=args.lazy, quiet=args.quiet)

    commfd = args.commfd if args.commfd is not None else getenv("_FUSE_COMMFD")
    if commfd is None:
        error(progname, "old style mounting not supported")
        return 1
    cfd = parse_commfd(commfd)
    if cfd is None:
        error(progname, f"invalid _FUSE_COMMFD: {commfd}")
        return 1
    # Checked before the broker is contacted, so a bad comm fd can never
    # leave a mount behind that nobody holds (fusermount3 3.14 did).
    if not is_socket(cfd):
        error(progname, f"file descriptor {cfd} is not a socket, can't send fuse fd")
        return 1

    if args.auto_unmount_only:
        from fusermount3_proxy.watcher import watch

        return watch(cfd, mnt, None)
    return _mount(progname, mnt, args.opts, cfd)


def _parse(progname: str, argv: list[str]) -> _Args | int:
    """Parse like glibc getopt_long(argc, argv, "hVo:uzq", long_opts), acting in order.

    Returns an exit status when parsing itself ended the run ("-h", "-V", or
    a bad option, whichever comes first).
    """
    args = _Args(helper_for(progname))
    long_options = LIBFUSE2_LONG_OPTIONS if args.helper == MERGERFS_FUSERMOUNT else LONG_OPTIONS
    options = GetoptLong(argv, SHORT_OPTIONS, long_options)
    try:
        for key, optarg in options:
            done = _apply(progname, args, key, optarg)
            if done is not None:
                return done
    except GetoptError as err:
        error(progname, str(err))
        return 1
    args.positional = options.operands
    return args


def _apply(progname: str, args: _Args, key: str, optarg: str | None) -> int | None:
    if key == "h":
        print_usage(args.helper, progname)
        return 1
    if key == "V":
        write(1, version_line(args.helper))
        return 0
    if key == "o":
        args.opts = optarg
    elif key == "u":
        args.unmount = True
    elif key == "U":
        args.unmount = True
        args.auto_unmount_only = True
    elif key == "c":
        args.commfd = optarg
    elif key == "z":
        args.lazy = True
    elif key == "q":
        args.quiet = True
    return None


def _mount(progname: str, mnt: str, opts: str | None, cfd: int) -> int:
    from fusermount3_proxy import client
    from fusermount3_proxy.codec import split_options

    options = split_options(opts or "")
    auto_unmount = "auto_unmount" in options
    try:
        mount_id, fd = client.mount(options, mnt, auto_unmount)
    except client.BrokerError as err:
        error(progname, str(err))
        return 1

    delivered = False
    try:
        try:
            send_fd(cfd, fd)
        except OSError as err:
            error(progname, f"sending file descriptor: {err.strerror or err}")
        else:
            delivered = True
    finally:
        posix.close(fd)
        # Also reached on KeyboardInterrupt: a mount whose fd never reached
        # the FUSE program would otherwise stay behind, dead.
        if not delivered:
            _rollback(progname, mnt, mount_id)
    if not delivered:
        return 1
    if auto_unmount:
        from fusermount3_proxy.watcher import watch

        return watch(cfd, mnt, mount_id)
    return 0


def _rollback(progname: str, mnt: str, mount_id: int | None) -> None:
    from fusermount3_proxy import client

    try:
        client.unmount(mnt, mount_id=mount_id)
    except client.BrokerError as err:
        error(progname, f"failed to undo the mount: {err}")


def _unmount(progname: str, mnt: str, lazy: bool, quiet: bool) -> int:
    from fusermount3_proxy import client

    try:
        client.unmount(mnt, lazy=lazy)
    except client.Refused as err:
        if not quiet:
            error(progname, str(err))
        return 1
    except client.BrokerError as err:
        # Not silenced by -q: -q hides "not mounted"-style refusals, while a
        # broker that cannot be reached is a deployment problem worth seeing.
        error(progname, str(err))
        return 1
    return 0
