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
import select
import signal
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusermount3_proxy import __version__, protocol

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build_zipapp.py"
USAGE = (
    "{}: [options] mountpoint\n"
    "Options:\n"
    " -h\t\t    print help\n"
    " -V\t\t    print version\n"
    " -o opt[,opt...]    mount options\n"
    " -u\t\t    unmount\n"
    " -q\t\t    quiet\n"
    " -z\t\t    lazy unmount\n"
)
UNREACHABLE_HINT = "(is the volume's broker socket mounted into this container?)"
DEV_NULL_RDEV = os.stat("/dev/null").st_rdev
TIMEOUT = 20


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zipapp as fusermount3, plus a fuse-starter symlink to it."""
    directory = tmp_path_factory.mktemp("bin")
    subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--output",
            str(directory / "fusermount3"),
            # The interpreter running the tests, not whatever /usr/bin/python3 is.
            "--interpreter",
            f"{sys.executable} -IS",
        ],
        check=True,
        capture_output=True,
    )
    (directory / "fuse-starter").symlink_to("fusermount3")
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
        if self._replies:
            response, send_fd = self._replies.pop(0)
        else:
            response = {
                "ok": False,
                "errno": errno.EPERM,
                "message": "refused by the test broker",
                "mount_id": None,
            }
            send_fd = False
        frame = protocol.encode_frame(protocol.KIND_RESPONSE, response)
        if send_fd:
            fd = os.open("/dev/null", os.O_RDWR)
            try:
                socket.send_fds(conn, [frame], [fd])
            finally:
                os.close(fd)
        else:
            conn.sendall(frame)


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
def test_help_prints_the_fusermount3_usage_to_stdout_and_exits_1(
    fusermount3: str, args: list[str]
) -> None:
    result = run(fusermount3, *args)
    assert result.returncode == 1
    assert result.stdout == USAGE.format(fusermount3)
    assert result.stderr == ""


@pytest.mark.parametrize("args", [["-V"], ["--version"], ["--vers"], ["-qV"]])
def test_version_prints_the_fusermount3_version_with_the_csi_async_version_and_exits_0(
    fusermount3: str, args: list[str]
) -> None:
    result = run(fusermount3, *args)
    assert result.returncode == 0
    assert result.stdout == f"fusermount3 version: 3.18.0 (csi-async {__version__})\n"


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
    assert first.startswith(b"#!/usr/bin/python3 -IS\n")
    assert outputs[0].stat().st_mode & 0o777 == 0o755
    with zipfile.ZipFile(outputs[0]) as archive:
        names = archive.namelist()
    package = sorted(p.name for p in (REPO / "fusermount3_proxy").glob("*.py"))
    # Each module's source, and its bytecode beside it (zipimport loads the
    # .pyc when its magic number matches the running Python).
    expected = [f"fusermount3_proxy/{name}{c}" for name in package for c in ("", "c")]
    assert names == ["__main__.py", *expected]
