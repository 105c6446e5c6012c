"""The fusermount3 command line, relayed to the csi-async broker.

Behaves like fusermount3 3.14-3.18 towards its callers (libfuse 2/3, go-fuse,
bazil, jacobsa, fuser, the fuse3 crate): same options, same messages, same
exit codes, and the /dev/fuse fd delivered over _FUSE_COMMFD with exactly one
sendmsg. The mount itself is made by the broker.
"""

# Other imports are deferred on purpose (os and stat are loaded at interpreter
# startup anyway): zipimport compiles every module from source on each run,
# and a refused call should not pay for what only a successful mount uses.
# ruff: noqa: PLC0415

from __future__ import annotations

import os
import stat

from fusermount3_proxy.__main__ import USAGE, version_line, write

TYPE_CHECKING = False
if TYPE_CHECKING:
    pass

_SHORT_OPTIONS = "hVo:uzq"
# long name -> (short key, takes an argument). "--sync-init" is deliberately
# absent: glibc then rejects it as unrecognized, which is what makes libfuse
# >= 3.19 fall back to the classic protocol.
_LONG_OPTIONS: dict[str, tuple[str, bool]] = {
    "unmount": ("u", False),
    "lazy": ("z", False),
    "quiet": ("q", False),
    "help": ("h", False),
    "version": ("V", False),
    "options": ("o", True),
    "auto-unmount": ("U", False),
    "comm-fd": ("c", True),
}

_C_SPACE = " \t\n\v\f\r"


class _Args:
    """What the command line asked for."""

    def __init__(self) -> None:
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
        _error(progname, "-z can only be used with -u")
        return 1
    if not args.positional:
        _error(progname, "missing mountpoint argument")
        return 1
    if len(args.positional) > 1:
        _error(progname, "extra arguments after the mountpoint")
        return 1

    mnt = _resolve_mountpoint(progname, args.positional[0])
    if mnt is None:
        return 1

    if args.unmount and not args.auto_unmount_only:
        return _unmount(progname, mnt, lazy=args.lazy, quiet=args.quiet)

    commfd = args.commfd if args.commfd is not None else os.environ.get("_FUSE_COMMFD")
    if commfd is None:
        _error(progname, "old style mounting not supported")
        return 1
    cfd = _strtol(commfd)
    if cfd is None:
        _error(progname, f"invalid _FUSE_COMMFD: {commfd}")
        return 1
    # Checked before the broker is contacted, so a bad comm fd can never
    # leave a mount behind that nobody holds (fusermount3 3.14 did).
    if not _is_socket(cfd):
        _error(progname, f"file descriptor {cfd} is not a socket, can't send fuse fd")
        return 1

    if args.auto_unmount_only:
        return _watch(cfd, mnt, None)
    return _mount(progname, mnt, args.opts, cfd)


def _parse(progname: str, argv: list[str]) -> _Args | int:
    """Parse like glibc getopt_long(argc, argv, "hVo:uzq", long_opts).

    Arguments are permuted (options may follow the mountpoint), long options
    may be abbreviated, and options are acted on in order, so "-h" exits
    before a later bad option is seen. Returns an exit status when parsing
    itself ended the run.
    """
    args = _Args()
    posixly_correct = "POSIXLY_CORRECT" in os.environ
    i = 0
    n = len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        if arg == "--":
            args.positional.extend(argv[i:])
            break
        if len(arg) < 2 or arg[0] != "-":
            if posixly_correct:
                args.positional.extend(argv[i - 1 :])
                break
            args.positional.append(arg)
            continue

        if arg.startswith("--"):
            body = arg[2:]
            name, eq, value = body.partition("=")
            if name in _LONG_OPTIONS:
                full = name
            else:
                matches = [long for long in _LONG_OPTIONS if long.startswith(name)]
                if not matches:
                    _error(progname, f"unrecognized option '--{body}'")
                    return 1
                if len(matches) > 1:
                    choices = "".join(f" '--{m}'" for m in matches)
                    _error(progname, f"option '--{name}' is ambiguous; possibilities:{choices}")
                    return 1
                full = matches[0]
            key, takes_arg = _LONG_OPTIONS[full]
            optarg: str | None = None
            if takes_arg:
                if eq:
                    optarg = value
                elif i < n:
                    optarg = argv[i]
                    i += 1
                else:
                    _error(progname, f"option '--{full}' requires an argument")
                    return 1
            elif eq:
                _error(progname, f"option '--{full}' doesn't allow an argument")
                return 1
            done = _apply(progname, args, key, optarg)
            if done is not None:
                return done
            continue

        j = 1
        while j < len(arg):
            ch = arg[j]
            j += 1
            spec = _SHORT_OPTIONS.find(ch)
            if ch == ":" or spec < 0:
                _error(progname, f"invalid option -- '{ch}'")
                return 1
            optarg = None
            if _SHORT_OPTIONS[spec + 1 : spec + 2] == ":":
                if j < len(arg):
                    optarg = arg[j:]
                elif i < n:
                    optarg = argv[i]
                    i += 1
                else:
                    _error(progname, f"option requires an argument -- '{ch}'")
                    return 1
                j = len(arg)
            done = _apply(progname, args, ch, optarg)
            if done is not None:
                return done
    return args


def _apply(progname: str, args: _Args, key: str, optarg: str | None) -> int | None:
    if key == "h":
        write(1, USAGE % progname)
        return 1
    if key == "V":
        write(1, version_line())
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


