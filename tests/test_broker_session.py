"""One broker connection as a state machine, in-process: refusals, budgets, failures.

Real VolumeBrokers serve real listening sockets (sockets.listen_in) on this
test's event loop; clients are real Unix sockets in worker threads speaking
the real frame format. Nothing here mounts: a MOUNT that gets as far as the
mount syscalls finds no target directory and fails with ENOENT.

Each test names the fix of "Broker: no pod can stall or crash the driver"
(33c25b8) it guards; each fails when that fix is reverted.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

import csi_async.broker.lifecycle as lifecycle_module
import csi_async.broker.session as session_module
from csi_async.broker import framing, sockets, wire
from csi_async.broker.fuse_waits import FuseWaits, NoSlot, Outcome
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.listener import VolumeBroker
from csi_async.broker.mount_records import MountRecords
from csi_async.broker.session import Session
from csi_async.broker.target import VolumeTarget
from csi_async.kubelet.volume_context import ephemeral_volume_id
from csi_async.mount.paths import PinnedRoot
from csi_async.policy.node import NodePolicy
from fusermount3_proxy import protocol

Answer = dict[str, Any]
POLICY = NodePolicy(require_pod_cgroup=False)
SOCKET_NAME = "fuse.sock"
# Long enough that a connection still waiting for its frame is unmistakable.
PATIENT_READ = 60.0
# "At once": far below any read timeout, generous for a loaded 2-core machine.
PROMPT = 1.5


# ---------------------------------------------------------------- clients (worker threads)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if data:
                raise AssertionError(f"answer cut off after {len(data)} bytes")
            return None
        data += chunk
    return bytes(data)


def read_answer(sock: socket.socket) -> Answer | None:
    """The broker's response frame, or None if it hung up without one."""
    header = _recv_exact(sock, protocol.HEADER_SIZE)
    if header is None:
        return None
    length = protocol.decode_header(header, protocol.KIND_RESPONSE)
    body = _recv_exact(sock, length)
    assert body is not None, "a response header without a body"
    answer = json.loads(body.decode("utf-8"))
    assert isinstance(answer, dict)
    # (A broker that refused before reading what we sent resets the connection.)
    assert _recv_exact(sock, 1) is None, "more than one frame in the answer"
    return answer


def exchange(path: str, payload: bytes, timeout: float = 10.0) -> tuple[Answer | None, float]:
    """Connect, send payload (maybe nothing), read the answer; also how long it took."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        started = time.monotonic()
        if payload:
            try:
                sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before it read our frame; the answer is still queued
        answer = read_answer(sock)
        return answer, time.monotonic() - started


async def ask(path: str, payload: bytes, timeout: float = 10.0) -> Answer | None:
    answer, _ = await anyio.to_thread.run_sync(exchange, path, payload, timeout)
    return answer


async def ask_timed(path: str, payload: bytes, timeout: float = 10.0) -> tuple[Answer, float]:
    answer, elapsed = await anyio.to_thread.run_sync(exchange, path, payload, timeout)
    assert answer is not None, "the broker hung up without answering"
    return answer, elapsed


def frame_of(body: object) -> bytes:
    # ensure_ascii: a lone surrogate travels as a JSON \\ud800 escape, as a
    # hostile client would send it.
    data = json.dumps(body).encode("ascii")
    return protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.KIND_REQUEST, 0,
                                len(data)) + data  # fmt: skip


def unmount_frame(mountpoint: str = "/run/data") -> bytes:
    return frame_of({"op": "unmount", "mountpoint": mountpoint, "lazy": False, "mount_id": None})


def mount_frame(options: list[str], mountpoint: str = "/run/data") -> bytes:
    return frame_of(
        {"op": "mount", "options": options, "mountpoint": mountpoint, "auto_unmount": False}
    )


def silent_connection(path: str) -> socket.socket:
    """A connection that never sends a byte (connect() needs no accept())."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(path)
    return sock


def answered_einval(answer: Answer | None) -> None:
    """What an UNMOUNT gets when nothing is mounted: the full path was served."""
    assert answer is not None, "no answer"
    assert answer["ok"] is False
    assert answer["errno"] == errno.EINVAL, answer
    assert "not found" in answer["message"]


# ---------------------------------------------------------------- brokers on this loop


@dataclass
class Volume:
    broker: VolumeBroker
    path: str
    pod_uid: str


