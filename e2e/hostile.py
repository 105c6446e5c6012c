"""A hostile pod: every attack of docs/security.md's actor A1/A2 that a pod can run at once.

Used by tests/test_noisy_neighbour.py (and meant for e2e/soak.py): one pod
runs all of these in a loop while a neighbour pod uses the node normally.

    fuse-fds     mounts its own FUSE volume, served by a tiny raw-/dev/fuse
                 daemon in this process that never answers FLUSH, opens a
                 file on it and sends that fd (SCM_RIGHTS) with request
                 frames to its other volumes' broker sockets. A broker that
                 installs the fd and closes it sends FLUSH to the daemon
                 and waits (uninterruptibly) for an answer that only comes
                 at the deadline. Every FLUSH seen is reported.
    bad-strings  MOUNT and UNMOUNT frames, on volumes with nothing mounted,
                 whose JSON holds lone UTF-16 surrogates ("\\ud800"), which
                 no UTF-8 encoder accepts, in mountpoint, options, keys and
                 op; plus hand-made bodies that are not UTF-8 at all.
    flood        many connections per volume that never send a byte, across
                 several volumes, reconnecting as the broker closes them.
    hung-storm   mounts volumes and never reads the /dev/fuse fd (a hung
                 daemon: the kernel's INIT is never answered), then keeps
                 sending MOUNT to them, so the broker probes a daemon that
                 will not answer.
    socket-race  in a meta-fuse mode volume's emptyDir, replaces the socket
                 name with nothing, its own socket, a directory, a FIFO, a
                 file and a symlink to a victim path, in a loop (the test
                 restarts the driver meanwhile, so it re-creates the socket
                 among all this).

Two halves live here:

* the agent: this file run as a plain script by the system Python inside a
  container of the hostile pod (uid 65534, no capabilities, in the pod's
  cgroup, so the broker's peer check passes). Standard library only, plus
  fusermount3_proxy.protocol, bound next to it. Protocol with the test,
  one JSON object per line: it prints {"ready": ...} once set up (mounts
  made), reads one line {"deadline": <time.monotonic() value>} from stdin,
  runs until then, undoes what it did, and prints {"report": ...}.
  CLOCK_MONOTONIC is the same in every PID namespace, so the deadline means
  the same instant on both sides. Each agent is also bounded in count
  (`max_ops`) and paced, so that it loads the driver without taking the
  machine's CPUs from everything else;
* the host side: `HostilePod` publishes the pod's volumes on an e2e Node,
  starts one container per behaviour, and collects the reports.

The host side never stats a path on a hostile FUSE mount (a hung daemon
would hang the caller): containers that bind a volume's target are created
before anything is mounted there, and the hung volumes' targets are not
bound anywhere at all.
"""

from __future__ import annotations

import array
import errno
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fusermount3_proxy import protocol

if TYPE_CHECKING:
    from e2e.kubelet import Pod
    from e2e.node import FuseVolume, Node
    from e2e.sandbox import Container, PodSandbox

BEHAVIOURS = ("fuse-fds", "bad-strings", "flood", "hung-storm", "socket-race")

# ---------------------------------------------------------------- wire helpers

_FD_SIZE = array.array("i").itemsize
# Room for a few fds in an answer: a broker that sends more than the one it
# should is reported, not silently truncated.
_ANSWER_CONTROL = socket.CMSG_SPACE(4 * _FD_SIZE)
# How long an exchange may take: the broker's own read deadline, a liveness
# probe of a hung daemon (2 s) and slack for a loaded node.
EXCHANGE_TIMEOUT = protocol.READ_TIMEOUT + 5.0


def request_frame(body: bytes) -> bytes:
    """A request frame around an arbitrary (possibly invalid) body."""
    return (
        protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.KIND_REQUEST, 0, len(body))
        + body
    )


