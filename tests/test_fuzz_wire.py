"""Fuzzing the broker's wire protocol against a live driver.

One real driver (peer check off, so the host's test process gets past it)
and one published FUSE volume serve the whole module. Hypothesis builds
hostile frames: valid headers around random JSON (objects with random keys
and values, unicode with lone surrogates and NUL, deep nesting, huge lists),
near-valid requests with one guaranteed violation (wrong type, missing or
extra key, limits), schema-valid mounts with a refused option, random bytes,
bad magic/version/kind/reserved/length, length mismatches, truncated frames,
a second frame behind a bad one, and frames carrying SCM_RIGHTS fds. Each is
sent on its own connection and must get exactly one error response (with an
errno from the documented table) followed by a close, well before the 5 s
read deadline; afterwards the driver must be alive, nothing may be mounted
on the volume, and the driver's fd count must be back at its baseline.

Incomplete frames are half-closed (SHUT_WR) so that the broker sees EOF at
once; the few that are not, and so wait for the read deadline, are an
explicit list (test_incomplete_frames_are_refused_at_the_read_deadline).

Environment:
    CSI_ASYNC_FUZZ_EXAMPLES     examples to run (default 300; `nox -s fuzz` runs 100000)
    CSI_ASYNC_FUZZ_DERANDOMIZE  1: the same examples every run (the default when
                                CSI_ASYNC_FUZZ_EXAMPLES is unset, i.e. in CI);
                                0: fresh random examples (the default when it is set)
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from csi_async.mount.mountinfo import mounts_at
from e2e.kubelet import Pod
from e2e.node import NATIVE_SOCKET_DIR, FuseVolume, Node
from fusermount3_proxy import protocol

EXAMPLES = int(os.environ.get("CSI_ASYNC_FUZZ_EXAMPLES", "300"))
DERANDOMIZE = (
    os.environ.get(
        "CSI_ASYNC_FUZZ_DERANDOMIZE", "0" if "CSI_ASYNC_FUZZ_EXAMPLES" in os.environ else "1"
    )
    == "1"
)

DEADLINE = protocol.READ_TIMEOUT
# Frames the broker can judge at once must be answered well before the read
# deadline; waiting for it would mean the broker hung on them.
PROMPT = DEADLINE - 1.0
EPROTO = frozenset({errno.EPROTO})
POLICY = frozenset({errno.EPERM, errno.EINVAL})
HELLO_TEXT = "Hello World!\n"
DATA = "/run/data"

MOUNT_KEYS = frozenset({"op", "options", "mountpoint", "auto_unmount"})
UNMOUNT_KEYS = frozenset({"op", "mountpoint", "lazy", "mount_id"})
KNOWN_KEYS = sorted(MOUNT_KEYS | UNMOUNT_KEYS)


class DriverDied(BaseException):
    """The driver process exited. A BaseException so that Hypothesis stops at
    once instead of "shrinking" against a dead driver, where every input fails."""


@dataclass(frozen=True)
class Case:
    """What to send on one connection and which errno values may come back."""

    label: str
    chunks: tuple[bytes, ...]
    expect: frozenset[int] = EPROTO
    # SCM_RIGHTS: this many fds (of /dev/null), attached to chunks[fd_chunk].
    fds: int = 0
    fd_chunk: int = 0
    # shutdown(SHUT_WR) after sending; required when the frame is incomplete.
    half_close: bool = True
    # Which strategy made it (for statistics).
    category: str = ""

    @property
    def payload(self) -> bytes:
        return b"".join(self.chunks)


# ---------------------------------------------------------------- building frames


def encode_json(value: object, ascii_only: bool) -> bytes:
    """JSON as a client might send it; lone surrogates are either escaped
    (\\ud800, valid JSON) or written raw (invalid UTF-8)."""
    text = json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def frame(
    body: bytes,
    *,
    magic: bytes = protocol.MAGIC,
    version: int = protocol.VERSION,
    kind: int = protocol.KIND_REQUEST,
    reserved: int = 0,
    length: int | None = None,
) -> bytes:
    return (
        protocol.HEADER.pack(
            magic, version, kind, reserved, len(body) if length is None else length
        )
        + body
    )


class HeaderFields(TypedDict, total=False):
    """frame()'s header overrides, so a strategy can build them one by one."""

    magic: bytes
    version: int
    kind: int
    reserved: int
    length: int


