"""The fusermount3 drop-in, run as the built zipapp in a real subprocess.

The broker here is a stand-in that records one request frame per connection
and answers with a scripted Response (plus /dev/null as the "fuse" fd when
asked to); the real broker has its own tests. What is checked is what FUSE
libraries see: argv handling, messages, exit codes, and the fd hand-over on
the _FUSE_COMMFD socket.
"""

from __future__ import annotations

import array
import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusermount3_proxy import __version__, protocol
from fusermount3_proxy.names import HELPER_NAMES

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build_zipapp.py"
# fusermount3's usage text, byte for byte, then what csi-async adds.
FUSERMOUNT3_USAGE = (
    "{}: [options] mountpoint\n"
    "Options:\n"
    " -h\t\t    print help\n"
    " -V\t\t    print version\n"
    " -o opt[,opt...]    mount options\n"
    " -u\t\t    unmount\n"
    " -q\t\t    quiet\n"
    " -z\t\t    lazy unmount\n"
)
USAGE = FUSERMOUNT3_USAGE + (
    "\n"
    "csi-async modes (each has its own --help):\n"
    " --start [-o opt[,opt...]] [--keep-mount] -- PROGRAM ARGS... /dev/fd/N\n"
    "\t\t    mount through the broker, run PROGRAM on the fd\n"
    " --wait PATH [--timeout SECONDS]\n"
    "\t\t    exit 0 once a FUSE filesystem is mounted on PATH\n"
    "\t\t    (reads /proc/self/mountinfo only; a startupProbe)\n"
)
UNREACHABLE_HINT = "(is the volume's broker socket mounted into this container?)"
# What the broker answers, with EAGAIN, when it has no free slot.
BUSY = "the broker is busy; try again"
DEV_NULL_RDEV = os.stat("/dev/null").st_rdev
TIMEOUT = 20


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zipapp as fusermount3, plus a fuse-starter symlink to it."""
    directory = tmp_path_factory.mktemp("bin")
    # The interpreter running the tests, not whatever /usr/bin/python3 is; or
    # the one FUSERMOUNT3_TEST_PYTHON names, to run these tests on an older
    # Python (the oldest FUSE images ship 3.10; it compiles the sources, since
    # the archive's bytecode is for the Python that built it).
    python = os.environ.get("FUSERMOUNT3_TEST_PYTHON") or sys.executable
    subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--output",
            str(directory / "fusermount3"),
            "--interpreter",
            f"{python} -IS",
        ],
        check=True,
        capture_output=True,
    )
    (directory / "fuse-starter").symlink_to("fusermount3")
    # Every name FUSE libraries exec (fusermount3_proxy/names.py), as images
    # install it: a second name for the same file.
    for name in HELPER_NAMES:
        if name != "fusermount3":
            (directory / name).symlink_to("fusermount3")
    return directory


@pytest.fixture(scope="session")
def fusermount3(bindir: Path) -> str:
    return str(bindir / "fusermount3")


@pytest.fixture(scope="session")
def fuse_starter(bindir: Path) -> str:
    return str(bindir / "fuse-starter")


class FakeBroker:
    """Accepts connections; per connection reads one request, sends one response."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.requests: list[dict[str, object]] = []
        self.connections = 0
        # Anything that went wrong on the broker side; checked at teardown so
        # that a broken exchange fails the test instead of a thread dying.
        self.errors: list[BaseException] = []
        self._replies: list[tuple[dict[str, object], bool]] = []
        # Seconds to take, once a request is read, before answering it.
        self.answer_delay = 0.0
        # The answer once the scripted ones are used up.
        self.default: dict[str, object] = {
            "ok": False,
            "errno": errno.EPERM,
            "message": "refused by the test broker",
            "mount_id": None,
        }
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def reply(
        self,
        ok: bool,
        mount_id: int | None = None,
        message: str = "",
        code: int = 0,
        send_fd: bool = False,
    ) -> None:
        response = {"ok": ok, "errno": code, "message": message, "mount_id": mount_id}
        self._replies.append((response, send_fd))

    def reply_mounted(self, mount_id: int) -> None:
        self.reply(ok=True, mount_id=mount_id, send_fd=True)

    def reply_busy(self, times: int) -> None:
        for _ in range(times):
            self.reply(ok=False, code=errno.EAGAIN, message=BUSY)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                self.connections += 1
                conn.settimeout(TIMEOUT)
                try:
                    self._answer(conn)
                except Exception as err:
                    self.errors.append(err)

    def _answer(self, conn: socket.socket) -> None:
        length = protocol.decode_header(
            _recv_exact(conn, protocol.HEADER_SIZE), protocol.KIND_REQUEST
        )
        self.requests.append(protocol.decode_json_object(_recv_exact(conn, length)))
        # A broker busy on the request's behalf (the volume's lock, a mount slot).
        time.sleep(self.answer_delay)
        if self._replies:
            response, send_fd = self._replies.pop(0)
        else:
            response, send_fd = self.default, False
        frame = protocol.encode_frame(protocol.KIND_RESPONSE, response)
        if send_fd:
            fd = os.open("/dev/null", os.O_RDWR)
            try:
                socket.send_fds(conn, [frame], [fd])
            finally:
                os.close(fd)
        else:
            conn.sendall(frame)


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll for a state another process or thread brings about."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a state"
        time.sleep(0.01)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("peer closed the connection")
        data += chunk
    return data


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FakeBroker]:
    fake = FakeBroker(tmp_path / "broker.sock")
    yield fake
    fake.close()
    assert fake.errors == []


@pytest.fixture
def mnt(tmp_path: Path) -> str:
    path = tmp_path / "mnt"
    path.mkdir()
    return str(path)


def broker_env(broker: FakeBroker, **extra: str) -> dict[str, str]:
    # Deliberately minimal, like go-fuse's exec of the helper.
    return {protocol.SOCKET_PATH_ENV: broker.path, **extra}