def json_body(value: object) -> bytes:
    """JSON with every non-ASCII character escaped: lone surrogates become
    "\\ud800" escapes, which is valid JSON whose string no UTF-8 encoder takes."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def mount_body(options: list[str] | None = None, mountpoint: str = "/run/data") -> bytes:
    return json_body(
        {"op": "mount", "options": options or [], "mountpoint": mountpoint, "auto_unmount": False}
    )


def unmount_body(mountpoint: str = "/run/data", mount_id: int | None = None) -> bytes:
    return json_body(
        {"op": "unmount", "mountpoint": mountpoint, "lazy": True, "mount_id": mount_id}
    )


@dataclass
class Outcome:
    """What one exchange with a broker socket came to."""

    # "ok", "refused:<ERRNO>", "closed" (no answer), "no answer" (timeout),
    # "garbled answer", "unreachable:<ERRNO>" (connect failed).
    kind: str
    response: dict[str, Any] | None = None
    fds: list[int] = field(default_factory=list)

    @property
    def message(self) -> str:
        return str(self.response.get("message", "")) if self.response else ""


def _errno_name(code: int | None) -> str:
    return errno.errorcode.get(code or 0, str(code))


def _fds_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    return list(fds)


def connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(
    path: str,
    chunks: list[tuple[bytes, list[int]]],
    timeout: float = EXCHANGE_TIMEOUT,
) -> Outcome:
    """Connect, send each (bytes, fds attached) chunk, read one answer."""
    try:
        sock = connect(path, timeout)
    except TimeoutError:
        return Outcome("unreachable:ETIMEDOUT")
    except OSError as err:
        return Outcome(f"unreachable:{_errno_name(err.errno)}")
    with sock:
        for data, fds in chunks:
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            )
            try:
                sock.sendmsg([data], ancillary)
            except (BrokenPipeError, ConnectionResetError):
                break  # it hung up early; it may still have answered
            except TimeoutError:
                return Outcome("no answer")
            except OSError as err:
                # EPERM: the socket refuses SCM_RIGHTS (SO_PASSRIGHTS off).
                return Outcome(f"send refused:{_errno_name(err.errno)}")
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> Outcome:
    fds: list[int] = []
    header = b""
    try:
        while len(header) < protocol.HEADER_SIZE:
            data, ancillary, _flags, _ = sock.recvmsg(
                protocol.HEADER_SIZE - len(header), _ANSWER_CONTROL, socket.MSG_CMSG_CLOEXEC
            )
            fds += _fds_in(ancillary)
            if not data:
                return Outcome("closed", None, fds)
            header += data
        length = protocol.decode_header(header, protocol.KIND_RESPONSE)
        body = b""
        while len(body) < length:
            data = sock.recv(length - len(body))
            if not data:
                return Outcome("garbled answer", None, fds)
            body += data
        response = json.loads(body.decode("utf-8"))
    except TimeoutError:
        return Outcome("no answer", None, fds)
    except ConnectionResetError:
        return Outcome("closed", None, fds)
    except (protocol.ProtocolError, ValueError):
        return Outcome("garbled answer", None, fds)
    if not isinstance(response, dict):
        return Outcome("garbled answer", None, fds)
    kind = "ok" if response.get("ok") is True else f"refused:{_errno_name(response.get('errno'))}"
    return Outcome(kind, response, fds)


class Tally:
    """Thread-safe counts of outcomes, plus anomalies (things a sound broker never does)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.anomalies: list[str] = []
        self.ops = 0

    def add(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1
            self.ops += 1

    def anomaly(self, text: str) -> None:
        with self._lock:
            if len(self.anomalies) < 50:
                self.anomalies.append(text)

    def report(self, **extra: object) -> dict[str, object]:
        with self._lock:
            return {
                "ops": self.ops,
                "counts": dict(self.counts),
                "anomalies": list(self.anomalies),
                **extra,
            }


def _undo_unexpected_mount(path: str, outcome: Outcome, tally: Tally, what: str) -> None:
    """A request that must be refused was served: say so, drop the fd (the
    mount is dead then) and ask for it to be unmounted, so nothing is left."""
    tally.anomaly(f"{what}: the broker answered ok ({outcome.response})")
    for fd in outcome.fds:
        os.close(fd)
    mount_id = outcome.response.get("mount_id") if outcome.response else None
    if isinstance(mount_id, int):
        exchange(path, [(request_frame(unmount_body(mount_id=mount_id)), [])])


def _close_fds(outcome: Outcome) -> None:
    for fd in outcome.fds:
        os.close(fd)
    outcome.fds = []


def _mount_for_setup(path: str, give_up_at: float) -> tuple[int, int]:
    """MOUNT this pod's own volume: (mount_id, /dev/fuse fd). Retries while busy."""
    last = "no attempt"
    while time.monotonic() < give_up_at:
        outcome = exchange(path, [(request_frame(mount_body()), [])])
        if outcome.kind == "ok" and len(outcome.fds) == 1 and outcome.response is not None:
            return int(outcome.response["mount_id"]), outcome.fds[0]
        _close_fds(outcome)
        last = f"{outcome.kind} {outcome.message}".strip()
        time.sleep(0.1)
    raise RuntimeError(f"could not mount through {path}: {last}")


def _pace(interval: float, deadline: float) -> None:
    time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


# ---------------------------------------------------------------- a FUSE daemon that holds FLUSH

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
_IN_HEADER = struct.Struct("<IIQQIIIHH")
_OUT_HEADER = struct.Struct("<IiQ")
_INIT_IN = struct.Struct("<IIII")
# struct fuse_init_out (64 bytes, protocol 7.23 and later)
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# struct fuse_attr: ino, size, blocks, atime, mtime, ctime, three nsecs, mode,
# nlink, uid, gid, rdev, blksize, flags
_ATTR = "QQQQQQ" + "III" + "IIIIIII"
_ATTR_OUT = struct.Struct("<QII" + _ATTR)
_ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)
_OPEN_OUT = struct.Struct("<QII")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_OPEN = 14
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_INTERRUPT = 36
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42
_NO_REPLY = frozenset({FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET})
_READ_BUFFER = 1024 * 1024 + 4096
FILE_NAME = "victim"
_FILE_NODE = 2