ANY_CHAR = st.characters(exclude_categories=())  # surrogates, NUL, unassigned, ...
ANY_TEXT = st.text(ANY_CHAR, max_size=24)
NO_NUL_TEXT = st.text(st.characters(exclude_categories=(), exclude_characters="\0"), max_size=40)
INTS = st.integers(min_value=-(2**80), max_value=2**80)
LEAVES = st.none() | st.booleans() | INTS | st.floats() | ANY_TEXT
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_TEXT, inner, max_size=5),
    max_leaves=25,
)

# Mount options the policy accepts (docs/options.md), to surround a refused one.
ALLOWED_OPTIONS = st.sampled_from([
    "rw", "ro", "nosuid", "nodev", "exec", "noexec", "atime", "noatime", "relatime",
    "strictatime", "nodiratime", "nosymfollow", "sync", "async", "dirsync", "lazytime",
    "default_permissions", "allow_other", "auto_unmount", "max_read=4096", "fsname=fuzz",
    "subtype=fuzz", "fd=7", "rootmode=100000", "user_id=0", "group_id=0", "x-fuzz=1",
    "nonempty", "large_read",
])  # fmt: skip
KNOWN_OPTION_NAMES = frozenset({
    "rw", "ro", "nosuid", "nodev", "suid", "dev", "exec", "noexec", "atime", "noatime",
    "relatime", "strictatime", "norelatime", "diratime", "nodiratime", "symfollow",
    "nosymfollow", "sync", "async", "dirsync", "lazytime", "nolazytime",
    "default_permissions", "allow_other", "allow_root", "max_read", "fsname", "subtype",
    "auto_unmount", "fd", "rootmode", "user_id", "group_id", "nonempty", "large_read",
    "blkdev", "blksize", "context", "fscontext", "defcontext", "rootcontext",
})  # fmt: skip
FLAG_OPTIONS = sorted(
    KNOWN_OPTION_NAMES
    - {"fsname", "subtype", "max_read", "fd", "rootmode", "user_id", "group_id"}
    - {"nonempty", "large_read"}
)


def _token(key: str) -> Callable[[str], str]:
    return lambda value: f"{key}={value}"


# Options the policy must refuse (EPERM or EINVAL), whatever surrounds them.
REFUSED_OPTIONS = st.one_of(
    st.sampled_from(["suid", "dev", "blkdev", "allow_root"]),
    st.sampled_from(["blksize", "context", "fscontext", "defcontext", "rootcontext"]).flatmap(
        lambda key: NO_NUL_TEXT.map(_token(key))
    ),
    # Unknown names, and known flags given a value.
    st.from_regex(r"\A[a-z][a-z0-9_]{0,15}\Z").filter(lambda name: name not in KNOWN_OPTION_NAMES),
    st.sampled_from(FLAG_OPTIONS).flatmap(lambda key: ANY_TEXT.map(_token(key))),
    # No key at all; NUL or newline anywhere.
    ANY_TEXT.map(lambda value: f"={value}"),
    st.tuples(ALLOWED_OPTIONS, st.sampled_from(["\0", "\n"]), ANY_TEXT).map("".join),
    # fsname: empty, too long, not printable.
    st.sampled_from(["fsname=", "fsname=" + "f" * 257, "fsname=a\x7fb", "fsname=\u2028"]),
    # subtype: empty, bad first character, bad characters, too long.
    st.sampled_from(
        ["subtype=", "subtype=-x", "subtype=a/b", "subtype=a b", "subtype=" + "s" * 65]
    ),
    # max_read: not a number, out of range, or digits int() does not take.
    st.sampled_from(["", "0", "-1", "+1", " 1", "1 ", "0x10", "1e3", str(2**30 + 1), "9" * 40]).map(
        _token("max_read")
    ),
    st.text(st.characters(categories=["No"]), min_size=1, max_size=3).map(_token("max_read")),
)