@dataclass
class Node:
    """Brokers of several pods sharing one BrokerLimits, as in the driver."""

    kubelet: Path
    socket_root: Path
    limits: BrokerLimits
    root: PinnedRoot = field(init=False)
    volumes: list[Volume] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = PinnedRoot(str(self.kubelet))

    def volume(self, pod_uid: str, name: str = "data") -> Volume:
        relative = f"pods/{pod_uid}/volumes/kubernetes.io~csi/{name}/mount"
        target = VolumeTarget(
            relative=relative,
            absolute=f"{self.kubelet}/{relative}",
            pod_uid=pod_uid,
            pod_namespace="default",
            pod_name="app",
            volume_name=name,
            volume_id=ephemeral_volume_id(pod_uid, name),
            read_only=False,
            persistent=False,
            options=(),
        )
        directory = self.socket_root / str(len(self.volumes))
        directory.mkdir()
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        bound = sockets.listen_in(dir_fd, SOCKET_NAME)
        broker = new_broker(
            self.socket_root / "state",
            target=target, kubelet_root=self.root, bound=bound, policy=POLICY, limits=self.limits,
        )  # fmt: skip
        volume = Volume(broker, str(directory / SOCKET_NAME), pod_uid)
        self.volumes.append(volume)
        return volume


def new_broker(state_dir: Path, **arguments: Any) -> VolumeBroker:
    return VolumeBroker(mount_records=MountRecords(state_dir), **arguments)


@pytest.fixture
def socket_root() -> Iterator[Path]:
    # Short, so that socket paths stay below sun_path's 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="csi-bs-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def serving(node: Node) -> AsyncIterator[Node]:
    """Every broker of the node serving in one task group, like the driver's.

    A broker whose serve task dies takes the task group, and so the test, down.
    """
    try:
        async with anyio.create_task_group() as tg:
            for volume in node.volumes:
                await tg.start(volume.broker.serve)
            yield node
            for volume in node.volumes:
                assert not volume.broker._done.is_set(), "a serve task ended"
                await volume.broker.close()
    finally:
        node.root.close()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.01)


async def counters_settle(volume: Volume, limits: BrokerLimits) -> None:
    await eventually(
        lambda: volume.broker._connections == 0 and limits.connections_of(volume.pod_uid) == 0,
        f"connection counters back to 0 (volume {volume.broker._connections}, "
        f"pod {limits.connections_of(volume.pod_uid)})",
    )


def new_pod() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- a. a connection is a boundary


