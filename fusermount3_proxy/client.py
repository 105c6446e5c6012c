"""The broker client: one request, one response, at most one fd.

Used by the fusermount3 command line, the auto-unmount watcher and the
starter. Everything that can go wrong on the way to the broker ends up as a
BrokerError whose text is ready to be printed after "argv[0]: ".

A busy broker (EAGAIN, in its answer or from connect() on a full listen
backlog) is asked again with jittered exponential back-off, within a bounded
number of attempts and about RETRY_BUDGET seconds; every other answer is final.
"""

# Only modules written in C (and codec.py, which imports nothing): this is on the
# path of every mount, and socket.py alone would bring enum and selectors,
# array and os their own start-up cost. _socket is what socket.py wraps;
# posix is os without os.py. No "from __future__ import annotations" either
# (it imports a module): annotations of names only a type checker knows are
# quoted instead.
import _socket
import errno
import posix
import sys
import time

from fusermount3_proxy import codec, getenv

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from fusermount3_proxy.protocol import MountRequest, Request, Response, UnmountRequest

# Room for exactly one fd (a C int): a broker that attaches more gets
# MSG_CTRUNC, and the kernel discards the fds that did not fit instead of
# installing them here.
_FD_SIZE = 4
_CMSG_BUFSIZE = _socket.CMSG_SPACE(_FD_SIZE)

_HINTS = {
    errno.ENOENT: "is the volume's broker socket mounted into this container?",
    errno.ENOTDIR: "is the volume's broker socket mounted into this container?",
    errno.ECONNREFUSED: "is the csi-async node plugin running on this node?",
    errno.ETIMEDOUT: "is the csi-async node plugin running on this node?",
    errno.EAGAIN: "the broker is not accepting connections",
    errno.EACCES: "this user may not connect to the broker socket",
}

# Back-off for a busy broker. EAGAIN means no slot was free (node-wide, or the
# pod's connection budget): nothing was done, so asking again is always safe.
# The budget stays well inside what callers tolerate (libfuse waits for the
# helper without a limit; a startupProbe has its own deadline). The jitter
# spreads out the many helpers that one burst of pod starts made busy at once.
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 1.0
RETRY_BUDGET = 10.0
RETRY_MAX_ATTEMPTS = 20


class BrokerError(Exception):
    """The exchange with the broker failed; str() is the user-facing message."""


class BrokerUnreachable(BrokerError):
    """Connecting to the broker socket failed."""

    def __init__(self, path: str, err: OSError) -> None:
        code = errno.ETIMEDOUT if isinstance(err, TimeoutError) else err.errno
        hint = _HINTS.get(code) if code is not None else None
        text = f"cannot reach the csi-async broker at {path}: {_reason(err)}"
        super().__init__(f"{text} ({hint})" if hint else text)
        self.errno = code


class Refused(BrokerError):
    """The broker answered, and said no; str() is its reason."""


def socket_path() -> str:
    """Where the broker listens: the environment, else the built-in default."""
    # An empty value is treated as unset: connecting to "" can only fail.
    return getenv(codec.SOCKET_PATH_ENV) or codec.DEFAULT_SOCKET_PATH


def describe(response: "Response") -> str:
    """The text to show for a refused request."""
    if response["message"]:
        return response["message"]
    if response["errno"]:
        return posix.strerror(response["errno"])
    return "the csi-async broker refused the request"


def mount(
    options: list[str],
    mountpoint: str,
    auto_unmount: bool,
    give_up: "Callable[[], bool] | None" = None,
) -> tuple[int | None, int]:
    """Ask for this volume's mount; return (mount id, /dev/fuse fd). The fd is the caller's.

    give_up, if given, is asked before each retry of a busy broker.
    """
    request: MountRequest = {
        "op": "mount",
        "options": options,
        "mountpoint": mountpoint,
        "auto_unmount": auto_unmount,
    }
    response, fd = exchange(request, give_up=give_up)
    if not response["ok"]:
        raise Refused(describe(response))
    if fd is None:
        # A broker that says yes without the fd broke the protocol; undo it.
        unmount(mountpoint, mount_id=response["mount_id"])
        raise BrokerError("the csi-async broker reported a mount but sent no file descriptor")
    return response["mount_id"], fd


def unmount(
    mountpoint: str, *, lazy: bool = True, mount_id: int | None = None, path: str | None = None
) -> None:
    """Ask for this volume's mount to be detached (only mount_id's, if given)."""
    request: UnmountRequest = {
        "op": "unmount",
        "mountpoint": mountpoint,
        "lazy": lazy,
        "mount_id": mount_id,
    }
    response, _ = exchange(request, path=path)
    if not response["ok"]:
        raise Refused(describe(response))