@st.composite
def valid_mount(draw: st.DrawFn) -> dict[str, object]:
    return {
        "op": "mount",
        "options": draw(st.lists(ALLOWED_OPTIONS, max_size=6)),
        "mountpoint": draw(NO_NUL_TEXT),
        "auto_unmount": draw(st.booleans()),
    }


@st.composite
def valid_unmount(draw: st.DrawFn) -> dict[str, object]:
    return {
        "op": "unmount",
        "mountpoint": draw(NO_NUL_TEXT),
        "lazy": draw(st.booleans()),
        "mount_id": draw(st.none() | st.integers(min_value=1, max_value=2**63 - 1)),
    }


VALID_REQUESTS = valid_mount() | valid_unmount()


def _not_str(value: object) -> bool:
    return not isinstance(value, str)


def _not_bool(value: object) -> bool:
    return not isinstance(value, bool)


def _not_mount_id(value: object) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, int))


@st.composite
def near_valid(draw: st.DrawFn) -> Case:
    """A valid request with exactly one thing wrong, so the schema refuses it."""
    request = draw(VALID_REQUESTS)
    fields = sorted(request)
    mutation = draw(st.sampled_from(["wrong type", "missing key", "extra key", "limits"]))
    if mutation == "missing key":
        del request[draw(st.sampled_from(fields))]
    elif mutation == "extra key":
        key = draw((st.sampled_from(KNOWN_KEYS) | ANY_TEXT).filter(lambda k: k not in request))
        request[key] = draw(JSON_VALUES)
    elif mutation == "wrong type":
        name = draw(st.sampled_from(fields))
        if name == "op":
            request[name] = draw(JSON_VALUES.filter(lambda v: v not in ("mount", "unmount")))
        elif name == "options":
            request[name] = draw(
                JSON_VALUES.filter(lambda v: not isinstance(v, list))
                | st.tuples(st.lists(ANY_TEXT, max_size=3), LEAVES.filter(_not_str)).map(
                    lambda parts: [*parts[0], parts[1]]
                )
            )
        elif name == "mountpoint":
            request[name] = draw(JSON_VALUES.filter(_not_str))
        elif name in ("auto_unmount", "lazy"):
            request[name] = draw(
                st.sampled_from([0, 1, "true", "false", None]) | JSON_VALUES.filter(_not_bool)
            )
        else:
            request[name] = draw(
                st.sampled_from([True, False, 1.0, "1", [1]]) | JSON_VALUES.filter(_not_mount_id)
            )
    else:
        limits: list[Callable[[], None]] = [
            lambda: request.__setitem__("mountpoint", "/" * draw(st.integers(4097, 7000))),
            lambda: request.__setitem__("mountpoint", draw(NO_NUL_TEXT) + "\0"),
        ]
        if request["op"] == "mount":
            limits += [
                # Huge lists: more than 64 options, of strings or of anything.
                lambda: request.__setitem__("options", ["a"] * draw(st.integers(65, 1800))),
                lambda: request.__setitem__("options", list(range(draw(st.integers(1, 1500))))),
                lambda: request.__setitem__("options", ["o" * draw(st.integers(1025, 7500))]),
            ]
        else:
            limits.append(
                lambda: request.__setitem__(
                    "mount_id", draw(st.integers(max_value=0) | st.integers(min_value=2**63))
                )
            )
        draw(st.sampled_from(limits))()
        mutation = "limits"
    body = encode_json(request, draw(st.booleans()))
    return Case(f"near-valid: {mutation}", (frame(body),), half_close=draw(st.booleans()))


@st.composite
def random_objects(draw: st.DrawFn) -> Case:
    keys = st.sampled_from(KNOWN_KEYS) | ANY_TEXT
    value = draw(st.dictionaries(keys, JSON_VALUES, max_size=8))
    if frozenset(value) in (MOUNT_KEYS, UNMOUNT_KEYS):
        value["\0extra"] = None  # exactly a request's keys: make sure it is refused
    body = encode_json(value, draw(st.booleans()))
    return Case("random JSON object", (frame(body),), half_close=draw(st.booleans()))


