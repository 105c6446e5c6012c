"""libfuse's comm socket (_FUSE_COMMFD or --comm-fd): the way the /dev/fuse fd goes back.

The FUSE library makes a socketpair, hands one end to the helper by number
and waits on the other for one message carrying the fd: its number is parsed
and checked here as libfuse parses it, and the fd is sent here as libfuse's
receive_fd expects it.
"""

# socket is imported where it is used (os and stat are loaded at interpreter
# startup anyway): a refused call should not pay for it.
# ruff: noqa: PLC0415

from __future__ import annotations

import os
import stat

_C_SPACE = " \t\n\v\f\r"


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
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except (OSError, OverflowError):
        return False


def send_fd(cfd: int, fd: int) -> None:
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