def _resolve_mountpoint(progname: str, orig: str) -> str | None:
    """fuse_mnt_resolve_path: make the path absolute without following its last component.

    Only the parent goes through realpath, so a symlink as the last component
    is kept as given, exactly as fusermount3 reports and unmounts it.
    """
    if not orig:
        _error(progname, f"invalid mountpoint '{orig}'")
        return None
    end = len(orig)
    while end > 1 and orig[end - 1] == "/":
        end -= 1
    copy = orig[:end]
    to_resolve = copy
    last: str | None = None
    if not copy.endswith("/"):
        slash = copy.rfind("/")
        if slash < 0:
            last = copy
            to_resolve = "."
        else:
            last = copy[slash + 1 :]
            to_resolve = copy[:slash] or "/"
        if last in (".", ".."):
            last = None
            to_resolve = copy
    try:
        resolved = os.path.realpath(to_resolve, strict=True)
    except OSError as err:
        _error(progname, f"bad mount point {orig}: {err.strerror or err}")
        return None
    if last is None:
        return resolved
    return resolved + last if resolved.endswith("/") else f"{resolved}/{last}"


def _strtol(text: str) -> int | None:
    """libfuse_strtol: base 10, leading blanks and a sign allowed, nothing after."""
    digits = text.lstrip(_C_SPACE)
    sign = 1
    if digits[:1] in ("+", "-"):
        sign = -1 if digits[0] == "-" else 1
        digits = digits[1:]
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = sign * int(digits)
    if not -(2**63) <= value < 2**63:
        return None
    return value


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except (OSError, OverflowError):
        return False


def _mount(progname: str, mnt: str, opts: str | None, cfd: int) -> int:
    from fusermount3_proxy import client
    from fusermount3_proxy.protocol import split_options

    options = split_options(opts or "")
    auto_unmount = "auto_unmount" in options
    try:
        mount_id, fd = client.mount(options, mnt, auto_unmount)
    except client.BrokerError as err:
        _error(progname, str(err))
        return 1

    delivered = False
    try:
        try:
            _send_fd(cfd, fd)
        except OSError as err:
            _error(progname, f"sending file descriptor: {err.strerror or err}")
        else:
            delivered = True
    finally:
        os.close(fd)
        # Also reached on KeyboardInterrupt: a mount whose fd never reached
        # the FUSE program would otherwise stay behind, dead.
        if not delivered:
            _rollback(progname, mnt, mount_id)
    if not delivered:
        return 1
    if auto_unmount:
        return _watch(cfd, mnt, mount_id)
    return 0


def _send_fd(cfd: int, fd: int) -> None:
    """One sendmsg of b"\\0" plus one SCM_RIGHTS fd, as libfuse's receive_fd expects."""
    import socket

    # Wraps the caller's fd without taking ownership: detach() below keeps the
    # socket object from closing it whenever it happens to be collected.
    sock = socket.socket(fileno=cfd)
    try:
        sock.setblocking(True)
        while True:
            try:
                sent = socket.send_fds(sock, [b"\0"], [fd])
            except InterruptedError:
                continue
            break
        if sent != 1:
            raise OSError(0, f"short write ({sent} bytes)")
    finally:
        sock.detach()


def _rollback(progname: str, mnt: str, mount_id: int | None) -> None:
    from fusermount3_proxy import client

    try:
        client.unmount(mnt, mount_id=mount_id)
    except client.BrokerError as err:
        _error(progname, f"failed to undo the mount: {err}")


def _unmount(progname: str, mnt: str, lazy: bool, quiet: bool) -> int:
    from fusermount3_proxy import client

    try:
        client.unmount(mnt, lazy=lazy)
    except client.Refused as err:
        if not quiet:
            _error(progname, str(err))
        return 1
    except client.BrokerError as err:
        # Not silenced by -q: -q hides "not mounted"-style refusals, while a
        # broker that cannot be reached is a deployment problem worth seeing.
        _error(progname, str(err))
        return 1
    return 0


def _watch(cfd: int, mnt: str, mount_id: int | None) -> int:
    """Stay alive until the FUSE program goes away, then ask for an unmount.

    Like fusermount3 >= 3.17.1: every other fd is closed and 0-2 point to
    /dev/null, so callers that read our stdout/stderr to EOF (bazil, Go's
    exec) are not held up; a new session and a full signal mask mean only
    SIGKILL stops the watcher before it has done its job.
    """
    import signal
    import socket

    from fusermount3_proxy import client

    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    path = client.socket_path()
    try:
        path = os.path.abspath(path)
        os.chdir("/")
    except OSError:
        pass
    cfd = _close_inherited_fds(cfd)
    try:
        os.setsid()
    except OSError:
        pass

    sock = socket.socket(fileno=cfd)
    sock.setblocking(True)
    while True:
        try:
            data = sock.recv(16)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
    sock.close()

    try:
        client.unmount(mnt, mount_id=mount_id, path=path)
    except client.BrokerError:
        # stderr is /dev/null by now and the exit status is not looked at:
        # there is nobody left to tell.
        return 0
    return 0


def _close_inherited_fds(cfd: int) -> int:
    """Close everything but 0-2 and the comm fd; return the comm fd's number."""
    if cfd <= 2:
        import fcntl

        cfd = fcntl.fcntl(cfd, fcntl.F_DUPFD, 3)
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if devnull != std:
            os.dup2(devnull, std)
    keep = {0, 1, 2, cfd}
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        # Without /proc, fall back to the range; closerange may then loop
        # over every possible fd, which is slow but correct.
        limit = os.sysconf("SC_OPEN_MAX")
        os.closerange(3, cfd)
        os.closerange(cfd + 1, limit)
        return cfd
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue
    return cfd


def _error(progname: str, message: str) -> None:
    write(2, f"{progname}: {message}\n")