@st.composite
def non_objects(draw: st.DrawFn) -> Case:
    value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    body = encode_json(value, draw(st.booleans()))
    return Case("JSON that is not an object", (frame(body),))


@st.composite
def deep_nesting(draw: st.DrawFn) -> Case:
    depth = draw(st.integers(1, 64) | st.integers(900, 4000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "0" + closer * depth
    where = draw(st.sampled_from(["top", "options", "extra"]))
    if where == "top":
        text = nested
    elif where == "options":
        text = f'{{"op":"mount","options":{nested},"mountpoint":"/x","auto_unmount":false}}'
    else:
        text = f'{{"op":"unmount","mountpoint":"/x","lazy":true,"mount_id":null,"x":{nested}}}'
    return Case(f"deeply nested JSON ({where})", (frame(text.encode()),))


@st.composite
def policy_refusals(draw: st.DrawFn) -> Case:
    """Schema-valid mounts with at least one option the policy refuses."""
    request = draw(valid_mount())
    # valid_mount() always puts a list of option strings there.
    options = list(cast("list[str]", request["options"]))
    options.insert(draw(st.integers(0, len(options))), draw(REFUSED_OPTIONS))
    request["options"] = options
    # ASCII-escaped, so the body is valid UTF-8 whatever the strings hold and
    # the refusal must come from the policy (raw surrogates are EPROTO).
    return Case("refused mount option", (frame(encode_json(request, True)),), expect=POLICY)


@st.composite
def random_bytes(draw: st.DrawFn) -> Case:
    return Case("random bytes", (draw(st.binary(max_size=12000)),))


@st.composite
def bad_headers(draw: st.DrawFn) -> Case:
    wrong = draw(st.sets(st.sampled_from(["magic", "version", "kind", "reserved", "length"]),
                         min_size=1))  # fmt: skip
    body = draw(st.binary(max_size=64) | VALID_REQUESTS.map(lambda r: encode_json(r, True)))
    fields: HeaderFields = {}
    if "magic" in wrong:
        fields["magic"] = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != b"CSAF"))
    if "version" in wrong:
        fields["version"] = draw(st.integers(0, 255).filter(lambda v: v != protocol.VERSION))
    if "kind" in wrong:
        fields["kind"] = draw(st.integers(0, 255).filter(lambda k: k != protocol.KIND_REQUEST))
    if "reserved" in wrong:
        fields["reserved"] = draw(st.integers(1, 0xFFFF))
    if "length" in wrong:
        fields["length"] = draw(st.integers(protocol.MAX_BODY + 1, 2**32 - 1))
    data = frame(body, **fields)
    return Case(f"bad header: {'+'.join(sorted(wrong))}", (data,), half_close=draw(st.booleans()))


@st.composite
def valid_header_random_body(draw: st.DrawFn) -> Case:
    body = draw(st.binary(max_size=9000) | st.binary(min_size=8193, max_size=12000))
    return Case("valid header, random body", (frame(body),), half_close=draw(st.booleans()))


@st.composite
def oversized(draw: st.DrawFn) -> Case:
    """A huge list, honestly framed: over MAX_BODY, refused before the body is read."""
    body = encode_json(list(range(draw(st.integers(2000, 4000)))), True)
    return Case("oversized body", (frame(body),), half_close=draw(st.booleans()))


@st.composite
def length_mismatch(draw: st.DrawFn) -> Case:
    body = encode_json(draw(VALID_REQUESTS), True)
    if draw(st.booleans()):
        # Declared shorter: the broker reads a prefix of the object, never a whole one.
        declared = draw(st.integers(0, len(body) - 1))
        return Case("length shorter than the body", (frame(body, length=declared),),
                    half_close=draw(st.booleans()))  # fmt: skip
    declared = draw(st.integers(len(body) + 1, protocol.MAX_BODY))
    return Case("length longer than the body", (frame(body, length=declared),))


@st.composite
def truncated(draw: st.DrawFn) -> Case:
    """A complete, valid request cut short: the broker sees EOF mid-frame."""
    data = frame(encode_json(draw(VALID_REQUESTS), True))
    return Case("truncated valid request", (data[: draw(st.integers(0, len(data) - 1))],))