def run(
    argv0: str,
    *args: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [argv0, *args],
        env=env if env is not None else {},
        pass_fds=pass_fds,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def mount_request(mountpoint: str, options: list[str], auto_unmount: bool = False) -> object:
    return {
        "op": "mount",
        "options": options,
        "mountpoint": mountpoint,
        "auto_unmount": auto_unmount,
    }


def unmount_request(mountpoint: str, lazy: bool, mount_id: int | None) -> object:
    return {"op": "unmount", "mountpoint": mountpoint, "lazy": lazy, "mount_id": mount_id}


def receive_fd_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """What libfuse's receive_fd sees, but with room to notice extra bytes or fds."""
    sock.settimeout(TIMEOUT)
    data, ancdata, flags, _ = sock.recvmsg(16, socket.CMSG_SPACE(4 * array.array("i").itemsize))
    assert not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.extend(array.array("i", cdata))
    return data, fds


# --- plain command-line behaviour -------------------------------------------


@pytest.mark.parametrize(
    "args", [["-h"], ["--help"], ["--he"], ["-q", "-h"], ["-uh"], ["-h", "-x"]]
)
def test_help_prints_the_fusermount3_usage_then_the_csi_async_modes_and_exits_1(
    fusermount3: str, args: list[str]
) -> None:
    result = run(fusermount3, *args)
    assert result.returncode == 1
    assert result.stdout == USAGE.format(fusermount3)
    assert result.stdout.startswith(FUSERMOUNT3_USAGE.format(fusermount3))
    assert result.stderr == ""


@pytest.mark.parametrize("args", [["-V"], ["--version"], ["--vers"], ["-qV"]])
def test_version_prints_the_fusermount3_version_with_the_csi_async_version_and_exits_0(
    fusermount3: str, args: list[str]
) -> None:
    result = run(fusermount3, *args)
    assert result.returncode == 0
    assert result.stdout == f"fusermount3 version: 3.18.0 (csi-async {__version__})\n"


# What each installed name answers to -V, as the helper it stands in for does.
HELPER_VERSIONS = {
    "fusermount3": f"fusermount3 version: 3.18.0 (csi-async {__version__})\n",
    # Debian installs fusermount as a link to fusermount3.
    "fusermount": f"fusermount3 version: 3.18.0 (csi-async {__version__})\n",
    # Debian 12's mergerfs 2.33.5 ships libfuse 2.9.7's, forked.
    "mergerfs-fusermount": f"fusermount version: 2.9.7-mergerfs_2.30.0 (csi-async {__version__})\n",
}


def test_every_helper_name_has_its_expected_version() -> None:
    assert set(HELPER_VERSIONS) == set(HELPER_NAMES)


@pytest.mark.parametrize("name", sorted(HELPER_NAMES))
@pytest.mark.parametrize("args", [["-V"], ["--version"], ["-qV"]])
def test_each_helper_name_prints_the_version_of_the_helper_it_stands_in_for(
    bindir: Path, name: str, args: list[str]
) -> None:
    result = run(str(bindir / name), *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, HELPER_VERSIONS[name], "")


@pytest.mark.parametrize("name", sorted(HELPER_NAMES))
@pytest.mark.parametrize("args", [["-h"], ["-q", "-h"]])
def test_each_helper_name_prints_its_helpers_usage_where_that_helper_does(
    bindir: Path, name: str, args: list[str]
) -> None:
    argv0 = str(bindir / name)
    result = run(argv0, *args)
    assert result.returncode == 1
    if name == "mergerfs-fusermount":
        # libfuse 2.9's text (one space less after the -o line) on stderr.
        libfuse2 = USAGE.replace("...]    mount", "...]   mount")
        assert (result.stdout, result.stderr) == ("", libfuse2.format(argv0))
    else:
        assert (result.stdout, result.stderr) == (USAGE.format(argv0), "")


@pytest.mark.parametrize("name", sorted(HELPER_NAMES))
def test_each_helper_name_mounts_through_the_broker_and_forwards_the_fd(
    bindir: Path, broker: FakeBroker, mnt: str, name: str
) -> None:
    broker.reply_mounted(mount_id=5)
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            # mergerfs's libfuse runs its helper as "<helper> -o OPTS -- MNT".
            result = run(
                str(bindir / name), "-o", "rw,nosuid,nodev,fsname=a:b,subtype=mergerfs", "--",
                mnt, env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
                pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        data, fds = receive_fd_message(ours)
        for fd in fds:
            os.close(fd)
    assert (result.returncode, result.stderr) == (0, "")
    assert (data, len(fds)) == (b"\0", 1)
    options = ["rw", "nosuid", "nodev", "fsname=a:b", "subtype=mergerfs"]
    assert broker.requests == [mount_request(mnt, options)]


@pytest.mark.parametrize("option", ["--auto-unmount", "--comm-fd=3"])
def test_mergerfs_fusermount_knows_only_the_long_options_of_libfuse_2(
    bindir: Path, broker: FakeBroker, mnt: str, option: str
) -> None:
    argv0 = str(bindir / "mergerfs-fusermount")
    result = run(argv0, option, mnt, env=broker_env(broker, _FUSE_COMMFD="0"))
    assert result.returncode == 1
    assert result.stderr == f"{argv0}: unrecognized option '{option}'\n"
    assert broker.connections == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x", "-h", "/mnt"], "invalid option -- 'x'"),
        (["--bogus=1", "/mnt"], "unrecognized option '--bogus=1'"),
        (["/mnt", "-o"], "option requires an argument -- 'o'"),
        (["/mnt", "--opt"], "option '--options' requires an argument"),
        (["--unmount=yes", "/mnt"], "option '--unmount' doesn't allow an argument"),
        (["-z", "/mnt"], "-z can only be used with -u"),
        (["-o", "rw"], "missing mountpoint argument"),
        ([], "missing mountpoint argument"),
        (["/mnt", "/other"], "extra arguments after the mountpoint"),
        (["-o", "rw", "--", "/mnt", "-u"], "extra arguments after the mountpoint"),
        ([""], "invalid mountpoint ''"),
        (
            ["/nonexistent/dir/mnt"],
            "bad mount point /nonexistent/dir/mnt: No such file or directory",
        ),
    ],
)
def test_argument_errors_are_reported_like_glibc_getopt_and_fusermount3_without_broker_contact(
    fusermount3: str, broker: FakeBroker, args: list[str], message: str
) -> None:
    result = run(fusermount3, *args, env=broker_env(broker, _FUSE_COMMFD="0"))
    assert result.returncode == 1
    assert result.stderr == f"{fusermount3}: {message}\n"
    assert result.stdout == ""
    assert broker.connections == 0