class FailOnce:
    """Raise RuntimeError on the first call, then behave like the original."""

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected failure")
        return self.original(*args, **kwargs)

    def as_method(self) -> Callable[..., Any]:
        # A plain function, so that patched onto a class it binds like a method.
        def method(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        return method


def _internal_error(answer: Answer | None) -> None:
    assert answer is not None, "no answer"
    assert answer["errno"] == errno.EIO, answer
    assert answer["message"] == "internal error in the csi-async broker: RuntimeError"


def _hung_up(answer: Answer | None) -> None:
    assert answer is None, f"expected no answer, got {answer}"


# (where, attribute, is a method, what the failing connection gets)
INJECTIONS: dict[str, tuple[object, str, bool, Callable[[Answer | None], None]]] = {
    "budget": (BrokerLimits, "open_connection", True, _internal_error),
    "peer lookup": (session_module, "peer_of", False, _internal_error),
    "framing": (framing, "read_request_body", False, _internal_error),
    "validation": (wire, "parse_request", False, _internal_error),
    "peer check": (Session, "_check_peer", True, _internal_error),
    # The refusal itself fails: the connection is closed unanswered.
    "refusal": (Session, "_refuse", True, _hung_up),
    # The answer went out; writing its audit line fails afterwards.
    "audit": (Session, "_audit", True, answered_einval),
    "response encoding": (wire, "response_frame", False, _hung_up),
}


@pytest.mark.parametrize("step", list(INJECTIONS))
@pytest.mark.asyncio
async def test_a_failure_in_any_step_costs_only_that_connection(
    step: str,
    kubelet_root: Path,
    socket_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Guards "a connection is a hard boundary": _handle's outer try/except
    # and peer_of/open_connection inside the inner one. Before it, peer_of
    # ran outside any handler and a raise in _refuse or _audit escaped the
    # connection's task, ending the task group every volume serves in.
    where, attribute, is_method, first_answer = INJECTIONS[step]
    fail = FailOnce(getattr(where, attribute))
    monkeypatch.setattr(where, attribute, fail.as_method() if is_method else fail)
    limits = BrokerLimits()
    node = Node(kubelet_root, socket_root, limits)
    volume = node.volume(new_pod())
    async with serving(node):
        with caplog.at_level(logging.ERROR, logger="csi_async.broker"):
            first_answer(await ask(volume.path, unmount_frame()))
            await counters_settle(volume, limits)
        assert fail.calls >= 1, f"the {step} step was never reached"
        assert any(r.levelno >= logging.ERROR for r in caplog.records), "the failure was not logged"
        assert not volume.broker._done.is_set()
        # The broker goes on serving: the next connection is answered normally.
        answered_einval(await ask(volume.path, unmount_frame()))
        await counters_settle(volume, limits)
        answered_einval(await ask(volume.path, unmount_frame()))
        await counters_settle(volume, limits)


# ---------------------------------------------------------------- b. fds never reach our table


def _posix_lock_held_elsewhere(path: Path) -> bool:
    """Whether another process sees the file locked (our fcntl lock still stands)."""
    probe = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], check=False, timeout=30)
    assert result.returncode in (0, 1), result
    return result.returncode == 1


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.asyncio
async def test_read_request_body_refuses_fds_without_installing_them(tmp_path: Path) -> None:
    # Guards "requests are read with no control buffer" (kernels without
    # SO_PASSRIGHTS). The old reader took fds into a control buffer and
    # closed them: the close of a pod's fd runs the file's flush (FUSE_FLUSH
    # to the pod's daemon, from the event loop). A close has another
    # per-close effect we can see without FUSE: it drops this process's
    # POSIX record locks on the file. The kernel dropping an in-flight fd
    # does neither.
    locked = tmp_path / "locked"
    locked.write_bytes(b"data")
    lock_fd = os.open(locked, os.O_RDWR | os.O_CLOEXEC)
    smuggled = [
        os.open(locked, os.O_RDONLY | os.O_CLOEXEC),
        os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
        os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC),
        lock_fd,
    ]
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.setblocking(False)  # as accepted sockets are on the loop
        fcntl.lockf(lock_fd, fcntl.LOCK_EX)
        assert _posix_lock_held_elsewhere(locked)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", smuggled))]
        client.sendmsg([unmount_frame()], ancillary)
        before = _fd_count()
        with pytest.raises(framing.FramingError, match="file descriptors"):
            await framing.read_request_body(server, 5.0)
        assert _fd_count() == before, "received fds were installed in our fd table"
        # No fd of the file was ever installed and closed here.
        assert _posix_lock_held_elsewhere(locked), "an installed copy of a passed fd was closed"
    finally:
        client.close()
        server.close()
        for fd in smuggled:
            os.close(fd)


@pytest.mark.asyncio
async def test_read_request_body_refuses_fds_sent_with_a_later_chunk() -> None:
    # Same fix: every recvmsg of the frame is checked, not only the first.
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    passed = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        server.setblocking(False)
        frame = unmount_frame()
        client.sendall(frame[: protocol.HEADER_SIZE])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed]))]
        client.sendmsg([frame[protocol.HEADER_SIZE :]], ancillary)
        before = _fd_count()
        with pytest.raises(framing.FramingError, match="file descriptors"):
            await framing.read_request_body(server, 5.0)
        assert _fd_count() == before
    finally:
        client.close()
        server.close()
        os.close(passed)


def _send_fd(sock: socket.socket, fd: int) -> None:
    sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def test_a_listener_with_passed_rights_off_makes_the_kernel_refuse_fds(socket_root: Path) -> None:
    # Guards "listening sockets turn SO_PASSRIGHTS off": the pod's sendmsg()
    # fails with EPERM, including on a connection not accepted yet.
    path = str(socket_root / "plain.sock")
    passed = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as client:
        listener.bind(path)
        assert framing.refuse_passed_fds(listener), "this kernel has no SO_PASSRIGHTS (6.16+)"
        listener.listen(4)
        client.connect(path)
        try:
            with pytest.raises(PermissionError):
                _send_fd(client, passed)  # before accept()
            conn, _ = listener.accept()
            with conn:
                with pytest.raises(PermissionError):
                    _send_fd(client, passed)
                client.sendall(b"plain")  # data without fds still flows
                conn.settimeout(5)
                assert conn.recv(16) == b"plain"
        finally:
            os.close(passed)