@st.composite
def second_frame(draw: st.DrawFn) -> Case:
    """A bad frame followed by a valid mount: the second must never be read."""
    first = draw(st.sampled_from([frame(b"[]"), frame(b"{}"), frame(b"x", version=2)]))
    return Case("bad frame, then a valid mount", (first + frame(encode_json(draw(valid_mount()),
                True)),), half_close=draw(st.booleans()))  # fmt: skip


@st.composite
def with_fds(draw: st.DrawFn) -> Case:
    """File descriptors attached to a request (here: mostly to valid mounts)."""
    data = draw(
        VALID_REQUESTS.map(lambda r: frame(encode_json(r, True)))
        | st.binary(min_size=1, max_size=200)
    )
    count = draw(st.integers(1, 8))
    if len(data) > 1 and draw(st.booleans()):
        split = draw(st.integers(1, len(data) - 1))
        chunks = (data[:split], data[split:])
        return Case("fds attached (second chunk)", chunks, fds=count, fd_chunk=1)
    return Case("fds attached", (data,), fds=count)


CATEGORIES: dict[str, st.SearchStrategy[Case]] = {
    "random object": random_objects(),
    "non-object": non_objects(),
    "near-valid": near_valid(),
    "deep nesting": deep_nesting(),
    "refused option": policy_refusals(),
    "random bytes": random_bytes(),
    "bad header": bad_headers(),
    "random body": valid_header_random_body(),
    "oversized": oversized(),
    "length mismatch": length_mismatch(),
    "truncated": truncated(),
    "second frame": second_frame(),
    "fds": with_fds(),
}


def _tagged(name: str, strategy: st.SearchStrategy[Case]) -> st.SearchStrategy[Case]:
    return strategy.map(lambda case: replace(case, category=name))


CASES = st.one_of([_tagged(name, strategy) for name, strategy in CATEGORIES.items()])


# ---------------------------------------------------------------- talking to the broker


class ClosedEarly(Exception):
    """The broker closed the connection before a whole response frame."""


@dataclass
class Answer:
    response: dict[str, object]
    elapsed: float
    # fds the broker attached to its answer (there must be none).
    passed_fds: int
    # The kernel refused the sendmsg() that carried the case's fds.
    kernel_refused_fds: bool = False


def _recv_exact(sock: socket.socket, size: int, passed: list[int]) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk, ancillary, _, _ = sock.recvmsg(
            size - len(data), socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                passed.extend(array.array("i", raw[: len(raw) - len(raw) % 4]))
        if not chunk:
            raise ClosedEarly(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, case: Case) -> bool:
    """Send the case; True if the kernel refused to carry its fds (SO_PASSRIGHTS off).

    Then the rest of the case is not sent: the broker sees a cut-off frame.
    """
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(case.fds)]
    refused = False
    try:
        for index, chunk in enumerate(case.chunks):
            view = memoryview(chunk)
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                if fds and index == case.fd_chunk
                else []
            )
            while view:
                try:
                    view = view[sock.sendmsg([view], ancillary) :]
                except PermissionError:
                    if not ancillary:
                        raise
                    refused = True
                    break
                ancillary = []
            if refused:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # the broker refused early and hung up; its answer is still queued
    finally:
        for fd in fds:
            os.close(fd)
    if case.half_close or refused:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return refused


def exchange(path: str, case: Case, timeout: float) -> Answer:
    """One connection: send the case, read one response frame, then expect EOF."""
    passed: list[int] = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        started = time.monotonic()
        kernel_refused_fds = _send(sock, case)
        try:
            header = _recv_exact(sock, protocol.HEADER_SIZE, passed)
            length = protocol.decode_header(header, protocol.KIND_RESPONSE)
            body = _recv_exact(sock, length, passed)
            elapsed = time.monotonic() - started
            try:
                trailing = sock.recv(1)
            except ConnectionResetError:
                trailing = b""
        finally:
            for fd in passed:
                os.close(fd)
    assert trailing == b"", f"{case.label}: more than one frame in the answer"
    return Answer(dict(json.loads(body)), elapsed, len(passed), kernel_refused_fds)


# ---------------------------------------------------------------- the live broker