def exchange(
    request: "Request",
    path: str | None = None,
    timeout: float = codec.READ_TIMEOUT,
    give_up: "Callable[[], bool] | None" = None,
    answer_timeout: float = codec.ANSWER_TIMEOUT,
) -> "tuple[Response, int | None]":
    """Send one request and return the response and the fd that came with it.

    The fd is returned only for a successful mount and is then owned by the
    caller. It may be None even then if the broker broke the protocol; the
    caller decides how to roll that back, since only it knows the context.
    Any other fd the broker sent is closed here. `timeout` bounds the connect
    and the send, `answer_timeout` the wait for the answer (see codec.py).

    A busy broker is retried (see RETRY_*); once the retries are spent, its
    last answer (or the connect error) is what the caller gets.
    """
    if path is None:
        path = socket_path()
    try:
        frame = codec.encode_frame(codec.KIND_REQUEST, request)
    except (codec.ProtocolError, UnicodeEncodeError) as err:
        raise BrokerError(f"cannot encode the request for the csi-async broker: {err}") from None

    backoff = Backoff()
    while True:
        try:
            response, fd = _exchange_once(request, frame, path, timeout, answer_timeout)
        except BrokerUnreachable as err:
            if err.errno == errno.EAGAIN and backoff.wait(give_up):
                continue
            raise
        if not response["ok"] and response["errno"] == errno.EAGAIN and backoff.wait(give_up):
            continue
        return response, fd


class Backoff:
    """Jittered exponential back-off, bounded in attempts and in total time."""

    # The clock, as attributes so that a test can run the whole budget on a
    # virtual one against a real socket.
    clock = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    def __init__(self) -> None:
        self.attempts = 1
        self._delay = RETRY_FIRST_DELAY
        self._start = self.clock()

    def wait(self, give_up: "Callable[[], bool] | None" = None) -> bool:
        """Sleep before the next attempt; False (at once) if no attempt is left."""
        if self.attempts >= RETRY_MAX_ATTEMPTS or (give_up is not None and give_up()):
            return False
        # "Equal jitter": between half and all of the current delay, so that
        # helpers refused together do not come back together, yet each one
        # still backs off. urandom spares importing random on this path.
        fraction = int.from_bytes(posix.urandom(2), "big") / 65536
        pause = self._delay * (0.5 + fraction / 2)
        if self.clock() - self._start + pause > RETRY_BUDGET:
            return False
        self.sleep(pause)
        self.attempts += 1
        self._delay = min(self._delay * 2, RETRY_MAX_DELAY)
        return True


def _exchange_once(
    request: "Request", frame: bytes, path: str, timeout: float, answer_timeout: float
) -> "tuple[Response, int | None]":
    sock = _connect(path, timeout)
    fds: list[int] = []
    try:
        try:
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                # The broker may answer (a refusal) and hang up before
                # reading everything; its answer is still there to read.
                pass
            # The request is out; the broker may now wait on our behalf for
            # bounded times that add up to more than READ_TIMEOUT.
            sock.settimeout(answer_timeout)
            header = _recv_exact(sock, codec.HEADER_SIZE, fds)
            length = codec.decode_header(header, codec.KIND_RESPONSE)
            body = _recv_exact(sock, length, fds)
            response = _parse_response(codec.decode_json_object(body))
        except (OSError, codec.ProtocolError) as err:
            raise BrokerError(
                f"error talking to the csi-async broker at {path}: {_reason(err)}"
            ) from None
        fd = None
        if request["op"] == "mount" and response["ok"] and fds:
            fd = fds.pop(0)
        return response, fd
    finally:
        sock.close()
        for extra in fds:
            _close_quietly(extra)


def _connect(path: str, timeout: float) -> _socket.socket:
    # With a timeout set the socket is non-blocking, and a full listen backlog
    # then fails connect() with EAGAIN instead of waiting: exchange() retries
    # that like a busy answer.
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise BrokerUnreachable(path, err) from None
    return sock


def _recv_exact(sock: _socket.socket, size: int, fds: list[int]) -> bytes:
    """Read exactly size bytes, collecting any fds into fds as they arrive.

    Every read uses recvmsg with a control buffer, so an fd attached to any
    segment is received (and later closed if unwanted) rather than lost.
    """
    buf = bytearray()
    while len(buf) < size:
        data, ancdata, flags, _ = sock.recvmsg(
            size - len(buf), _CMSG_BUFSIZE, _socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                # An array of C ints in the machine's byte order.
                for start in range(0, len(cdata) - _FD_SIZE + 1, _FD_SIZE):
                    fds.append(int.from_bytes(cdata[start : start + _FD_SIZE], sys.byteorder))
        if flags & _socket.MSG_CTRUNC:
            raise codec.ProtocolError("the broker sent more file descriptors than expected")
        if not data:
            raise codec.ProtocolError("connection closed before the response was complete")
        buf += data
    return bytes(buf)


def _parse_response(obj: dict[str, object]) -> "Response":
    for key in ("ok", "errno", "message", "mount_id"):
        if key not in obj:
            raise codec.ProtocolError(f"response has no {key!r} field")
    ok = obj["ok"]
    code = obj["errno"]
    message = obj["message"]
    mount_id = obj["mount_id"]
    if not isinstance(ok, bool):
        raise codec.ProtocolError("response field 'ok' is not a boolean")
    if not isinstance(code, int) or isinstance(code, bool):
        raise codec.ProtocolError("response field 'errno' is not an integer")
    if not isinstance(message, str):
        raise codec.ProtocolError("response field 'message' is not a string")
    if mount_id is not None and (not isinstance(mount_id, int) or isinstance(mount_id, bool)):
        raise codec.ProtocolError("response field 'mount_id' is not an integer")
    return {"ok": ok, "errno": code, "message": message, "mount_id": mount_id}


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


def _close_quietly(fd: int) -> None:
    try:
        posix.close(fd)
    except OSError:
        return