def test_broker_sockets_refuse_fds_before_accept(socket_root: Path) -> None:
    # Guards listen_in calling refuse_passed_fds on every broker socket.
    directory = socket_root / "broker"
    directory.mkdir()
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    bound = sockets.listen_in(dir_fd, SOCKET_NAME)
    passed = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(directory / SOCKET_NAME))
            with pytest.raises(PermissionError):
                _send_fd(client, passed)
    finally:
        os.close(passed)
        sockets.remove(bound)


# ---------------------------------------------------------------- c. lone surrogates


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(unmount_frame("/run/\ud800"), id="unmount-mountpoint"),
        pytest.param(unmount_frame("\udfff"), id="unmount-low-surrogate"),
        pytest.param(mount_frame(["\ud800"]), id="mount-option"),
        pytest.param(mount_frame(["ro", "fsname=x\udbff"]), id="mount-option-value"),
        pytest.param(mount_frame([], mountpoint="/run/\ud800"), id="mount-mountpoint"),
    ],
)
@pytest.mark.asyncio
async def test_a_lone_surrogate_is_refused_as_a_protocol_error(
    payload: bytes, kubelet_root: Path, socket_root: Path
) -> None:
    # Guards "lone surrogates are refused at validation" (wire._require_utf8).
    # Before it, an UNMOUNT's error message quoted the mountpoint and its
    # encoding raised, out of the connection's task.
    assert b"\\u" in payload  # the surrogate travels as a JSON escape
    limits = BrokerLimits()
    node = Node(kubelet_root, socket_root, limits)
    volume = node.volume(new_pod())
    async with serving(node):
        answer = await ask(volume.path, payload)
        assert answer is not None
        assert answer["ok"] is False
        assert answer["errno"] == errno.EPROTO, answer
        assert "lone surrogate" in answer["message"]
        answered_einval(await ask(volume.path, unmount_frame()))
        await counters_settle(volume, limits)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("\ud800\U0001f600" * 1500, id="surrogates-and-4-byte"),
        pytest.param("\U0001f600" * 3000, id="4-byte"),
        pytest.param("\udfff" * 3000, id="surrogates"),
        pytest.param("a" * 2047 + "\U0001f600" * 953, id="cut-inside-a-character"),
    ],
)
def test_any_response_message_encodes_within_max_body(message: str) -> None:
    # Guards "response encoding is total" (wire.printable_message): before,
    # the message was cut to 2048 characters, not bytes (8 KiB of 4-byte
    # characters overflowed MAX_BODY) and never made encodable.
    assert len(message) == 3000
    frame = wire.response_frame(ok=False, errno=errno.EINVAL, message=message)
    length = protocol.decode_header(frame[: protocol.HEADER_SIZE], protocol.KIND_RESPONSE)
    assert length == len(frame) - protocol.HEADER_SIZE <= protocol.MAX_BODY
    answer = json.loads(frame[protocol.HEADER_SIZE :].decode("utf-8"))
    assert answer["errno"] == errno.EINVAL and answer["ok"] is False
    sent = answer["message"]
    # The message itself, cut to its byte cap; not the fallback answer.
    assert 0 < len(sent.encode("utf-8")) <= protocol.MAX_MESSAGE_LENGTH
    assert len(sent.encode("utf-8")) > protocol.MAX_MESSAGE_LENGTH - 8
    assert "internal error" not in sent
    expected_start = message[:8].encode("utf-8", "backslashreplace").decode("utf-8")
    assert sent.startswith(expected_start[:4])


# ---------------------------------------------------------------- d. per-pod budget