@dataclass
class LiveBroker:
    node: Node
    volume: FuseVolume
    dir_fd: int
    workdir: Path
    baseline_fds: int = 0

    @property
    def socket_path(self) -> str:
        # Through the directory's fd: the full path is over 107 bytes.
        return f"/proc/self/fd/{self.dir_fd}/fuse.sock"

    @property
    def pid(self) -> int:
        assert self.node.driver.process is not None
        return self.node.driver.process.pid

    def driver_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds_settle(self, timeout: float = 5.0) -> int:
        """The driver's fd count, once it is back at the baseline (or the timeout)."""
        deadline = time.monotonic() + timeout
        while (count := self.driver_fds()) > self.baseline_fds and time.monotonic() < deadline:
            time.sleep(0.002)
        return count

    def audit_lines(self) -> int:
        entries = self.node.driver.log_entries()
        return sum(1 for entry in entries if entry.get("logger") == "csi_async.audit")

    def warm_up(self) -> None:
        """First connection, first refusal, first fds: then take the fd baseline."""
        audited = self.audit_lines()
        cases = (Case("warm-up", (frame(b"{}"),)), Case("warm-up", (b"x",), fds=2))
        for case in cases:
            exchange(self.socket_path, case, DEADLINE + 3)
        # A connection's audit line is the last thing the broker does with it.
        deadline = time.monotonic() + DEADLINE
        while self.audit_lines() < audited + len(cases):
            assert time.monotonic() < deadline, "the warm-up's audit lines never came"
            time.sleep(0.01)
        self.baseline_fds = self.driver_fds()

    def ensure_running(self) -> None:
        """A test that killed the driver must not take the next tests down
        with it: start it again (it restores the volume) and re-baseline."""
        if self.driver_exited() is not None:
            self.node.driver.start()
            self.warm_up()

    def driver_exited(self, grace: float = 0.0) -> int | None:
        process = self.node.driver.process
        assert process is not None
        try:
            return process.wait(grace) if grace else process.poll()
        except subprocess.TimeoutExpired:
            return None

    def die(self, case: Case, status: int) -> DriverDied:
        saved = self.workdir / "fatal-case.bin"
        saved.write_bytes(case.payload)
        errors = [
            line.strip() for line in self.node.driver.log_text().splitlines()
            if "Error" in line and not line.startswith("{")
        ]  # fmt: skip
        return DriverDied(
            f"the driver exited with status {status} on a {case.label!r} case "
            f"({len(case.payload)} bytes, {case.fds} fds, payload saved in {saved}; "
            f"first bytes {case.payload[:120]!r}); its last error: {errors[-1:]}"
        )

    def check(self, case: Case) -> Answer:
        try:
            answer = exchange(self.socket_path, case, DEADLINE + 3)
        except (OSError, ClosedEarly, protocol.ProtocolError) as err:
            status = self.driver_exited(grace=3.0)
            if status is not None:
                raise self.die(case, status) from None
            raise AssertionError(f"{case.label}: no proper answer: {err!r}") from None
        status = self.driver_exited()
        if status is not None:
            raise self.die(case, status)
        response = answer.response
        assert response["ok"] is False, f"{case.label}: accepted: {response}"
        assert answer.passed_fds == 0, f"{case.label}: the refusal carried an fd"
        assert response["errno"] in case.expect, f"{case.label}: {response}"
        assert response["mount_id"] is None
        assert isinstance(response["message"], str) and response["message"]
        # Every case here is complete or half-closed: nothing to wait for.
        assert answer.elapsed < PROMPT, f"{case.label}: answered after {answer.elapsed:.1f} s"
        if case.fds and case.fd_chunk == 0:
            # The broker's sockets have SO_PASSRIGHTS off: the kernel itself
            # refuses fds (kernels without it: the broker refuses them, see
            # tests/test_broker_session.py). Fds behind a bad header are never
            # read: the socket's close drops them.
            assert answer.kernel_refused_fds, f"{case.label}: the kernel let fds through"
        assert not mounts_at(os.fspath(self.volume.target)), f"{case.label}: something mounted"
        fds = self.fds_settle()
        assert fds <= self.baseline_fds, f"{case.label}: driver fds {fds} > {self.baseline_fds}"
        return answer