class FlushHoldingDaemon:
    """Serves one file, answers everything it must to let it be opened, and,
    between hold() and release(), holds every FLUSH unanswered. This process
    never closes an fd of the file in that time, so every FLUSH held is
    someone else's close of an fd it was sent."""

    def __init__(self, fuse_fd: int) -> None:
        self.fd = fuse_fd
        self._lock = threading.Lock()
        self._held: list[int] = []
        # (pid, uid) of each FLUSH held: the pid is in the mounter's (the
        # driver's) PID namespace, i.e. a host pid.
        self.flushes: list[tuple[int, int]] = []
        # FLUSHes answered at once (before hold() or after release()).
        self.answered_flushes = 0
        self._released = True
        self.thread = threading.Thread(target=self._serve, name="hostile-fuse", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def hold(self) -> None:
        """From now on, hold every FLUSH until release()."""
        with self._lock:
            self._released = False

    def release(self) -> None:
        """Answer every held FLUSH, and every later one at once."""
        with self._lock:
            self._released = True
            held, self._held = self._held, []
        for unique in held:
            self._reply(unique)

    def _reply(self, unique: int, error: int = 0, payload: bytes = b"") -> None:
        header = _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), -error, unique)
        try:
            os.write(self.fd, header + payload)
        except OSError:
            pass  # interrupted meanwhile (ENOENT), or the connection is gone

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self.fd, _READ_BUFFER)
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.ENOENT:
                    continue
                return  # ENODEV (unmounted) or ECONNABORTED (aborted)
            if not request or not self._handle(request):
                return

    def _attr(self, node: int, uid: int, gid: int) -> tuple[int, ...]:
        mode = 0o040755 if node == 1 else 0o100666
        return (node, 0, 0, 0, 0, 0, 0, 0, 0, mode, 1, uid, gid, 0, 4096, 0)

    def _handle(self, request: bytes) -> bool:
        _len, opcode, unique, node, uid, gid, pid, _ext, _pad = _IN_HEADER.unpack_from(request)
        body = request[_IN_HEADER.size :]
        if opcode in _NO_REPLY:
            return True
        if opcode == FUSE_INIT:
            _major, minor, readahead, _flags = _INIT_IN.unpack_from(body)
            self._reply(
                unique, 0, _INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, 1 << 17,
                                          1, 0, 0, 0, 0)
            )  # fmt: skip
        elif opcode == FUSE_LOOKUP:
            if node == 1 and body.rstrip(b"\0") == FILE_NAME.encode():
                self._reply(
                    unique, 0, _ENTRY_OUT.pack(_FILE_NODE, 0, 1, 1, 0, 0,
                                               *self._attr(_FILE_NODE, uid, gid))
                )  # fmt: skip
            else:
                self._reply(unique, errno.ENOENT)
        elif opcode == FUSE_GETATTR and node in (1, _FILE_NODE):
            self._reply(unique, 0, _ATTR_OUT.pack(1, 0, 0, *self._attr(node, uid, gid)))
        elif opcode == FUSE_OPEN and node == _FILE_NODE:
            self._reply(unique, 0, _OPEN_OUT.pack(1, 0, 0))  # no FOPEN_NOFLUSH
        elif opcode == FUSE_FLUSH:
            with self._lock:
                if not self._released:
                    self._held.append(unique)
                    self.flushes.append((pid, uid))
                    return True
                self.answered_flushes += 1
            self._reply(unique)
        elif opcode == FUSE_STATFS:
            self._reply(unique, 0, _STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0))
        elif opcode == FUSE_RELEASE:
            self._reply(unique)
        elif opcode == FUSE_DESTROY:
            self._reply(unique)
            return False
        else:
            self._reply(unique, errno.ENOSYS)
        return True