@pytest.mark.asyncio
async def test_a_pods_connection_budget_spans_its_volumes_and_spares_other_pods(
    kubelet_root: Path, socket_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards "connections are budgeted per pod across its volumes"
    # (BrokerLimits.per_pod, counted from accept on). Before, only each
    # volume was capped: a pod with many volumes could hold any number of
    # connections, and an over-budget one waited out the read timeout.
    monkeypatch.setattr(protocol, "READ_TIMEOUT", PATIENT_READ)
    limits = BrokerLimits(per_pod=4, per_volume=8)
    node = Node(kubelet_root, socket_root, limits)
    hostile = new_pod()
    data, logs = node.volume(hostile, "data"), node.volume(hostile, "logs")
    neighbour = node.volume(new_pod())
    silent: list[socket.socket] = []
    try:
        async with serving(node):
            for volume in (data, logs, data, logs):
                silent.append(silent_connection(volume.path))
            await eventually(lambda: limits.connections_of(hostile) == 4, "4 silent counted")
            for volume in (data, logs):
                # Nothing sent: only a refusal before any read answers this.
                answer, elapsed = await ask_timed(volume.path, b"", timeout=PROMPT * 2)
                assert answer["errno"] == errno.EAGAIN, answer
                assert "this pod has too many connections" in answer["message"]
                assert elapsed < PROMPT, f"refused only after {elapsed:.1f} s"
                answer, _ = await ask_timed(volume.path, unmount_frame(), timeout=PROMPT * 2)
                assert answer["errno"] == errno.EAGAIN, answer
            assert limits.connections_of(hostile) == 4
            # Another pod of the same node (same BrokerLimits) is unaffected.
            answered_einval(await ask(neighbour.path, unmount_frame()))
            # Closing the silent connections gives the budget back.
            for sock in silent:
                sock.close()
            await eventually(lambda: limits.connections_of(hostile) == 0, "budget released")
            for volume in (data, logs, neighbour):
                answered_einval(await ask(volume.path, unmount_frame()))
                await counters_settle(volume, limits)
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.asyncio
async def test_the_per_volume_cap_still_applies_within_a_pods_budget(
    kubelet_root: Path, socket_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "READ_TIMEOUT", PATIENT_READ)
    limits = BrokerLimits(per_pod=16, per_volume=2)
    node = Node(kubelet_root, socket_root, limits)
    pod = new_pod()
    data, logs = node.volume(pod, "data"), node.volume(pod, "logs")
    silent: list[socket.socket] = []
    try:
        async with serving(node):
            silent += [silent_connection(data.path), silent_connection(data.path)]
            await eventually(lambda: data.broker._connections == 2, "2 silent counted")
            answer, elapsed = await ask_timed(data.path, b"", timeout=PROMPT * 2)
            assert answer["errno"] == errno.EAGAIN and elapsed < PROMPT, answer
            assert "this volume's broker" in answer["message"]
            answered_einval(await ask(logs.path, unmount_frame()))
    finally:
        for sock in silent:
            sock.close()


# ---------------------------------------------------------------- e. node-wide slots


@pytest.mark.asyncio
async def test_the_node_wide_slot_is_not_held_while_waiting_for_a_frame(
    kubelet_root: Path, socket_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards "the node-wide slot is taken only around the mount syscalls".
    # Before, every connection took one from accept on, so a few pods'
    # silent connections made every other pod's request EAGAIN.
    monkeypatch.setattr(protocol, "READ_TIMEOUT", PATIENT_READ)
    slots = 4
    limits = BrokerLimits(node_wide=anyio.CapacityLimiter(slots), per_pod=16)
    node = Node(kubelet_root, socket_root, limits)
    squatters = [node.volume(new_pod()) for _ in range(2)]
    other = node.volume(new_pod())
    silent: list[socket.socket] = []
    try:
        async with serving(node):
            for volume in squatters:
                silent += [silent_connection(volume.path) for _ in range(slots // 2)]
            await eventually(
                lambda: sum(limits.connections_of(v.pod_uid) for v in squatters) == slots,
                "every silent connection counted",
            )
            assert limits.node_wide.total_tokens == slots
            assert limits.node_wide.borrowed_tokens == 0
            answered_einval(await ask(other.path, unmount_frame()))
            # A MOUNT gets a slot and reaches the mount syscalls: there it
            # finds no target directory (nothing is ever mounted here).
            answer, elapsed = await ask_timed(other.path, mount_frame([]))
            assert answer["errno"] == errno.ENOENT, answer
            assert answer["message"].startswith("mount failed")
            assert elapsed < PROMPT
            # So does one of the squatting pods' own volumes.
            answer, _ = await ask_timed(squatters[0].path, mount_frame([]))
            assert answer["errno"] == errno.ENOENT, answer
            await eventually(lambda: limits.node_wide.borrowed_tokens == 0, "slots returned")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.asyncio
async def test_a_busy_node_answers_eagain_after_the_slot_wait(
    kubelet_root: Path, socket_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node-wide slots still bound the mount syscalls: with all of them
    # taken, a MOUNT waits SLOT_WAIT and is told to try again.
    monkeypatch.setattr(lifecycle_module, "SLOT_WAIT", 0.2)
    limits = BrokerLimits(node_wide=anyio.CapacityLimiter(1))
    node = Node(kubelet_root, socket_root, limits)
    volume = node.volume(new_pod())
    async with serving(node):
        await limits.node_wide.acquire()
        try:
            answer, _ = await ask_timed(volume.path, mount_frame([]))
            assert answer["errno"] == errno.EAGAIN, answer
            assert "node's brokers are busy" in answer["message"]
        finally:
            limits.node_wide.release()
        answer, _ = await ask_timed(volume.path, mount_frame([]))
        assert answer["errno"] == errno.ENOENT, answer


# ---------------------------------------------------------------- f. FuseWaits


@dataclass
class Blocked:
    """A call that blocks until released, and records that it ended."""

    release: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    value: str = "late answer"

    def __call__(self) -> str:
        try:
            assert self.release.wait(60), "never released"
            return self.value
        finally:
            self.ended.set()


@pytest.mark.asyncio
async def test_a_blocked_call_times_out_but_keeps_its_slot_until_it_returns() -> None:
    # Guards "the slot stays taken until the thread really finishes".
    waits = FuseWaits(per_pod=1, node_wide=4)
    blocked = Blocked()
    started = time.monotonic()
    outcome = await waits.call("pod-a", blocked, 0.1, name="test")
    assert outcome == Outcome(finished=False)
    assert time.monotonic() - started < PROMPT
    assert not blocked.ended.is_set()
    assert waits.running("pod-a") == 1 and waits.running() == 1
    assert not waits.has_slot("pod-a")
    with pytest.raises(NoSlot):
        await waits.call("pod-a", lambda: "never run", 1.0, name="test")
    blocked.release.set()
    await eventually(lambda: waits.running() == 0, "the slot freed once the thread ended")
    assert blocked.ended.is_set()
    assert waits.has_slot("pod-a")
    assert await waits.call("pod-a", lambda: 42, 5.0, name="test") == Outcome(True, 42)


@pytest.mark.asyncio
async def test_a_pod_at_its_cap_gets_no_slot_while_another_pod_does() -> None:
    waits = FuseWaits(per_pod=2, node_wide=16)
    blocked = Blocked()
    try:
        for _ in range(2):
            assert (await waits.call("pod-a", blocked, 0.05, name="test")).finished is False
        started = time.monotonic()
        with pytest.raises(NoSlot):
            await waits.call("pod-a", blocked, 5.0, name="test")
        assert time.monotonic() - started < PROMPT  # at once, not after the timeout
        assert waits.running("pod-a") == 2
        assert await waits.call("pod-b", lambda: "b", 5.0, name="test") == Outcome(True, "b")
        assert waits.has_slot("pod-b") and not waits.has_slot("pod-a")
    finally:
        blocked.release.set()
    await eventually(lambda: waits.running() == 0, "every thread ended")


@pytest.mark.asyncio
async def test_the_node_cap_holds_across_pods() -> None:
    waits = FuseWaits(per_pod=2, node_wide=3)
    blocked = Blocked()
    try:
        for pod in ("pod-a", "pod-a", "pod-b"):
            assert (await waits.call(pod, blocked, 0.05, name="test")).finished is False
        assert waits.running() == 3
        assert not waits.has_slot("pod-c")
        with pytest.raises(NoSlot):
            await waits.call("pod-c", lambda: "c", 5.0, name="test")
    finally:
        blocked.release.set()
    await eventually(lambda: waits.has_slot("pod-c"), "node slots freed")
    assert await waits.call("pod-c", lambda: "c", 5.0, name="test") == Outcome(True, "c")


@pytest.mark.asyncio
async def test_on_finish_runs_on_the_loop_when_the_thread_ends() -> None:
    waits = FuseWaits()
    loop_thread = threading.get_ident()
    finished: list[tuple[int, bool]] = []
    blocked = Blocked()

    def on_finish() -> None:
        finished.append((threading.get_ident(), blocked.ended.is_set()))

    outcome = await waits.call("pod-a", blocked, 0.05, name="test", on_finish=on_finish)
    assert outcome.finished is False
    assert finished == []  # the caller gave up; the thread has not ended
    blocked.release.set()
    await eventually(lambda: bool(finished), "on_finish called")
    assert finished == [(loop_thread, True)]
    assert waits.running() == 0

    detached: list[int] = []
    waits.run_detached("pod-a", lambda: None, name="test",
                       on_finish=lambda: detached.append(threading.get_ident()))  # fmt: skip
    await eventually(lambda: bool(detached), "run_detached's on_finish called")
    assert detached == [loop_thread]
    assert waits.running() == 0


@pytest.mark.asyncio
async def test_an_exception_in_the_call_propagates_and_frees_the_slot() -> None:
    waits = FuseWaits(per_pod=1)

    def broken() -> None:
        raise ValueError("the daemon said no")

    with pytest.raises(ValueError, match="the daemon said no"):
        await waits.call("pod-a", broken, 5.0, name="test")
    await eventually(lambda: waits.running() == 0, "slot freed")
    # An OSError (what a probe's statfs raises) keeps its errno.
    with pytest.raises(OSError) as raised:
        await waits.call("pod-a", lambda: os.stat("/nonexistent/x"), 5.0, name="test")
    assert raised.value.errno == errno.ENOENT
    await eventually(lambda: waits.running() == 0, "slot freed")


@pytest.mark.asyncio
async def test_threads_stay_bounded_under_many_calls_on_a_blocked_daemon() -> None:
    # 100 calls on daemons that never answer, from 50 pods at once: at most
    # node_wide threads exist, the rest are refused without a thread.
    waits = FuseWaits(per_pod=2, node_wide=16)
    blocked = Blocked()
    baseline = threading.active_count()
    outcomes: list[str] = []
    peak = baseline

    async def one(pod: str) -> None:
        nonlocal peak
        try:
            outcome = await waits.call(pod, blocked, 0.3, name="test")
        except NoSlot:
            outcomes.append("no slot")
        else:
            outcomes.append("finished" if outcome.finished else "timed out")
        peak = max(peak, threading.active_count())

    try:
        async with anyio.create_task_group() as tg:
            for index in range(100):
                tg.start_soon(one, f"pod-{index % 50}")
        assert len(outcomes) == 100
        assert outcomes.count("timed out") == 16
        assert outcomes.count("no slot") == 84
        assert waits.running() == 16
        assert peak - baseline <= 16
        assert threading.active_count() - baseline <= 16
    finally:
        blocked.release.set()
    await eventually(lambda: waits.running() == 0, "every thread ended")
    await eventually(lambda: threading.active_count() <= baseline, "threads gone")


# ---------------------------------------------------------------- node-wide accounting


@pytest.mark.asyncio
async def test_one_pods_detached_closes_never_take_the_node_wide_slots() -> None:
    # Guards FuseWaits._charged: closes run whatever the caps (run_detached);
    # if they counted fully against node_wide, one pod stuck on many last
    # closes would leave no slot for any other pod.
    waits = FuseWaits(per_pod=2, node_wide=4)
    release = threading.Event()
    try:
        for _ in range(10):
            waits.run_detached("hostile", release.wait, name="close")
        assert waits.running("hostile") == 10
        assert not waits.has_slot("hostile")
        assert waits.has_slot("neighbour")
        outcome = await waits.call("neighbour", lambda: 7, 5.0, name="probe")
        assert outcome == Outcome(True, 7)
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while waits.running() and time.monotonic() < deadline:
        await anyio.sleep(0.01)
    assert waits.running() == 0
    assert waits.has_slot("hostile")


def test_a_reused_minor_is_no_longer_taken_for_a_dead_superblock() -> None:
    # Guards BrokerLimits.minor_reused: the kernel hands a freed anonymous
    # device number to the next superblock, so a volume must not heal
    # another volume's live copies that happen to carry its old number.
    limits = BrokerLimits()
    limits.remember_gone(41, "/target/a")
    limits.remember_gone(42, "/target/a")
    limits.remember_gone(43, "/target/b")
    limits.minor_reused(42)  # some volume's new mount got 42
    assert limits.claim_gone("/target/a") == {41}
    assert limits.claim_gone("/target/a") == set()
    assert limits.claim_gone("/target/b") == {43}