@pytest.fixture(scope="module")
def module_broker(
    tmp_path_factory: pytest.TempPathFactory, zipapp: Path, fuse_examples_on_host: Path
) -> Iterator[LiveBroker]:
    workdir = tmp_path_factory.mktemp("fuzz")
    binds = {"/run/examples": fuse_examples_on_host}
    args = ["--peer-check", "off", "--log-level", "info"]
    with Node(workdir, zipapp, shared_binds=binds, driver_args=args) as node:
        volume = node.publish_fuse_volume(Pod("fuzz"))
        socket_dir = volume.socket_binds[NATIVE_SOCKET_DIR]
        dir_fd = os.open(socket_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        broker = LiveBroker(node, volume, dir_fd, workdir)
        try:
            broker.warm_up()
            yield broker
        finally:
            os.close(dir_fd)
            if broker.driver_exited() is not None:
                node.driver.start()  # so that teardown can unpublish


@pytest.fixture
def live(module_broker: LiveBroker) -> LiveBroker:
    module_broker.ensure_running()
    return module_broker


# ---------------------------------------------------------------- the tests


def test_fuzzed_frames_are_refused_without_mounts_hangs_or_leaks(live: LiveBroker) -> None:
    seen: Counter[str] = Counter()
    errnos: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=DERANDOMIZE,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )  # fmt: skip
    @given(case=CASES)
    def one(case: Case) -> None:
        event(case.category)
        seen[case.category] += 1
        errnos[str(live.check(case).response["errno"])] += 1

    died: DriverDied | None = None
    try:
        one()
    except DriverDied as err:
        died = err
    if died is not None:
        pytest.fail(str(died), pytrace=False)
    print(f"\nfuzzed {sum(seen.values())} frames: {dict(seen)}; errnos {dict(errnos)}")
    if EXAMPLES >= 300:
        # Every kind of input was tried (a strategy that never generates
        # would otherwise go unnoticed).
        assert set(seen) == set(CATEGORIES), sorted(seen)
    assert live.driver_exited() is None
    assert live.fds_settle() <= live.baseline_fds