# ---------------------------------------------------------------- the behaviours (agent side)


class Agent:
    """One behaviour: set_up() before "ready", run(deadline), tear_down()."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.tally = Tally()
        self.max_ops = int(config.get("max_ops", 100_000))

    def set_up(self, give_up_at: float) -> dict[str, object]:
        return {}

    def run(self, deadline: float) -> None:
        raise NotImplementedError

    def tear_down(self) -> None:
        pass

    def report(self) -> dict[str, object]:
        return self.tally.report()

    def _more(self, deadline: float) -> bool:
        return time.monotonic() < deadline and self.tally.ops < self.max_ops


class FuseFdsAgent(Agent):
    """Sends fds of a file on its own hung-on-FLUSH FUSE mount with requests."""

    def set_up(self, give_up_at: float) -> dict[str, object]:
        self.own_socket = str(self.config["own_socket"])
        self.mount_id, fuse_fd = _mount_for_setup(self.own_socket, give_up_at)
        self.daemon = FlushHoldingDaemon(fuse_fd)
        self.daemon.start()
        path = os.path.join(str(self.config["own_mount"]), FILE_NAME)
        while True:  # the mount propagates into this container with the MOUNT
            try:
                self.file_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break
            except FileNotFoundError:
                if time.monotonic() > give_up_at:
                    raise
                time.sleep(0.05)
        if not stat.S_ISREG(os.fstat(self.file_fd).st_mode):
            raise RuntimeError(f"{path} is not the daemon's file")
        # Self-test: closing a copy of the fd must send FLUSH to the daemon
        # (answered now, held from hold() on), or this attack tests nothing.
        os.close(os.dup(self.file_fd))
        if self.daemon.answered_flushes != 1:
            raise RuntimeError("closing a file on the mount sent no FLUSH to its daemon")
        self.daemon.hold()
        return {"mount_id": self.mount_id}

    def _variants(self) -> list[tuple[str, list[tuple[bytes, list[int]]]]]:
        fd = self.file_fd
        mount = request_frame(mount_body())
        unmount = request_frame(unmount_body())
        header = protocol.HEADER_SIZE
        return [
            ("mount frame with the fd", [(mount, [fd])]),
            ("unmount frame with the fd", [(unmount, [fd])]),
            ("mount frame with the fd three times", [(mount, [fd, fd, fd])]),
            ("the fd on the body, not the header", [(mount[:header], []), (mount[header:], [fd])]),
            ("the fd on the first byte only", [(mount[:1], [fd]), (mount[1:], [])]),
        ]

    def run(self, deadline: float) -> None:
        targets = [str(t) for t in self.config["targets"]]
        variants = self._variants()
        interval = float(self.config.get("interval", 0.05))
        index = 0
        while self._more(deadline):
            what, chunks = variants[index % len(variants)]
            target = targets[index % len(targets)]
            index += 1
            outcome = exchange(target, chunks)
            self.tally.add(f"{what}: {outcome.kind}")
            if outcome.kind == "ok":
                _undo_unexpected_mount(target, outcome, self.tally, f"{what} on {target}")
            _close_fds(outcome)
            _pace(interval, deadline)

    def tear_down(self) -> None:
        self.daemon.release()
        os.close(self.file_fd)
        # Unmount our own volume; our exit would end it anyway (the daemon's
        # fd closes, the connection is aborted and the broker cleans up).
        give_up_at = time.monotonic() + 5.0
        while time.monotonic() < give_up_at:
            outcome = exchange(self.own_socket, [(request_frame(unmount_body(
                mount_id=self.mount_id)), [])], timeout=2.0)  # fmt: skip
            _close_fds(outcome)
            if outcome.kind == "ok":
                break
            time.sleep(0.1)
        self.daemon.thread.join(2.0)
        os.close(self.daemon.fd)

    def report(self) -> dict[str, object]:
        return self.tally.report(flushes=[list(f) for f in self.daemon.flushes])


# Bodies with lone surrogates (escaped, so valid JSON) and bodies that are not
# UTF-8. Every MOUNT has a surrogate in an option, so that no sound broker
# can mount it; the UNMOUNTs go to volumes with nothing mounted.
BAD_STRING_CASES: list[tuple[str, bytes]] = [
    ("mount: lone high surrogate option", mount_body(["\ud800"])),
    ("mount: lone low surrogates in option and mountpoint",
     mount_body(["rw", "\udfff"], "/run/\udc00data")),
    ("mount: surrogate in subtype=", mount_body(["subtype=\ud83d"])),
    ("mount: surrogate in fsname=", mount_body(["fsname=\udc80x"], "\ud800")),
    ("mount: surrogate in max_read=", mount_body(["max_read=\ud800"])),
    ("mount: reversed pair in an option", mount_body(["\udc00\ud800"], "/\udc00\ud800")),
    ("mount: surrogate as a key", json_body({"op": "mount", "options": ["\ud800"],
                                             "mountpoint": "/x", "auto_unmount": False,
                                             "\ud800": 1})),
    ("surrogate as op", json_body({"op": "\ud800", "options": ["\ud800"], "mountpoint": "/x",
                                   "auto_unmount": False})),
    ("unmount: surrogate mountpoint", unmount_body("\ud800")),
    ("unmount: surrogates around NUL", unmount_body("\udbff\u0000\udc00")),
    ("unmount: surrogate mountpoint with a stale id", unmount_body("/\udfff", 1)),
    ("mount: UTF-8-encoded surrogate (not UTF-8)",
     b'{"op":"mount","options":["\xed\xa0\x80"],"mountpoint":"/run/data","auto_unmount":false}'),
    ("unmount: overlong UTF-8", b'{"op":"unmount","mountpoint":"\xc0\xaf","lazy":true,'
                                b'"mount_id":null}'),
    ("mount: truncated escape", b'{"op":"mount","options":["\\ud8"],"mountpoint":"/x",'
                                b'"auto_unmount":false}'),
    ("mount: unterminated string after a surrogate",
     b'{"op":"mount","options":["\\ud800'),
]  # fmt: skip


class BadStringsAgent(Agent):
    def run(self, deadline: float) -> None:
        targets = [str(t) for t in self.config["targets"]]
        interval = float(self.config.get("interval", 0.02))
        index = 0
        while self._more(deadline):
            what, body = BAD_STRING_CASES[index % len(BAD_STRING_CASES)]
            target = targets[(index // len(BAD_STRING_CASES)) % len(targets)]
            index += 1
            outcome = exchange(target, [(request_frame(body), [])])
            self.tally.add(f"{what}: {outcome.kind}")
            if outcome.kind == "ok" and what.startswith("mount"):
                _undo_unexpected_mount(target, outcome, self.tally, f"{what} on {target}")
            _close_fds(outcome)
            _pace(interval, deadline)


class FloodAgent(Agent):
    """Keeps `per_target` silent connections open to each target."""

    def run(self, deadline: float) -> None:
        targets = [str(t) for t in self.config["targets"]]
        per_target = int(self.config.get("per_target", 12))
        rate = float(self.config.get("connects_per_second", 100.0))
        poller = select.poll()
        open_: dict[int, tuple[socket.socket, int, float]] = {}
        counts = [0] * len(targets)
        burst = float(per_target * len(targets))
        allowance, last = burst, time.monotonic()
        try:
            while self._more(deadline):
                now = time.monotonic()
                allowance = min(allowance + (now - last) * rate, burst)
                last = now
                for index, target in enumerate(targets):
                    while counts[index] < per_target and allowance >= 1.0:
                        allowance -= 1.0
                        sock = self._connect(target)
                        if sock is None:
                            break  # refused or backlog full: try again next round
                        open_[sock.fileno()] = (sock, index, now)
                        counts[index] += 1
                        poller.register(sock, select.POLLIN)
                for fd, _events in poller.poll(20):
                    sock, index, opened = open_.pop(fd)
                    poller.unregister(fd)
                    counts[index] -= 1
                    self.tally.add(f"closed by the broker: {self._answer(sock)}")
                    if time.monotonic() - opened >= protocol.READ_TIMEOUT - 0.5:
                        self.tally.add("held until the read deadline")
                    sock.close()
        finally:
            for sock, _index, _opened in open_.values():
                sock.close()

    def _connect(self, target: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(target)
        except OSError as err:
            sock.close()
            self.tally.add(f"connect: {_errno_name(err.errno)}")
            return None
        self.tally.add("connect: ok")
        return sock

    @staticmethod
    def _answer(sock: socket.socket) -> str:
        try:
            data = sock.recv(protocol.HEADER_SIZE + protocol.MAX_BODY)
        except OSError as err:
            return _errno_name(err.errno)
        if len(data) < protocol.HEADER_SIZE:
            return "no answer"
        try:
            protocol.decode_header(data[: protocol.HEADER_SIZE], protocol.KIND_RESPONSE)
            response = json.loads(data[protocol.HEADER_SIZE :])
            return f"refused:{_errno_name(response.get('errno'))}"
        except (protocol.ProtocolError, ValueError, AttributeError):
            return "garbled answer"


class HungStormAgent(Agent):
    """Mounts volumes whose /dev/fuse fd it never reads, then storms them with MOUNT."""

    def set_up(self, give_up_at: float) -> dict[str, object]:
        self.targets = [str(t) for t in self.config["targets"]]
        self.held: list[tuple[str, int, int]] = []
        for target in self.targets:
            mount_id, fuse_fd = _mount_for_setup(target, give_up_at)
            self.held.append((target, mount_id, fuse_fd))
        return {"mount_ids": [mount_id for _t, mount_id, _fd in self.held]}

    def run(self, deadline: float) -> None:
        per_target = int(self.config.get("threads_per_target", 4))
        interval = float(self.config.get("interval", 0.2))

        def storm(target: str) -> None:
            while self._more(deadline):
                outcome = exchange(target, [(request_frame(mount_body()), [])])
                self.tally.add(f"MOUNT on the hung volume: {outcome.kind}")
                if outcome.kind == "ok":
                    _undo_unexpected_mount(target, outcome, self.tally, f"MOUNT on {target}")
                _close_fds(outcome)
                _pace(interval, deadline)

        threads = [
            threading.Thread(target=storm, args=(target,), name="hostile-storm", daemon=True)
            for target in self.targets
            for _ in range(per_target)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + EXCHANGE_TIMEOUT + 1.0)

    def tear_down(self) -> None:
        # Closing the fds aborts the connections: whatever waits on them
        # (the broker's probes) gets an error now.
        for _target, _mount_id, fuse_fd in self.held:
            os.close(fuse_fd)
        for target, mount_id, _fd in self.held:
            outcome = exchange(target, [(request_frame(unmount_body(mount_id=mount_id)), [])],
                               timeout=2.0)  # fmt: skip
            _close_fds(outcome)


class SocketRaceAgent(Agent):
    """Races the meta-fuse socket name in the pod's emptyDir."""

    STATES = ("absent", "own socket", "directory", "fifo", "file", "symlink", "probe")

    def run(self, deadline: float) -> None:
        directory = str(self.config["directory"])
        name = str(self.config["name"])
        victim = str(self.config["victim"])
        interval = float(self.config.get("interval", 0.0005))
        path = os.path.join(directory, name)
        own: socket.socket | None = None
        index = 0
        try:
            while self._more(deadline):
                state = self.STATES[index % len(self.STATES)]
                index += 1
                if state == "probe":
                    self._probe(path)
                    continue
                if own is not None:
                    own.close()
                    own = None
                self._remove(path)
                try:
                    if state == "own socket":
                        own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        own.bind(path)
                    elif state == "directory":
                        os.mkdir(path)
                    elif state == "fifo":
                        os.mkfifo(path)
                    elif state == "file":
                        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    elif state == "symlink":
                        os.symlink(victim, path)
                    self.tally.add(state)
                except OSError as err:
                    # The driver's restore got there first (EADDRINUSE, EEXIST).
                    self.tally.add(f"{state}: {_errno_name(err.errno)}")
                time.sleep(interval)
        finally:
            if own is not None:
                own.close()
            self._remove(path)

    def _remove(self, path: str) -> None:
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            self.tally.add(f"remove: {_errno_name(err.errno)}")

    def _probe(self, path: str) -> None:
        """Whether the broker (re)bound the name and serves it now."""
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                return
        except FileNotFoundError:
            return
        outcome = exchange(path, [(request_frame(unmount_body()), [])], timeout=2.0)
        _close_fds(outcome)
        if outcome.kind.startswith("refused"):
            self.tally.add("the broker answered on the raced name")