def test_sync_init_is_rejected_as_an_unknown_option_so_libfuse_falls_back(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = run(
            fusermount3,
            "--sync-init",
            "-o",
            "rw,nosuid,nodev,subtype=hello",
            "--",
            mnt,
            env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
        )
    assert result.returncode == 1
    assert result.stderr == f"{fusermount3}: unrecognized option '--sync-init'\n"
    assert broker.connections == 0


def test_options_may_follow_the_mountpoint_and_the_last_o_wins(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = run(
            fusermount3,
            mnt,
            "-o",
            "ro,allow_other",
            "--options=rw,fsname=a\\,b,subtype=x",
            env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
        )
    assert result.returncode == 1
    assert broker.requests == [mount_request(mnt, ["rw", "fsname=a,b", "subtype=x"])]


def test_an_empty_o_is_allowed_and_sends_no_options(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        run(
            fusermount3,
            "-o",
            "",
            "--",
            mnt,
            env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
        )
    assert broker.requests == [mount_request(mnt, [])]


def test_the_mountpoint_is_resolved_in_the_cwd_without_following_its_last_component(
    fusermount3: str, broker: FakeBroker, tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    base = str(tmp_path.resolve())
    for given, expected in [
        ("link/mnt//", f"{base}/real/mnt"),
        ("link", f"{base}/link"),
        ("real/..", base),
        ("./real/.", f"{base}/real"),
    ]:
        broker.reply(ok=True)
        result = run(fusermount3, "-u", given, env=broker_env(broker), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert broker.requests[-1] == unmount_request(expected, lazy=False, mount_id=None)


def test_mounting_without_a_comm_fd_is_refused_as_old_style_mounting(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    result = run(fusermount3, "-o", "rw", mnt, env=broker_env(broker))
    assert result.returncode == 1
    assert result.stderr == f"{fusermount3}: old style mounting not supported\n"
    assert broker.connections == 0


@pytest.mark.parametrize("commfd", ["abc", "3x", "", "9" * 30])
def test_an_invalid_comm_fd_is_refused_before_the_broker_is_contacted(
    fusermount3: str, broker: FakeBroker, mnt: str, commfd: str
) -> None:
    result = run(fusermount3, "-o", "rw", mnt, env=broker_env(broker, _FUSE_COMMFD=commfd))
    assert result.returncode == 1
    assert result.stderr == f"{fusermount3}: invalid _FUSE_COMMFD: {commfd}\n"
    assert broker.connections == 0


def test_a_comm_fd_that_is_not_a_socket_is_refused_before_the_broker_is_contacted(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    read_end, write_end = os.pipe()
    try:
        for args, env, number in [
            ([mnt], broker_env(broker, _FUSE_COMMFD=str(read_end)), read_end),
            # --comm-fd takes precedence over the environment.
            ([f"--comm-fd={read_end}", mnt], broker_env(broker, _FUSE_COMMFD="bogus"), read_end),
            (["--comm-fd", "999", mnt], broker_env(broker), 999),
        ]:
            result = run(fusermount3, *args, env=env, pass_fds=(read_end,))
            assert result.returncode == 1
            assert result.stderr == (
                f"{fusermount3}: file descriptor {number} is not a socket, can't send fuse fd\n"
            )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert broker.connections == 0


def test_an_unreachable_broker_is_reported_with_its_socket_path(
    fusermount3: str, tmp_path: Path, mnt: str
) -> None:
    missing = tmp_path / "no-such.sock"
    result = run(fusermount3, "-u", mnt, env={protocol.SOCKET_PATH_ENV: str(missing)})
    assert result.returncode == 1
    assert result.stderr == (
        f"{fusermount3}: cannot reach the csi-async broker at {missing}: "
        f"No such file or directory {UNREACHABLE_HINT}\n"
    )

    # A socket file with nobody listening: the broker is down.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))
        result = run(fusermount3, "-uq", mnt, env={protocol.SOCKET_PATH_ENV: str(stale)})
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"{fusermount3}: cannot reach the csi-async broker at {stale}: Connection refused"
    )


def test_a_refused_mount_prints_the_brokers_message_after_argv0_and_exits_1(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply(ok=False, code=errno.EINVAL, message="option 'dev' is not allowed")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = run(
            fusermount3,
            "-o",
            "dev",
            mnt,
            env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        # Nothing was sent to the FUSE program: it sees EOF.
        assert ours.recv(16) == b""
    assert result.returncode == 1
    assert result.stderr == f"{fusermount3}: option 'dev' is not allowed\n"
    assert result.stdout == ""


# --- unmount ----------------------------------------------------------------


def test_unmount_sends_the_mountpoint_and_lazy_flag_and_accepts_long_option_prefixes(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply(ok=True)
    broker.reply(ok=True)
    first = run(fusermount3, "-u", "-q", "-z", "--", mnt, env=broker_env(broker))
    second = run(fusermount3, mnt, "--unm", "--qu", env=broker_env(broker))
    assert (first.returncode, first.stderr) == (0, "")
    assert (second.returncode, second.stderr) == (0, "")
    assert broker.requests == [
        unmount_request(mnt, lazy=True, mount_id=None),
        unmount_request(mnt, lazy=False, mount_id=None),
    ]


def test_a_refused_unmount_is_printed_unless_quiet(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply(ok=False, code=errno.EINVAL, message=f"entry for {mnt} not found")
    loud = run(fusermount3, "-u", mnt, env=broker_env(broker))
    broker.reply(ok=False, code=errno.EINVAL, message=f"entry for {mnt} not found")
    quiet = run(fusermount3, "-u", "-q", "-z", mnt, env=broker_env(broker))
    assert (loud.returncode, loud.stderr) == (1, f"{fusermount3}: entry for {mnt} not found\n")
    assert (quiet.returncode, quiet.stderr) == (1, "")


# --- mount: the fd hand-over ------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
def test_a_mounted_fd_is_forwarded_with_exactly_one_nul_byte_and_one_fd(
    fusermount3: str, broker: FakeBroker, mnt: str, kind: socket.SocketKind
) -> None:
    broker.reply_mounted(mount_id=41)
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours:
        with theirs:
            result = run(
                fusermount3,
                "-o",
                "rw,nosuid,nodev,subtype=hello",
                "--",
                mnt,
                env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
                pass_fds=(theirs.fileno(),),
            )
        data, fds = receive_fd_message(ours)
        try:
            assert data == b"\0"
            assert len(fds) == 1
            assert os.fstat(fds[0]).st_rdev == DEV_NULL_RDEV
        finally:
            for fd in fds:
                os.close(fd)
        # One message, then nothing but EOF.
        assert ours.recv(16) == b""
    assert (result.returncode, result.stderr) == (0, "")
    assert broker.requests == [mount_request(mnt, ["rw", "nosuid", "nodev", "subtype=hello"])]


def test_a_failed_fd_forward_rolls_the_mount_back_by_its_mount_id(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply_mounted(mount_id=57)
    broker.reply(ok=True, mount_id=57)
    ours, theirs = socket.socketpair()
    ours.close()  # the FUSE program is gone before the fd arrives
    with theirs:
        result = run(
            fusermount3,
            "-o",
            "rw",
            mnt,
            env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
        )
    assert result.returncode == 1
    assert result.stderr == f"{fusermount3}: sending file descriptor: Broken pipe\n"
    assert broker.requests == [
        mount_request(mnt, ["rw"]),
        unmount_request(mnt, lazy=True, mount_id=57),
    ]


def test_the_auto_unmount_watcher_frees_stdio_and_unmounts_by_mount_id_when_the_program_exits(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply_mounted(mount_id=77)
    broker.reply(ok=True, mount_id=77)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [fusermount3, "-o", "rw,auto_unmount,subtype=hello", "--", mnt],
        env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
        pass_fds=(theirs.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    theirs.close()
    try:
        data, fds = receive_fd_message(ours)
        for fd in fds:
            os.close(fd)
        assert (data, len(fds)) == (b"\0", 1)

        # Callers that read the helper's output to EOF (bazil, Go's exec)
        # must not wait for the watcher's lifetime.
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert readable, "the watcher still holds stdout/stderr"
        assert proc.stdout.read() == b""
        assert proc.poll() is None
        assert broker.requests == [
            mount_request(mnt, ["rw", "auto_unmount", "subtype=hello"], auto_unmount=True)
        ]

        ours.close()  # the FUSE program exits
        assert proc.wait(TIMEOUT) == 0
        assert broker.requests[1:] == [unmount_request(mnt, lazy=True, mount_id=77)]
    finally:
        ours.close()
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_the_auto_unmount_option_alone_only_watches_and_then_unmounts_without_a_mount_id(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply(ok=True)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [fusermount3, "--auto-unmount", "--", mnt],
        env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
        pass_fds=(theirs.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        assert proc.poll() is None
        assert broker.requests == []
        ours.close()
        assert proc.wait(TIMEOUT) == 0
        assert broker.requests == [unmount_request(mnt, lazy=True, mount_id=None)]
    finally:
        ours.close()
        proc.kill()
        proc.wait()


# --- starter mode -----------------------------------------------------------

SHOW_FD = """
import os, sys
path = sys.argv[1]
fd = int(path.rpartition("/")[2])
print(path, os.fstat(fd).st_rdev == int(sys.argv[2]), sys.argv[3:], flush=True)
sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
"""


@pytest.mark.parametrize("how", ["fuse-starter", "fusermount3 --start"])
def test_the_starter_replaces_the_placeholder_passes_the_fd_and_returns_the_exit_status(
    fusermount3: str, fuse_starter: str, broker: FakeBroker, how: str
) -> None:
    broker.reply_mounted(mount_id=90)
    broker.reply(ok=True, mount_id=90)
    command = [fuse_starter] if how == "fuse-starter" else [fusermount3, "--start"]
    result = run(
        *command,
        "-o",
        "ro,fsname=demo",
        "--",
        sys.executable,
        "-c",
        SHOW_FD,
        "/dev/fd/N",
        str(DEV_NULL_RDEV),
        "3",
        env=broker_env(broker),
    )
    assert result.returncode == 3, result.stderr
    path, same_device, _ = result.stdout.split(" ", 2)
    assert path.startswith("/dev/fd/") and path != "/dev/fd/N"
    assert same_device == "True"
    assert broker.requests == [
        mount_request("/dev/fd/N", ["ro", "fsname=demo"]),
        unmount_request("/dev/fd/N", lazy=True, mount_id=90),
    ]


def test_the_starter_exits_with_128_plus_the_signal_that_killed_the_program(
    fuse_starter: str, broker: FakeBroker
) -> None:
    broker.reply_mounted(mount_id=5)
    broker.reply(ok=True, mount_id=5)
    result = run(
        fuse_starter,
        "--",
        sys.executable,
        "-c",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        env=broker_env(broker),
    )
    assert result.returncode == 128 + signal.SIGKILL
    assert broker.requests[-1] == unmount_request("/dev/fd/N", lazy=True, mount_id=5)


def test_the_starter_forwards_sigterm_to_the_program_and_unmounts_after_it_exits(
    fuse_starter: str, broker: FakeBroker
) -> None:
    broker.reply_mounted(mount_id=6)
    broker.reply(ok=True, mount_id=6)
    program = (
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    os.write(1, b'got %d\\n' % signum)\n"
        "    os._exit(42)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [fuse_starter, "--", sys.executable, "-c", program, "/dev/fd/N"],
        env=broker_env(broker),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert len(broker.requests) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 42
        assert proc.stdout.read() == f"got {signal.SIGTERM.value}\n"
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert broker.requests[-1] == unmount_request("/dev/fd/N", lazy=True, mount_id=6)


def test_the_starter_leaves_the_mount_in_place_with_keep_mount(
    fuse_starter: str, broker: FakeBroker
) -> None:
    broker.reply_mounted(mount_id=7)
    result = run(
        fuse_starter, "--keep-mount", "--", sys.executable, "-c", "pass", env=broker_env(broker)
    )
    assert result.returncode == 0
    assert broker.requests == [mount_request("/dev/fd/N", [])]


def test_the_starter_exits_127_and_unmounts_when_the_program_cannot_be_executed(
    fuse_starter: str, broker: FakeBroker
) -> None:
    broker.reply_mounted(mount_id=8)
    broker.reply(ok=True, mount_id=8)
    result = run(fuse_starter, "--", "/nonexistent/program", "/dev/fd/N", env=broker_env(broker))
    assert result.returncode == 127
    assert result.stderr == (
        f"{fuse_starter}: cannot execute /nonexistent/program: No such file or directory\n"
    )
    assert broker.requests[-1] == unmount_request("/dev/fd/N", lazy=True, mount_id=8)


def test_the_starter_reports_a_refused_mount_and_does_not_run_the_program(
    fuse_starter: str, broker: FakeBroker, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    broker.reply(ok=False, code=errno.EPERM, message="this volume is read-only")
    result = run(
        fuse_starter,
        "--",
        sys.executable,
        "-c",
        f"open({str(marker)!r}, 'w').close()",
        env=broker_env(broker),
    )
    assert result.returncode == 1
    assert result.stderr == f"{fuse_starter}: this volume is read-only\n"
    assert not marker.exists()


def test_the_starter_refuses_to_run_without_a_program(
    fuse_starter: str, broker: FakeBroker
) -> None:
    result = run(fuse_starter, "-o", "rw", "--", env=broker_env(broker))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{fuse_starter}: missing program to run")
    assert broker.connections == 0


# --- a busy broker: EAGAIN is retried with back-off, nothing else is -------


def test_a_busy_broker_is_asked_again_until_it_unmounts(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply_busy(3)
    broker.reply(ok=True)
    result = run(fusermount3, "-u", mnt, env=broker_env(broker))
    assert (result.returncode, result.stderr) == (0, "")
    assert broker.connections == 4
    assert broker.requests == [unmount_request(mnt, lazy=False, mount_id=None)] * 4


def test_a_busy_broker_is_asked_again_until_it_mounts_and_the_fd_is_forwarded(
    fusermount3: str, broker: FakeBroker, mnt: str
) -> None:
    broker.reply_busy(2)
    broker.reply_mounted(mount_id=12)
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            result = run(
                fusermount3,
                "-o",
                "rw",
                mnt,
                env=broker_env(broker, _FUSE_COMMFD=str(theirs.fileno())),
                pass_fds=(theirs.fileno(),),
            )
        data, fds = receive_fd_message(ours)
        for fd in fds:
            os.close(fd)
    assert (result.returncode, result.stderr) == (0, "")
    assert (data, len(fds)) == (b"\0", 1)
    assert broker.requests == [mount_request(mnt, ["rw"])] * 3


def test_the_starter_asks_a_busy_broker_again(fuse_starter: str, broker: FakeBroker) -> None:
    broker.reply_busy(2)
    broker.reply_mounted(mount_id=13)
    broker.reply(ok=True, mount_id=13)
    result = run(fuse_starter, "--", sys.executable, "-c", "pass", env=broker_env(broker))
    assert (result.returncode, result.stderr) == (0, "")
    assert broker.requests == [mount_request("/dev/fd/N", [])] * 3 + [
        unmount_request("/dev/fd/N", lazy=True, mount_id=13)
    ]


def test_sigterm_ends_the_starters_retries_of_a_busy_broker(
    fuse_starter: str, broker: FakeBroker, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    broker.default = {"ok": False, "errno": errno.EAGAIN, "message": BUSY, "mount_id": None}
    proc = subprocess.Popen(
        [fuse_starter, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
        env=broker_env(broker),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: broker.connections >= 2)
        proc.send_signal(signal.SIGTERM)
        # Well before the 10 s retry budget would have run out.
        _, stderr = proc.communicate(timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr == f"{fuse_starter}: {BUSY}\n"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.EACCES, "this broker socket belongs to another pod"),
        (errno.EBUSY, "too many connections to this volume's broker"),
        (errno.EPROTO, "malformed request"),
        (errno.EPERM, "option 'suid' refused"),
    ],
)
def test_other_refusals_are_final_and_not_retried(
    fusermount3: str, broker: FakeBroker, mnt: str, code: int, message: str
) -> None:
    broker.reply(ok=False, code=code, message=message)
    broker.reply(ok=True)
    result = run(fusermount3, "-u", mnt, env=broker_env(broker))
    assert (result.returncode, result.stderr) == (1, f"{fusermount3}: {message}\n")
    assert broker.connections == 1


class VirtualClock:
    """Backoff's clock and sleep, advanced by the sleeps instead of waiting them out."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    from fusermount3_proxy import client

    fake = VirtualClock()
    monkeypatch.setattr(client.Backoff, "clock", staticmethod(fake.clock))
    monkeypatch.setattr(client.Backoff, "sleep", staticmethod(fake.sleep))
    return fake


def test_a_broker_that_stays_busy_is_given_up_on_within_the_budget_with_its_message(
    broker: FakeBroker, virtual_clock: VirtualClock, mnt: str
) -> None:
    from fusermount3_proxy import client

    broker.default = {"ok": False, "errno": errno.EAGAIN, "message": BUSY, "mount_id": None}
    with pytest.raises(client.Refused) as refused:
        client.unmount(mnt, path=broker.path)
    assert str(refused.value) == BUSY
    # One connection per attempt, one sleep between two attempts.
    sleeps = virtual_clock.sleeps
    assert broker.connections == len(sleeps) + 1
    assert 10 <= broker.connections <= client.RETRY_MAX_ATTEMPTS
    # Each sleep is between half and all of 50 ms doubling up to 1 s...
    for attempt, pause in enumerate(sleeps):
        delay = min(0.05 * 2**attempt, 1.0)
        assert delay / 2 <= pause <= delay, (attempt, pause)
    # ...and it stopped because the next one would overrun the budget (or,
    # with short sleeps all along, at the attempt bound).
    assert sum(sleeps) <= client.RETRY_BUDGET
    next_delay = min(0.05 * 2 ** len(sleeps), 1.0)
    assert (
        sum(sleeps) + next_delay > client.RETRY_BUDGET
        or broker.connections == client.RETRY_MAX_ATTEMPTS
    )


def test_the_number_of_attempts_is_bounded_even_when_time_is_not(
    broker: FakeBroker, virtual_clock: VirtualClock, mnt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fusermount3_proxy import client

    monkeypatch.setattr(client, "RETRY_BUDGET", 1e9)
    broker.default = {"ok": False, "errno": errno.EAGAIN, "message": BUSY, "mount_id": None}
    with pytest.raises(client.Refused, match=BUSY):
        client.unmount(mnt, path=broker.path)
    assert broker.connections == client.RETRY_MAX_ATTEMPTS


def test_the_answer_is_waited_for_longer_than_everything_the_broker_may_wait_for() -> None:
    from csi_async.broker import lifecycle, session

    # The broker may hold a request for the volume's lock, then for a node-wide
    # slot, before it mounts and answers within READ_TIMEOUT; a helper that hung
    # up sooner would throw away a mount the broker had made for it.
    broker_waits = session.LOCK_WAIT + lifecycle.SLOT_WAIT + protocol.READ_TIMEOUT
    assert broker_waits + 10 <= protocol.ANSWER_TIMEOUT


def test_a_slow_answer_is_waited_for_with_the_answer_timeout_not_the_connect_timeout(
    broker: FakeBroker, mnt: str
) -> None:
    from fusermount3_proxy import client

    broker.answer_delay = 0.5
    broker.reply(ok=True)
    request: protocol.UnmountRequest = {
        "op": "unmount",
        "mountpoint": mnt,
        "lazy": False,
        "mount_id": None,
    }
    response, fd = client.exchange(request, path=broker.path, timeout=0.1, answer_timeout=TIMEOUT)
    assert response["ok"] and fd is None
    with pytest.raises(client.BrokerError, match="timed out"):
        client.exchange(request, path=broker.path, timeout=TIMEOUT, answer_timeout=0.1)
    # The broker's late answer then finds the helper gone.
    wait_until(lambda: bool(broker.errors))
    assert [type(err) for err in broker.errors] == [BrokenPipeError]
    broker.errors.clear()


def test_a_full_listen_backlog_is_waited_out(tmp_path: Path, mnt: str) -> None:
    """connect() gets EAGAIN while the backlog is full; the client retries it."""
    from fusermount3_proxy import client

    path = str(tmp_path / "backlog.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backing_off = threading.Event()
    outcome: list[BaseException | None] = []

    def sleep(seconds: float) -> None:
        backing_off.set()
        time.sleep(seconds)

    def unmount() -> None:
        try:
            client.unmount(mnt, path=path)
        except BaseException as err:
            outcome.append(err)
        else:
            outcome.append(None)

    with listener, filler, pytest.MonkeyPatch.context() as patch:
        patch.setattr(client.Backoff, "sleep", staticmethod(sleep))
        listener.bind(path)
        # Backlog 0 holds one connection that nobody accepts; the next gets EAGAIN.
        listener.listen(0)
        listener.settimeout(TIMEOUT)
        filler.connect(path)
        worker = threading.Thread(target=unmount)
        worker.start()
        try:
            assert backing_off.wait(TIMEOUT), "the client never backed off"
            accepted, _ = listener.accept()  # the filler: room in the backlog again
            accepted.close()
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                length = protocol.decode_header(
                    _recv_exact(conn, protocol.HEADER_SIZE), protocol.KIND_REQUEST
                )
                request = protocol.decode_json_object(_recv_exact(conn, length))
                response = {"ok": True, "errno": 0, "message": "", "mount_id": None}
                conn.sendall(protocol.encode_frame(protocol.KIND_RESPONSE, response))
        finally:
            worker.join(TIMEOUT)
    assert outcome == [None]
    assert request == unmount_request(mnt, lazy=True, mount_id=None)


def test_a_backlog_that_stays_full_is_reported_as_today(
    tmp_path: Path, virtual_clock: VirtualClock, mnt: str
) -> None:
    from fusermount3_proxy import client

    path = str(tmp_path / "backlog.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as filler,
    ):
        listener.bind(path)
        listener.listen(0)
        filler.connect(path)
        with pytest.raises(client.BrokerUnreachable) as unreachable:
            client.unmount(mnt, path=path)
    assert str(unreachable.value) == (
        f"cannot reach the csi-async broker at {path}: Resource temporarily unavailable "
        "(the broker is not accepting connections)"
    )
    assert len(virtual_clock.sleeps) >= 9


def test_an_unreachable_broker_is_not_retried(
    tmp_path: Path, virtual_clock: VirtualClock, mnt: str
) -> None:
    from fusermount3_proxy import client

    for missing in (tmp_path / "no-such.sock", mnt):
        with pytest.raises(client.BrokerUnreachable):
            client.unmount(mnt, path=str(missing))
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(stale)
        with pytest.raises(client.BrokerUnreachable, match="Connection refused"):
            client.unmount(mnt, path=stale)
    assert virtual_clock.sleeps == []


# --- --wait: a FUSE mount on a path, from mountinfo only --------------------


def topmost_fstype(path: Path) -> str | None:
    """What the test sees on path, from its own parse of mountinfo."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if point == os.fsencode(path):
                found = fields[fields.index(b"-", 6) + 1].decode()
    return found


class Hello:
    """libfuse's hello example serving a directory, run as root (it mounts itself)."""

    def __init__(self, binary: Path, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            [str(binary), "-f", str(mountpoint)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_mounted(self) -> None:
        wait_until(lambda: topmost_fstype(self.mountpoint) == "fuse.hello")

    def stop(self) -> None:
        # SIGCONT first: a stopped daemon would never handle the SIGTERM.
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(TIMEOUT)
        # hello unmounts when it exits; never leave a dead mount below /tmp.
        if topmost_fstype(self.mountpoint) == "fuse.hello":
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=True)


@pytest.fixture
def hello_binary(fuse_examples_on_host: Path) -> Path:
    return fuse_examples_on_host / "hello"


@pytest.fixture
def tmpfs_on(mnt: str) -> Iterator[Path]:
    path = Path(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "csi-async-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def has_mountinfo_open(pid: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/mountinfo"):
                return True
        except FileNotFoundError:
            continue
    return False


def test_wait_returns_as_soon_as_a_fuse_filesystem_is_mounted(
    fusermount3: str, hello_binary: Path, mnt: str
) -> None:
    waiter = subprocess.Popen(
        [fusermount3, "--wait", mnt, "--timeout", "60"],
        env={},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    hello: Hello | None = None
    try:
        # Mount only once it is watching, so that this is the waiting case.
        wait_until(lambda: waiter.poll() is not None or has_mountinfo_open(waiter.pid))
        assert waiter.poll() is None, waiter.communicate()
        hello = Hello(hello_binary, Path(mnt))
        hello.wait_mounted()
        mounted_at = time.monotonic()
        stdout, stderr = waiter.communicate(timeout=TIMEOUT)
        # poll() on mountinfo wakes it: nowhere near its 60 s timeout.
        assert time.monotonic() - mounted_at < 5
    finally:
        waiter.kill()
        waiter.wait()
        if hello is not None:
            hello.stop()
    assert (waiter.returncode, stdout, stderr) == (0, "", "")


def test_poll_on_mountinfo_reports_a_mount_made_after_it_was_read(mnt: str) -> None:
    """The kernel behaviour --wait relies on (its 100 ms re-read is only a fallback)."""
    import select

    from fusermount3_proxy import wait

    table = wait.MountTable()
    try:
        table.read()
        poller = select.poll()
        poller.register(table.fd, select.POLLPRI | select.POLLERR)
        # Consume any change made since the open (other tests on this machine
        # may mount too, so a later wake-up is only checked to be reported).
        poller.poll(0)
        subprocess.run(["mount", "-t", "tmpfs", "csi-async-test", mnt], check=True)
        try:
            events = poller.poll(TIMEOUT * 1000)
            assert events and events[0][1] & (select.POLLPRI | select.POLLERR)
            assert table.fstype_at(os.fsencode(mnt)) == b"tmpfs"
        finally:
            subprocess.run(["umount", "-l", mnt], check=True)
    finally:
        table.close()


def test_wait_gives_up_with_exit_1_after_the_timeout_when_nothing_is_mounted(
    fusermount3: str, mnt: str
) -> None:
    started = time.monotonic()
    result = run(fusermount3, "--wait", mnt, "--timeout=0.5")
    assert time.monotonic() - started >= 0.5
    assert result.returncode == 1
    assert result.stderr == (
        f"{fusermount3}: no FUSE filesystem on {mnt} after 0.5 s (nothing is mounted there)\n"
    )


def test_a_non_fuse_mount_does_not_count(fusermount3: str, tmpfs_on: Path) -> None:
    result = run(fusermount3, "--wait", str(tmpfs_on), "--timeout", "0.3")
    assert result.returncode == 1
    assert result.stderr == (
        f"{fusermount3}: no FUSE filesystem on {tmpfs_on} after 0.3 s "
        "(the topmost mount there is tmpfs)\n"
    )


def test_only_the_topmost_mount_counts(
    fusermount3: str, hello_binary: Path, tmpfs_on: Path
) -> None:
    hello = Hello(hello_binary, tmpfs_on)
    try:
        hello.wait_mounted()
        # FUSE over the tmpfs: the FUSE filesystem is what a reader sees.
        assert run(fusermount3, "--wait", str(tmpfs_on), "--timeout", "0").returncode == 0
        subprocess.run(["mount", "-t", "tmpfs", "csi-async-over", str(tmpfs_on)], check=True)
        try:
            # And a tmpfs over FUSE hides it.
            result = run(fusermount3, "--wait", str(tmpfs_on), "--timeout", "0")
            assert result.returncode == 1
            assert "(the topmost mount there is tmpfs)" in result.stderr
        finally:
            subprocess.run(["umount", "-l", str(tmpfs_on)], check=True)
    finally:
        hello.stop()


def test_timeout_0_checks_once(fusermount3: str, hello_binary: Path, mnt: str) -> None:
    assert run(fusermount3, "--wait", mnt, "--timeout", "0").returncode == 1
    hello = Hello(hello_binary, Path(mnt))
    try:
        hello.wait_mounted()
        result = run(fusermount3, "--wait", "--timeout", "0", mnt)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    finally:
        hello.stop()


def test_wait_matches_the_unescaped_mount_point_against_the_normalised_path(
    fusermount3: str, hello_binary: Path, tmp_path: Path
) -> None:
    # mountinfo shows these as a\040b\011c\134d; a sibling that only shares
    # a prefix must not match.
    odd = tmp_path / "a b\tc\\d"
    odd.mkdir()
    (tmp_path / "a").mkdir()
    hello = Hello(hello_binary, odd)
    try:
        hello.wait_mounted()
        for given, cwd in [
            (str(odd), None),
            ("./a b\tc\\d/", tmp_path),
            (f"{tmp_path}/a/../a b\tc\\d//", None),
        ]:
            result = run(fusermount3, "--wait", given, "--timeout", "0", cwd=cwd)
            assert (result.returncode, result.stderr) == (0, ""), given
        assert run(fusermount3, "--wait", str(tmp_path / "a"), "--timeout", "0").returncode == 1
    finally:
        hello.stop()


def test_wait_never_touches_the_path_so_a_hung_daemon_cannot_hang_it(
    fusermount3: str, hello_binary: Path, mnt: str
) -> None:
    hello = Hello(hello_binary, Path(mnt))
    try:
        hello.wait_mounted()
        # A stopped daemon answers nothing: a stat() of the mount would hang.
        hello.proc.send_signal(signal.SIGSTOP)
        result = run(fusermount3, "--wait", mnt, "--timeout", "0")
        assert (result.returncode, result.stderr) == (0, "")
    finally:
        hello.stop()


def test_wait_does_not_need_the_path_to_exist(fusermount3: str, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    result = run(fusermount3, "--wait", str(missing), "--timeout", "0")
    assert result.returncode == 1
    assert result.stderr.endswith("(nothing is mounted there)\n")


def test_wait_help_documents_the_probe_and_exits_0(fusermount3: str) -> None:
    result = run(fusermount3, "--wait", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {fusermount3} --wait PATH [--timeout SECONDS]\n")
    assert 'command: [fusermount3, --wait, /data, --timeout, "30"]' in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing PATH (usage: --wait PATH [--timeout SECONDS])"),
        (["/data", "/other"], "--wait takes exactly one PATH"),
        (["/data", "--", "/other"], "--wait takes exactly one PATH"),
        (["/data", "--timeout"], "option '--timeout' requires an argument"),
        (["/data", "--timeout", "soon"], "invalid --timeout 'soon': give a number of seconds >= 0"),
        (["/data", "--timeout=-1"], "invalid --timeout '-1': give a number of seconds >= 0"),
        (["/data", "--timeout", "nan"], "invalid --timeout 'nan': give a number of seconds >= 0"),
        (["/data", "--timeout", "inf"], "invalid --timeout 'inf': give a number of seconds >= 0"),
        (["--bogus", "/data"], "unrecognized option '--bogus'"),
    ],
)
def test_wait_argument_errors_exit_1(fusermount3: str, args: list[str], message: str) -> None:
    result = run(fusermount3, "--wait", *args)
    assert (result.returncode, result.stderr) == (1, f"{fusermount3}: {message}\n")


# --- the build --------------------------------------------------------------


def test_the_default_build_is_an_executable_reproducible_zipapp_of_the_package_sources(
    tmp_path: Path,
) -> None:
    outputs = [tmp_path / "a" / "fusermount3", tmp_path / "b" / "fusermount3"]
    for output, how in zip(outputs, (["--output"], []), strict=True):
        result = subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), *how, str(output)],
            check=True,
            capture_output=True,
            text=True,
        )
        assert result.stdout == f"{output}\n"
    first, second = (output.read_bytes() for output in outputs)
    assert first == second
    # The default interpreter, with the entry point as its -c command (see
    # build_zipapp.py's BOOTSTRAP: no runpy on the way to a mount).
    assert first.startswith(b"#!/usr/bin/python3 -ISc")
    assert b"from fusermount3_proxy.__main__ import main;main()\n" in first.split(b"PK", 1)[0]
    assert outputs[0].stat().st_mode & 0o777 == 0o755
    with zipfile.ZipFile(outputs[0]) as archive:
        names = archive.namelist()
    package = sorted(p.name for p in (REPO / "fusermount3_proxy").glob("*.py"))
    # Each module's source, and its bytecode beside it (zipimport loads the
    # .pyc when its magic number matches the running Python).
    expected = [f"fusermount3_proxy/{name}{c}" for name in package for c in ("", "c")]
    assert names == ["__main__.py", *expected]


# --- the mountpoint's realpath, without os ----------------------------------


def test_realpath_resolves_as_os_path_realpath_strict_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mountpoint.realpath is posixpath.realpath(strict=True) over posix calls
    # (the zipapp does not import os on the way to a mount): same paths,
    # same errors, for symlinks relative and absolute, chains, loops,
    # dangling links, ".." after a symlink and files used as directories.
    from fusermount3_proxy.mountpoint import realpath

    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "f").write_text("")
    links = {
        "rel": "d/e", "abs": str(tmp_path / "d"), "chain": "rel", "up": "d/e/..",
        "dangling": "nowhere", "loop1": "loop2", "loop2": "loop1", "self": "self",
        "tofile": "f", "dotdot": "..", "d/e/back": "../../d",
    }  # fmt: skip
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    monkeypatch.chdir(tmp_path / "d")
    names = [*links, "d", "d/e", "f", ".", "..", ""]
    candidates = [
        *(f"{tmp_path}/{name}" for name in names),
        *(f"{tmp_path}/{name}/.." for name in names),
        *(f"{tmp_path}/{name}/e" for name in names),
        *(f"{tmp_path}//{name}/./" for name in names),
        "e", "e/..", "../rel", "../chain/../abs/e", "../d/e/back/e", "/", "//", "/..", ".",
    ]  # fmt: skip

    def outcome(resolve: Callable[[str], str], path: str) -> str:
        try:
            return resolve(path)
        except OSError as err:
            return f"OSError {err.errno}"

    for path in candidates:
        expected = outcome(lambda p: os.path.realpath(p, strict=True), path)
        assert outcome(realpath, path) == expected, path
