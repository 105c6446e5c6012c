"""libfuse's comm socket (_FUSE_COMMFD or --comm-fd): the way the /dev/fuse fd goes back.

The FUSE library makes a socketpair, hands one end to the helper by number
and waits on the other for one message carrying the fd: its number is parsed
and checked here as libfuse parses it, and the fd is sent here as libfuse's
receive_fd expects it.
"""

# Modules written in C only (posix and _socket, not os, stat and socket.py:
# see __init__.py), and no "from __future__ import annotations" (it imports
# a module): this is on the path of every mount.
import _socket
import posix
import sys

_C_SPACE = " \t\n\v\f\r"
_S_IFMT = 0o170000
_S_IFSOCK = 0o140000


def parse_commfd(text: str) -> int | None:
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


def is_socket(fd: int) -> bool:
    try:
        return posix.fstat(fd).st_mode & _S_IFMT == _S_IFSOCK
    except (OSError, OverflowError):
        return False


def send_fd(cfd: int, fd: int) -> None:
    """One sendmsg of b"\\0" plus one SCM_RIGHTS fd, as libfuse's receive_fd expects."""
    # Wraps the caller's fd without taking ownership: detach() below keeps the
    # socket object from closing it whenever it happens to be collected.
    sock = _socket.socket(fileno=cfd)
    # What socket.send_fds sends: the fd as a C int in the machine's order.
    rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
    try:
        sock.setblocking(True)
        while True:
            try:
                sent = sock.sendmsg([b"\0"], rights)
            except InterruptedError:
                continue
            break
        if sent != 1:
            raise OSError(0, f"short write ({sent} bytes)")
    finally:
        sock.detach()