AGENTS: dict[str, Callable[[dict[str, Any]], Agent]] = {
    "fuse-fds": FuseFdsAgent,
    "bad-strings": BadStringsAgent,
    "flood": FloodAgent,
    "hung-storm": HungStormAgent,
    "socket-race": SocketRaceAgent,
}
SET_UP_TIMEOUT = 30.0
# How long a ready agent waits for its deadline before giving up.
GO_TIMEOUT = 120.0


def _say(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def agent_main(argv: list[str]) -> int:
    """python3 hostile.py BEHAVIOUR '<json config>' (in the hostile pod's container)."""
    behaviour, config = argv[0], json.loads(argv[1])
    agent = AGENTS[behaviour](config)
    try:
        details = agent.set_up(time.monotonic() + SET_UP_TIMEOUT)
    except Exception as err:
        _say({"error": f"set-up failed: {type(err).__name__}: {err}"})
        return 1
    _say({"ready": details})
    waiting, _, _ = select.select([sys.stdin], [], [], GO_TIMEOUT)
    line = sys.stdin.readline() if waiting else ""
    if not line:
        agent.tear_down()  # the test went away (or forgot us) before starting us
        return 1
    deadline = float(json.loads(line)["deadline"])
    try:
        agent.run(deadline)
    finally:
        agent.tear_down()
    _say({"report": agent.report()})
    return 0


# ---------------------------------------------------------------- the host side

REPO = Path(__file__).resolve().parent.parent
# Where the agent and the protocol module it imports appear in the containers.
AGENT_DIR = "/run/hostile"
SYSTEM_PYTHON = "/usr/bin/python3"
META_EMPTY_DIR = "/run/fuse-fd-passing"
OWN_MOUNT = "/run/own"


class HostileError(RuntimeError):
    """The hostile pod itself misbehaved (could not set up, did not stop)."""


@dataclass
class AgentProcess:
    behaviour: str
    container: Container
    ready: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    _buffer: bytes = b""

    def read_message(self, give_up_at: float) -> dict[str, Any]:
        """The agent's next JSON line on stdout, waiting until give_up_at."""
        assert self.container.stdout is not None
        fd = self.container.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                raise HostileError(f"hostile agent {self.behaviour} said nothing in time"
                                   f"{self._stderr_tail()}")  # fmt: skip
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise HostileError(
                        f"hostile agent {self.behaviour} exited ({self.container.poll()}) "
                        f"without a word{self._stderr_tail()}"
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if "error" in message:
            raise HostileError(f"hostile agent {self.behaviour}: {message['error']}")
        return dict(message)

    def _stderr_tail(self) -> str:
        stream: IO[bytes] | None = self.container.stderr
        if stream is None or self.container.poll() is None:
            return ""
        return ":\n" + stream.read().decode(errors="replace")[-2000:]


class HostilePod:
    """A pod that runs every behaviour at once against its own volumes.

    Volumes (all of this one pod, so its containers pass the peer check):
    `own` (fuse-fds' mount), `fd-<i>` (targets of the fds), `str-<i>`
    (targets of bad strings), `flood-<i>`, `hung-<i>` (mounted, never
    served), all native mode, and `meta`, a meta-fuse mode volume whose
    socket sits in the emptyDir the pod races in.
    """

    def __init__(
        self,
        node: Node,
        pod: Pod,
        victim: Path,
        *,
        flood_volumes: int = 8,
        flood_connections: int = 12,
        hung_volumes: int = 2,
        fd_volumes: int = 2,
        string_volumes: int = 2,
        behaviours: tuple[str, ...] = BEHAVIOURS,
    ) -> None:
        unknown = set(behaviours) - set(BEHAVIOURS)
        if unknown:
            raise ValueError(f"unknown behaviours {sorted(unknown)}")
        self.behaviours = behaviours
        self.node = node
        self.pod = pod
        self.victim = victim
        self.flood_connections = flood_connections
        self.names = {
            "own": ["own"],
            "fd": [f"fd-{i}" for i in range(fd_volumes)],
            "str": [f"str-{i}" for i in range(string_volumes)],
            "flood": [f"flood-{i}" for i in range(flood_volumes)],
            "hung": [f"hung-{i}" for i in range(hung_volumes)],
        }
        self.volumes: dict[str, FuseVolume] = {}
        self.agents: dict[str, AgentProcess] = {}
        self.sandboxes: list[PodSandbox] = []
        self.empty_dir: Path | None = None

    # -------------------------------------------------------------- volumes

    def publish(self) -> None:
        for names in self.names.values():
            for name in names:
                self.volumes[name] = self.node.publish_fuse_volume(self.pod, name)
        meta = self.node.publish_fuse_volume(self.pod, "meta", mode="meta-fuse")
        self.volumes["meta"] = meta
        (self.empty_dir,) = meta.socket_binds.values()

    @property
    def meta_socket_name(self) -> str:
        return os.path.basename(self.volumes["meta"].env[protocol.SOCKET_PATH_ENV])

    def unpublish(self) -> None:
        for name, volume in reversed(list(self.volumes.items())):
            for published in [name, *volume.companion_volumes]:
                self.node.unpublish(self.pod, published)
        self.volumes.clear()

    # -------------------------------------------------------------- agents

    @staticmethod
    def _socket(name: str) -> str:
        return f"/run/vol/{name}/fuse.sock"

    def _socket_binds(self, names: list[str]) -> dict[str, Path]:
        """Each native volume's socket directory (its only socket bind) at /run/vol/<name>."""
        binds = {}
        for name in names:
            (socket_dir,) = self.volumes[name].socket_binds.values()
            binds[f"/run/vol/{name}"] = socket_dir
        return binds

    def _configs(self) -> dict[str, tuple[dict[str, Path], dict[str, object]]]:
        """Each behaviour's binds (only what it needs) and config."""
        names = self.names
        assert self.empty_dir is not None
        return {
            "fuse-fds": (
                {**self._socket_binds(names["own"] + names["fd"]),
                 OWN_MOUNT: self.volumes["own"].target},
                {"own_socket": self._socket("own"), "own_mount": OWN_MOUNT,
                 "targets": [self._socket(n) for n in names["fd"]]},
            ),
            "bad-strings": (
                self._socket_binds(names["str"]),
                {"targets": [self._socket(n) for n in names["str"]]},
            ),
            "flood": (
                self._socket_binds(names["flood"]),
                {"targets": [self._socket(n) for n in names["flood"]],
                 "per_target": self.flood_connections},
            ),
            "hung-storm": (
                self._socket_binds(names["hung"]),  # never the targets: they hang
                {"targets": [self._socket(n) for n in names["hung"]]},
            ),
            "socket-race": (
                {META_EMPTY_DIR: self.empty_dir},
                {"directory": META_EMPTY_DIR, "name": self.meta_socket_name,
                 "victim": str(self.victim)},
            ),
        }  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        """Start every agent and wait until each is set up (its mounts made).

        No container binds a path another agent mounts on: creating a
        container stats its binds, which a hung mount would hang. fuse-fds
        binds the target of its own mount, which it makes only once its
        container exists; the hung volumes' targets are bound nowhere.
        """
        code = {
            f"{AGENT_DIR}/hostile.py": Path(__file__).resolve(),
            f"{AGENT_DIR}/fusermount3_proxy": REPO / "fusermount3_proxy",
        }
        configs = {b: c for b, c in self._configs().items() if b in self.behaviours}
        sandboxes = {
            behaviour: self.node.sandbox(binds, ro_binds=code)
            for behaviour, (binds, _config) in configs.items()
        }
        self.sandboxes = list(sandboxes.values())
        for behaviour, (_binds, config) in configs.items():
            argv = [SYSTEM_PYTHON, "-E", "-s", "-S", "-B", f"{AGENT_DIR}/hostile.py", behaviour,
                    json.dumps(config)]  # fmt: skip
            container = sandboxes[behaviour].spawn(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self.agents[behaviour] = AgentProcess(behaviour, container)
        give_up_at = time.monotonic() + timeout
        for agent in self.agents.values():
            agent.ready = agent.read_message(give_up_at)["ready"]

    def go(self, deadline: float) -> None:
        """Unleash every agent until `deadline` (a time.monotonic() value)."""
        for agent in self.agents.values():
            stdin = agent.container.stdin
            assert stdin is not None
            stdin.write(json.dumps({"deadline": deadline}).encode() + b"\n")
            stdin.flush()

    def wait(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Each agent's report, once all have stopped on their own."""
        give_up_at = time.monotonic() + timeout
        for agent in self.agents.values():
            agent.report = agent.read_message(give_up_at)["report"]
        for agent in self.agents.values():
            try:
                agent.container.wait(max(0.1, give_up_at - time.monotonic()))
            except subprocess.TimeoutExpired as err:
                raise HostileError(f"hostile agent {agent.behaviour} did not exit") from err
        return {b: a.report for b, a in self.agents.items() if a.report is not None}

    def kill(self) -> None:
        """SIGKILL whatever is left of the pod's containers and wait until they are gone."""
        for sandbox in self.sandboxes:
            sandbox.kill_all()


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