def test_incomplete_frames_are_refused_at_the_read_deadline(live: LiveBroker) -> None:
    """Frames that never complete (no half-close) are refused when the 5 s
    deadline for the whole frame runs out, all at once, even one that keeps
    dribbling bytes (the deadline covers the frame, not each read)."""
    valid = frame(encode_json({"op": "mount", "options": [], "mountpoint": DATA,
                               "auto_unmount": False}, True))  # fmt: skip
    stalled = [
        b"",  # connect and say nothing
        b"C",
        valid[:5],
        valid[: protocol.HEADER_SIZE],  # a whole header, no body
        valid[:20],
        valid[:-1],  # all but the last byte of a valid mount
    ]
    answers: dict[int, Answer | BaseException] = {}

    def talk(index: int, case: Case) -> None:
        try:
            answers[index] = exchange(live.socket_path, case, DEADLINE + 4)
        except BaseException as err:
            answers[index] = err

    threads = [
        threading.Thread(target=talk, args=(i, Case("stalled", (p,), half_close=False)))
        for i, p in enumerate(stalled)
    ]
    # A slow drip: one byte every 0.4 s of a valid mount, never finished in time.
    with socket.socket(socket.AF_UNIX) as drip:
        drip.settimeout(DEADLINE + 4)
        drip.connect(live.socket_path)
        started = time.monotonic()
        for thread in threads:
            thread.start()
        dripped = 0
        drip_answer = b""
        while dripped < len(valid):
            try:
                drip.send(valid[dripped : dripped + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            dripped += 1
            drip.settimeout(0.4)
            try:
                drip_answer = drip.recv(4096)
                break  # answered (or closed) mid-drip
            except TimeoutError:
                continue
        drip_elapsed = time.monotonic() - started
        drip.settimeout(2)
        while len(drip_answer) < protocol.HEADER_SIZE:
            more = drip.recv(4096)
            if not more:
                break
            drip_answer += more
    for thread in threads:
        thread.join(DEADLINE + 6)
    assert dripped < len(valid), "the drip finished the frame: too slow a drip"
    assert DEADLINE - 0.5 <= drip_elapsed <= DEADLINE + 2, drip_elapsed
    length = protocol.decode_header(drip_answer[: protocol.HEADER_SIZE], protocol.KIND_RESPONSE)
    assert length > 0
    assert b'"errno":71' in drip_answer
    for index, payload in enumerate(stalled):
        answer = answers[index]
        assert isinstance(answer, Answer), f"{payload!r}: {answer!r}"
        assert answer.response["ok"] is False
        assert answer.response["errno"] == errno.EPROTO
        assert "no complete request within" in str(answer.response["message"])
        assert DEADLINE - 0.5 <= answer.elapsed <= DEADLINE + 3, (payload, answer.elapsed)
    assert live.driver_exited() is None
    assert not mounts_at(os.fspath(live.volume.target))
    assert live.fds_settle() <= live.baseline_fds


def test_the_fuzzed_broker_still_mounts_a_real_fuse_program(
    live: LiveBroker, fuse_examples: Path
) -> None:
    """After everything above, the same volume's broker serves libfuse's hello."""
    node, volume = live.node, live.volume
    sandbox = node.sandbox(volume.binds(DATA))
    hello = sandbox.spawn([str(fuse_examples / "hello"), "-f", DATA],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    node.wait_mounted(volume.target)
    assert (volume.target / "hello").read_text() == HELLO_TEXT
    unmount = sandbox.run(["fusermount3", "-u", DATA], capture_output=True, timeout=30)
    assert unmount.returncode == 0, unmount.stderr
    node.wait_unmounted(volume.target)
    assert hello.wait(15) == 0
    sandbox.kill_all()
    assert live.fds_settle() <= live.baseline_fds


# ---------------------------------------------------------------- found by this fuzzer


def _raw_exchange(node: Node, volume: FuseVolume, payload: bytes) -> dict[str, object] | None:
    """Send one frame from the host; the answer, or None if the broker hung up."""
    directory = os.open(volume.socket_binds[NATIVE_SOCKET_DIR], os.O_PATH | os.O_CLOEXEC)
    try:
        case = Case("regression", (payload,))
        return exchange(f"/proc/self/fd/{directory}/fuse.sock", case, DEADLINE + 3).response
    except (OSError, ClosedEarly):
        return None
    finally:
        os.close(directory)


def _exit_status(node: Node, grace: float = 2.0) -> int | None:
    assert node.driver.process is not None
    try:
        return node.driver.process.wait(grace)
    except subprocess.TimeoutExpired:
        return None


def test_deeply_nested_json_is_refused_and_the_driver_survives(node: Node) -> None:
    """About 1000 levels of nesting (2 KB, far below the 8 KiB cap) make
    json.loads raise RecursionError, which is not a ValueError. The body is
    parsed before the peer check, so any process that can connect to any
    volume's socket is enough: this one runs on the host, in no pod."""
    volume = node.publish_fuse_volume(Pod("app"))
    try:
        answer = _raw_exchange(node, volume, frame(b"[" * 2000 + b"]" * 2000))
        assert _exit_status(node) is None, "the driver exited"
        assert answer is not None and answer["ok"] is False
        assert answer["errno"] in (errno.EPROTO, errno.EACCES)
    finally:
        if _exit_status(node, 0.5) is not None:
            node.driver.start()


def test_max_read_with_a_non_decimal_digit_is_refused_and_the_driver_survives(
    node: Node,
) -> None:
    """The policy checks max_read with str.isdigit(), which is true for "²",
    then calls int("²"), which raises ValueError, which nothing catches: an
    unprivileged pod's own fusermount3 takes the whole node's driver down."""
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    try:
        result = sandbox.run(["fusermount3", "--start", "-o", "max_read=\u00b2", "--", "true"],
                             capture_output=True, timeout=30)  # fmt: skip
        assert _exit_status(node) is None, "the driver exited"
        assert result.returncode == 1
        assert "max_read" in result.stderr.decode(), result.stderr
    finally:
        if _exit_status(node, 0.5) is not None:
            node.driver.start()
