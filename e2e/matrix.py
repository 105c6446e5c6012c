"""The compatibility matrix: real FUSE programs of each FUSE library, through csi-async.

    python -m e2e matrix --zipapp build/fusermount3 [--examples build/fuse-examples]
        [--json out.json] [--markdown docs/compatibility.md] [--only NAME]...

Each entry of IMPLEMENTATIONS is one FUSE program, declared as data: its FUSE
library, how to learn its version, what it serves (a setup that prepares
directories or servers), its command line, whether it takes writes, and what
a pod author must know about it. Every entry runs on one simulated node (the
real driver, a kubelet emulator, sandboxed unprivileged "pods", see
e2e/node.py) in each mode it supports:

* proxy: the program runs as it always does; the zipapp installed as
  /usr/bin/fusermount3 (and fusermount) relays its mount to the broker;
* starter: `fusermount3 --start -- PROGRAM ... /dev/fd/N`, for programs whose
  FUSE library accepts an already-mounted /dev/fd/N as the mountpoint.

and goes through these checks, stopping at the first that fails:

* mount: the program, uid 65534 without capabilities, mounts the volume;
* read: a second container of the pod, as uid 1000, reads a known file
  through mount propagation;
* write (writable programs): that container writes a file, reads it back,
  and the file reaches the program's backing store;
* unmount: `fusermount3 -u` in the pod removes the mount and the program exits;
* kill: a fresh instance is SIGKILLed; its mount is detached anyway (by the
  broker, which watches the daemon's process, or by the starter).

docs/compatibility.md is generated from a run of the whole matrix
(--markdown); tests/test_matrix.py runs it and checks that the document
still matches.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2e.kubelet import Pod
from e2e.node import FuseVolume, Node
from e2e.programs import init_gocryptfs
from e2e.sandbox import NOBODY, Container, PodSandbox

REPO = Path(__file__).resolve().parent.parent
FS_SCRIPTS_ON_HOST = Path(__file__).resolve().parent / "fs"

# Container paths.
DATA = "/run/data"  # where the pod's containers mount the FUSE volume
SOURCE = "/run/src"  # a host directory some programs serve
EXAMPLES = "/run/examples"  # libfuse's example binaries (bound into every container)
FS_SCRIPTS = "/run/fs"  # e2e/fs (bound into every container)
OWN_MOUNTPOINT = "/run/own-mnt"  # an empty directory the program's uid owns
STARTER_MOUNTPOINT = "/dev/fd/N"  # the starter replaces it with the fd it passes

PROXY = "proxy"
STARTER = "starter"
CHECKS = ("mount", "read", "write", "unmount", "kill")
READER_UID = 1000
KNOWN_FILE = "known.txt"
KNOWN_TEXT = "served from the host\n"
WRITTEN_FILE = "matrix-write.txt"
WRITTEN_TEXT = "written through the mount\n"
TIMEOUT = 15.0  # for each wait of each check

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"


class CheckFailed(Exception):
    """A check did not hold; the message is the short reason shown in the matrix."""


# ---------------------------------------------------------------- versions


@dataclass(frozen=True)
class Probe:
    """A host command whose output names a version: the first group of `pattern`.

    "{examples}" in argv is the host directory of libfuse's example binaries.
    """

    argv: tuple[str, ...]
    pattern: str
    label: str = "{}"

    def __call__(self, examples: Path) -> str:
        argv = [arg.replace("{examples}", str(examples)) for arg in self.argv]
        try:
            done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        match = re.search(self.pattern, done.stdout + done.stderr, re.MULTILINE)
        return self.label.format(match.group(1)) if match else "unknown"


def dpkg_version(package: str) -> Probe:
    """The upstream part of a Debian package's version."""
    return Probe(("dpkg-query", "-W", "-f=${Version}", package), r"^(?:\d+:)?([^-~+]+)")


def built_using(package: str, source: str) -> Probe:
    """The version of a Go library a Debian package was built with (Built-Using)."""
    return Probe(
        ("dpkg-query", "-W", "-f=${Built-Using}", package),
        re.escape(source) + r" \(= ([^)]+?)(?:-\d+)?\)",
    )


# ---------------------------------------------------------------- what a program serves


@dataclass
class Services:
    """Servers shared by the rows of one run, started on first use."""

    workdir: Path
    _s3: S3Server | None = None

    def s3(self) -> S3Server:
        if self._s3 is None:
            self._s3 = S3Server(self.workdir / "moto.log")
        return self._s3

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None


@dataclass
class Workspace:
    """A fresh host directory (mode 0755) for one row and mode, and the shared servers."""

    path: Path
    services: Services

    def shared_dir(self, name: str, mode: int = 0o777) -> Path:
        path = self.path / name
        path.mkdir()
        path.chmod(mode)
        return path


@dataclass
class Served:
    """What a row's setup prepared for the program."""

    # container path -> host path, for the program's container
    binds: dict[str, Path] = field(default_factory=dict)
    # more substitutions for the program's argv
    values: dict[str, str] = field(default_factory=dict)
    # the file the read check reads (relative to the mount), and what it
    # must hold; None: list the mount's root instead
    read_file: str = KNOWN_FILE
    read_text: str | None = KNOWN_TEXT
    # where the write check writes WRITTEN_FILE (relative to the mount)
    write_dir: str = ""
    # checks that WRITTEN_FILE reached the backing store; raises CheckFailed
    verify_write: Callable[[], None] | None = None


Setup = Callable[[Workspace], Served]


def serves_nothing(read_file: str, read_text: str) -> Setup:
    """For filesystems that make up their content (hello, memfs)."""
    return lambda _: Served(read_file=read_file, read_text=read_text)


def _source(ws: Workspace) -> Path:
    source = ws.shared_dir("src")
    (source / KNOWN_FILE).write_text(KNOWN_TEXT)
    (source / KNOWN_FILE).chmod(0o644)
    return source


def _expect_file(path: Path) -> Callable[[], None]:
    def verify() -> None:
        try:
            text = path.read_text()
        except OSError as err:
            raise CheckFailed(f"the written file is not in the source: {err}") from None
        if text != WRITTEN_TEXT:
            raise CheckFailed(f"the source holds {text!r}")

    return verify


def serves_source(read_prefix: str = "") -> Setup:
    """A host directory with KNOWN_FILE, bound at SOURCE; writes land in it."""

    def setup(ws: Workspace) -> Served:
        source = _source(ws)
        return Served(
            binds={SOURCE: source},
            read_file=read_prefix + KNOWN_FILE,
            write_dir=read_prefix,
            verify_write=_expect_file(source / WRITTEN_FILE),
        )

    return setup


SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def serves_sftp(ws: Workspace) -> Served:
    """SOURCE over SFTP: an ssh stand-in that runs sftp-server in the pod (no sshd)."""
    served = serves_source()(ws)
    bin_dir = ws.shared_dir("bin", 0o755)
    (bin_dir / "ssh").write_text(f"#!/bin/sh\ncd {SOURCE} && exec {SFTP_SERVER}\n")
    (bin_dir / "ssh").chmod(0o755)
    served.binds["/run/bin"] = bin_dir
    served.values["ssh"] = "/run/bin/ssh"
    return served


def serves_s3_bucket(ws: Workspace) -> Served:
    """A bucket holding KNOWN_FILE on the local S3 server, credentials, an own mountpoint."""
    s3 = ws.services.s3()
    bucket = f"matrix-{uuid.uuid4().hex[:12]}"
    s3.request("PUT", f"/{bucket}")
    s3.request("PUT", f"/{bucket}/{KNOWN_FILE}", KNOWN_TEXT.encode())
    secrets = ws.shared_dir("s3", 0o755)
    passwd = secrets / "passwd"
    passwd.write_text("matrix:secret\n")
    # s3fs refuses a credentials file that others can read.
    os.chown(passwd, NOBODY, NOBODY)
    passwd.chmod(0o600)
    mountpoint = ws.shared_dir("own-mnt", 0o700)
    os.chown(mountpoint, NOBODY, NOBODY)

    def verify() -> None:
        try:
            text = s3.request("GET", f"/{bucket}/{WRITTEN_FILE}").decode()
        except OSError as err:
            raise CheckFailed(f"the written object is not in the bucket: {err}") from None
        if text != WRITTEN_TEXT:
            raise CheckFailed(f"the bucket holds {text!r}")

    return Served(
        binds={"/run/s3": secrets, OWN_MOUNTPOINT: mountpoint},
        values={"bucket": bucket, "url": s3.url, "passwd": "/run/s3/passwd"},
        verify_write=verify,
    )


def serves_gocryptfs(ws: Workspace) -> Served:
    """A fresh gocryptfs cipher directory (owned by the pod's uid) and its password file."""
    secrets = ws.shared_dir("secrets", 0o755)
    (secrets / "pass").write_text("correct horse battery staple\n")
    (secrets / "pass").chmod(0o644)
    cipher = ws.path / "cipher"
    init_gocryptfs(cipher, secrets / "pass")

    def verify() -> None:
        encrypted = [p for p in cipher.iterdir() if not p.name.startswith("gocryptfs.")]
        if len(encrypted) != 1:
            raise CheckFailed(f"expected one encrypted file, found {len(encrypted)}")
        if "matrix" in encrypted[0].name or WRITTEN_TEXT.encode() in encrypted[0].read_bytes():
            raise CheckFailed("the written file reached the cipher directory unencrypted")

    return Served(
        binds={"/run/cipher": cipher, "/run/secrets": secrets},
        read_file="",
        read_text=None,  # a new cipher directory is empty: list it
        verify_write=verify,
    )


# ---------------------------------------------------------------- the local S3 server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class S3Server:
    """moto's S3 server on 127.0.0.1 (pods share the node's network here)."""

    # moto does not check signatures, but answers anonymous requests with 403.
    _AUTH = (
        "AWS4-HMAC-SHA256 Credential=matrix/20240101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=0"
    )

    def __init__(self, log: Path, timeout: float = 30.0) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        # Straight to 127.0.0.1, whatever http_proxy says.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._http.open(self.url + "/", timeout=2):
                    return
            except (OSError, urllib.error.URLError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-500:]
                raise CheckFailed(f"moto's S3 server did not start: {tail}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Authorization", self._AUTH)
        request.add_header("Content-Type", "application/octet-stream")
        with self._http.open(request, timeout=10) as response:
            data: bytes = response.read()
            return data

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


# ---------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Library:
    """A FUSE library, and what pod authors must know about every program built on it."""

    name: str
    version: Probe
    takes_dev_fd: bool  # accepts an already-mounted /dev/fd/N mountpoint (starter mode)
    notes: tuple[str, ...] = ()


LIBFUSE3 = Library(
    "libfuse3", dpkg_version("libfuse3-3"), True,
    ("in proxy mode libfuse opens /dev/fuse before it runs fusermount3, and gives up if it "
     "cannot: the container needs an openable /dev/fuse, but a dummy (here /dev/null bound "
     "there) is enough; starter mode needs neither /dev/fuse nor a fusermount3 exec",
     "libfuse >= 3.3 takes /dev/fd/N as the mountpoint: starter mode works"),
)  # fmt: skip
LIBFUSE2 = Library(
    "libfuse2", dpkg_version("libfuse2"), False,
    ("libfuse2 execs fusermount, not fusermount3: install the zipapp under both names",
     "like libfuse3 it opens /dev/fuse first and gives up if it cannot: the container "
     "needs an openable (dummy) /dev/fuse",
     "auto_unmount goes inside -o (not --auto-unmount)",
     "no /dev/fd/N mountpoints: proxy mode only"),
)  # fmt: skip


def go_fuse(package: str) -> Library:
    return Library(
        "go-fuse", built_using(package, "golang-github-hanwen-go-fuse"), True,
        ("go-fuse runs fusermount3 with an empty environment (only _FUSE_COMMFD): use "
         "native mode, whose socket is at the zipapp's default path; meta-fuse mode's "
         "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH never reaches the zipapp",
         "does not open /dev/fuse itself: it always runs fusermount3",
         "takes /dev/fd/N as the mountpoint: starter mode works"),
    )  # fmt: skip


BAZIL = Library(
    "bazil/fuse", built_using("rclone", "golang-bazil-fuse"), False,
    ("bazil execs fusermount (not fusermount3) and keeps the environment",
     "does not open /dev/fuse itself: it always runs fusermount",
     "no /dev/fd/N mountpoints: proxy mode only"),
)  # fmt: skip


@dataclass(frozen=True)
class Implementation:
    """One row: a FUSE program and how to run it.

    argv is the proxy-mode command line: "{mnt}" is the mountpoint (and
    becomes /dev/fd/N in starter mode), "{examples}" and "{fs}" are the
    container directories of libfuse's examples and of e2e/fs, and the rest
    comes from the setup's values.
    """

    name: str
    library: Library
    version: Probe
    argv: tuple[str, ...]
    setup: Setup
    writable: bool = True
    # False: proxy mode only even where the library would allow starter mode
    starter: bool = True
    notes: tuple[str, ...] = ()
    # host files that must exist ("{examples}" as in Probe); if one is
    # missing the row is not run, which fails the matrix unless optional
    requires: tuple[str, ...] = ()
    optional: bool = False
    why_missing: str = ""

    @property
    def modes(self) -> tuple[str, ...]:
        if self.starter and self.library.takes_dev_fd:
            return (PROXY, STARTER)
        return (PROXY,)

    def command(self, mode: str, values: dict[str, str]) -> list[str]:
        substitutions = {
            "mnt": STARTER_MOUNTPOINT if mode == STARTER else DATA,
            "examples": EXAMPLES,
            "fs": FS_SCRIPTS,
            **values,
        }
        argv = [arg.format(**substitutions) for arg in self.argv]
        return ["fusermount3", "--start", "--", *argv] if mode == STARTER else argv

    def missing(self, examples: Path) -> list[str]:
        paths = [p.replace("{examples}", str(examples)) for p in self.requires]
        return [p for p in paths if not os.path.exists(p)]


HELLO_TEXT = "Hello World!\n"
MEMFS_TEXT = "Hello from pyfuse3!\n"
RCLONE_ARGS = ("--config", "/dev/null", "--cache-dir", "/tmp/rclone", "--allow-non-empty",
               "--umask", "000", SOURCE, "{mnt}")  # fmt: skip

IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation(
        name="hello",
        library=LIBFUSE3,
        version=Probe(("{examples}/hello", "--version"), r"FUSE library version (\S+)"),
        argv=("{examples}/hello", "-f", "{mnt}"),
        setup=serves_nothing("hello", HELLO_TEXT),
        writable=False,
        notes=("libfuse's example, built from Debian's libfuse3-dev; read-only",),
        requires=("{examples}/hello",),
    ),
    Implementation(
        name="passthrough",
        library=LIBFUSE3,
        version=Probe(("{examples}/passthrough", "--version"), r"FUSE library version (\S+)"),
        argv=("{examples}/passthrough", "-f", "{mnt}"),
        setup=serves_source(SOURCE.lstrip("/") + "/"),
        notes=("libfuse's example: mirrors the container's whole filesystem",),
        requires=("{examples}/passthrough",),
    ),
    Implementation(
        name="passthrough_hp",
        library=LIBFUSE3,
        version=Probe(("{examples}/passthrough_hp", "--version"), r"FUSE library version (\S+)"),
        argv=("{examples}/passthrough_hp", "--foreground", SOURCE, "{mnt}"),
        setup=serves_source(),
        requires=("{examples}/passthrough_hp",),
        optional=True,
        why_missing="Debian 12's libfuse3-dev does not ship passthrough_hp.cc, so "
        "scripts/build_fuse_examples.sh has nothing to build",
    ),
    Implementation(
        name="sshfs",
        library=LIBFUSE3,
        version=Probe(("sshfs", "-V"), r"SSHFS version (\S+)"),
        argv=("sshfs", "-f", "-o", "ssh_command={ssh}", f"localhost:{SOURCE}", "{mnt}"),
        setup=serves_sftp,
        notes=("ssh_command runs a local sftp-server in the pod instead of ssh to a server",),
        requires=("/usr/bin/sshfs", SFTP_SERVER),
    ),
    Implementation(
        name="pyfuse3-memfs",
        library=LIBFUSE3,
        version=Probe(
            ("/usr/bin/python3", "-c", "import pyfuse3; print(pyfuse3.__version__)"),
            r"^(\S+)$",
            label="pyfuse3 {}",
        ),
        argv=("/usr/bin/python3", "{fs}/memfs.py", "{mnt}"),
        setup=serves_nothing("hello", MEMFS_TEXT),
        notes=(
            "e2e/fs/memfs.py, an in-memory filesystem on Debian's python3-pyfuse3 (libfuse3's "
            "low-level API), run by /usr/bin/python3 in the pod",
        ),
        requires=("/usr/bin/python3",),
    ),
    Implementation(
        name="s3fs",
        library=LIBFUSE2,
        version=Probe(("s3fs", "--version"), r"File System V(\S+)"),
        argv=(
            "s3fs",
            "{bucket}",
            OWN_MOUNTPOINT,
            "-f",
            "-o",
            "umask=0000,use_path_request_style,url={url},passwd_file={passwd}",
        ),
        setup=serves_s3_bucket,
        notes=(
            "against a local S3 server (moto) on 127.0.0.1",
            "s3fs refuses a mountpoint that its uid does not own unless it is mode 0777, and "
            "a volume's target is root's, mode 0755: give s3fs an empty directory of its own "
            "(the broker mounts on the volume whatever mountpoint the program names)",
            "objects that s3fs did not write have no mode: -o umask=0000 lets other uids in",
        ),
        requires=("/usr/bin/s3fs",),
    ),
    Implementation(
        name="bindfs",
        library=LIBFUSE2,
        version=Probe(("bindfs", "--version"), r"bindfs (\S+)"),
        argv=("bindfs", "-f", SOURCE, "{mnt}"),
        setup=serves_source(),
        requires=("/usr/bin/bindfs",),
    ),
    Implementation(
        name="gocryptfs",
        library=go_fuse("gocryptfs"),
        version=Probe(("gocryptfs", "-version"), r"gocryptfs (\S+);"),
        argv=("gocryptfs", "-fg", "-passfile", "/run/secrets/pass", "/run/cipher", "{mnt}"),
        setup=serves_gocryptfs,
        notes=(
            "the cipher directory must be writable by the pod's uid; the read check lists "
            "the new, empty plaintext root",
        ),
        requires=("/usr/bin/gocryptfs",),
    ),
    Implementation(
        name="rclone-mount2",
        library=go_fuse("rclone"),
        version=Probe(("rclone", "version"), r"rclone v(\S+)"),
        argv=("rclone", "mount2", *RCLONE_ARGS),
        setup=serves_source(),
        notes=(
            "rclone needs --allow-non-empty: a volume is always a mount point inside a container",
            "--umask 000 lets other uids write (rclone reports its own uid as the owner)",
        ),
        requires=("/usr/bin/rclone",),
    ),
    Implementation(
        name="rclone-mount",
        library=BAZIL,
        version=Probe(("rclone", "version"), r"rclone v(\S+)"),
        argv=("rclone", "mount", *RCLONE_ARGS),
        setup=serves_source(),
        notes=(
            "Debian's rclone 1.60 `mount` is built on bazil/fuse; --allow-non-empty and "
            "--umask 000 as for mount2",
        ),
        requires=("/usr/bin/rclone",),
    ),
)


# ---------------------------------------------------------------- results


@dataclass
class Result:
    """The outcome of one row in one mode."""

    name: str
    library: str  # name and version
    version: str
    mode: str
    status: str  # PASS, FAIL or NOT_RUN
    failed_check: str | None = None
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # check -> seconds
    details: dict[str, str] = field(default_factory=dict)  # check -> what was seen
    notes: list[str] = field(default_factory=list)
    optional: bool = False
    # who removed the mount of the SIGKILLed program (the kill check)
    killed_cleanup: str = ""

    @property
    def total(self) -> float:
        return sum(self.timings.values())

    @property
    def cell(self) -> str:
        """The result as the matrix shows it."""
        if self.status == FAIL:
            return f"FAIL at {self.failed_check}: {self.reason}"
        if self.status == NOT_RUN:
            return f"not run: {self.reason}"
        checks = [c for c in CHECKS if c in self.timings]
        return f"pass ({', '.join(checks)})"


# ---------------------------------------------------------------- running


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _ppid(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2 :].split()[1])


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return ""


def _tail(path: Path, limit: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-limit:]


class Run:
    """One row in one mode on the node: the checks, and everything to clean up."""

    def __init__(self, node: Node, impl: Implementation, mode: str, ws: Workspace) -> None:
        self.node = node
        self.impl = impl
        self.mode = mode
        self.ws = ws
        self.pod = Pod(f"{impl.name}-{mode}")
        self.volume: FuseVolume | None = None
        self.sandboxes: list[PodSandbox] = []
        self.served = Served()
        self.program: Container | None = None
        self.stderr = ws.path / "program.stderr"
        self.instance = 0
        self.killed_cleanup = ""

    # -------------------------------------------------------------- helpers

    def _sandbox(self, binds: dict[str, Path], **kwargs: Any) -> PodSandbox:
        sandbox = self.node.sandbox(binds, **kwargs)
        self.sandboxes.append(sandbox)
        return sandbox

    @property
    def target(self) -> Path:
        assert self.volume is not None
        return self.volume.target

    def _start_program(self) -> Container:
        assert self.volume is not None
        self.instance += 1
        self.stderr = self.ws.path / f"program-{self.instance}.stderr"
        sandbox = self._sandbox({**self.volume.binds(DATA), **self.served.binds})
        argv = self.impl.command(self.mode, self.served.values)
        with self.stderr.open("wb") as err:
            return sandbox.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err)  # fmt: skip

    def _wait_mounted(self, program: Container) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                mount = self.node.wait_mounted(self.target, timeout=0)
            except TimeoutError:
                pass
            else:
                return self._check_mount(mount.fstype, mount.mount_options, mount.super_options)
            if program.poll() is not None:
                raise CheckFailed(
                    f"exited {program.returncode} without mounting: {_tail(self.stderr)}"
                )
            if time.monotonic() > deadline:
                raise CheckFailed(f"not mounted within {TIMEOUT:.0f} s: {_tail(self.stderr)}")
            time.sleep(0.02)

    @staticmethod
    def _check_mount(fstype: str, options: Sequence[str], super_options: Sequence[str]) -> str:
        if not {"nosuid", "nodev"} <= set(options):
            raise CheckFailed(f"mounted without nosuid,nodev: {','.join(options)}")
        if f"user_id={NOBODY}" not in super_options:
            raise CheckFailed(f"not owned by the pod's uid: {','.join(super_options)}")
        return fstype

    def _as_reader(self, script: str, *args: str) -> str:
        """Run a shell script in another container of the pod, as READER_UID."""
        reader = self._sandbox({DATA: self.target}, uid=READER_UID, gid=READER_UID)
        try:
            done = reader.run(["sh", "-c", script, "sh", *args], capture_output=True,
                              timeout=TIMEOUT)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"uid {READER_UID} got no answer within {TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise CheckFailed(f"exit {done.returncode}: {err[-1] if err else ''}")
        out: str = done.stdout.decode(errors="replace")
        return out

    def _broker_events(self) -> list[str]:
        """What the driver logged about this volume: request ops and detaches."""
        events = []
        for entry in self.node.driver.log_entries():
            if str(self.target) not in json.dumps(entry, default=str):
                continue
            if "op" in entry:
                events.append(f"{entry['op']}:{entry.get('decision', '')}")
            elif "detached its dead mount" in str(entry.get("msg", "")):
                events.append("detached-dead")
        return events

    # -------------------------------------------------------------- checks

    def setup(self) -> None:
        self.volume = self.node.publish_fuse_volume(self.pod)
        self.served = self.impl.setup(self.ws)

    def mount(self) -> str:
        self.program = self._start_program()
        fstype = self._wait_mounted(self.program)
        return f"{fstype}, user_id={NOBODY}, nosuid,nodev"

    def read(self) -> str:
        served = self.served
        if served.read_text is None:
            listing = self._as_reader(f'ls -A "{DATA}/$1"', served.read_file).split()
            return f"uid {READER_UID} listed the root: {listing or 'empty'}"
        text = self._as_reader(f'cat "{DATA}/$1"', served.read_file)
        if text != served.read_text:
            raise CheckFailed(f"read {text!r}, expected {served.read_text!r}")
        return f"uid {READER_UID} read {served.read_file}"

    def write(self) -> str:
        path = self.served.write_dir + WRITTEN_FILE
        text = self._as_reader(f'printf %s "$1" > "{DATA}/$2" && cat "{DATA}/$2"',
                               WRITTEN_TEXT, path)  # fmt: skip
        if text != WRITTEN_TEXT:
            raise CheckFailed(f"read back {text!r}")
        if self.served.verify_write is not None:
            self.served.verify_write()
            return f"uid {READER_UID} wrote {WRITTEN_FILE}; it reached the backing store"
        return f"uid {READER_UID} wrote {WRITTEN_FILE} and read it back"

    def unmount(self) -> str:
        assert self.volume is not None and self.program is not None
        sandbox = self._sandbox(self.volume.binds(DATA))
        done = sandbox.run(["fusermount3", "-u", DATA], capture_output=True, timeout=TIMEOUT)
        if done.returncode != 0:
            raise CheckFailed(f"fusermount3 -u: {done.stderr.decode(errors='replace').strip()}")
        try:
            self.node.wait_unmounted(self.target, TIMEOUT)
        except TimeoutError:
            raise CheckFailed("still mounted after fusermount3 -u") from None
        try:
            status = self.program.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(
                f"unmounted, but the program still runs after {TIMEOUT:.0f} s"
            ) from None
        return f"fusermount3 -u; the program exited {status}"

    def kill(self) -> str:
        seen = len(self._broker_events())
        program = self._start_program()
        self._wait_mounted(program)
        # The mount appears before the broker hands its fd over; killing the
        # pod before that only tests the broker's failed-handoff path.
        self._wait_for_event(seen, {"mount:allowed"}, "the broker never handed the fd over")
        pid = self._program_pid(program)
        name = _comm(pid)
        os.kill(pid, signal.SIGKILL)
        try:
            self.node.wait_unmounted(self.target, TIMEOUT)
        except TimeoutError:
            raise CheckFailed(f"still mounted {TIMEOUT:.0f} s after SIGKILL of {name}") from None
        # Who did it (the log may trail the unmount a little).
        events = self._wait_for_event(seen, {"detached-dead", "unmount:allowed"}, "", 3.0)
        if "detached-dead" in events:
            self.killed_cleanup = "broker"
            by = "the broker saw the daemon exit and detached the dead mount"
        elif "unmount:allowed" in events:
            self.killed_cleanup = "starter" if self.mode == STARTER else "auto_unmount watcher"
            by = f"the {self.killed_cleanup} unmounted"
        else:
            self.killed_cleanup = "unknown"
            by = f"unmounted, by whom the broker's log does not say ({events})"
        return f"SIGKILL of {name}: {by}"

    def _wait_for_event(
        self, seen: int, wanted: set[str], failure: str, timeout: float = TIMEOUT
    ) -> list[str]:
        """Broker events for this volume after the first `seen`, once one is in `wanted`.

        On timeout: CheckFailed(failure), or the events so far if failure is "".
        """
        deadline = time.monotonic() + timeout
        while True:
            events = self._broker_events()[seen:]
            if wanted & set(events):
                return events
            if time.monotonic() > deadline:
                if failure:
                    raise CheckFailed(f"{failure} (broker events: {events})")
                return events
            time.sleep(0.02)

    def _program_pid(self, program: Container) -> int:
        """The FUSE program: the container's PID 1, or the starter's child once it runs."""
        init = program.init_pid()
        if init is None:
            raise CheckFailed(f"the program exited: {_tail(self.stderr)}")
        if self.mode != STARTER:
            return init
        # The starter forks, then execs the program: wait for the exec.
        argv0 = self.impl.command(PROXY, self.served.values)[0]
        deadline = time.monotonic() + TIMEOUT
        while True:
            for pid in program.processes():
                if _ppid(pid) == init and _argv0(pid) == argv0:
                    return pid
            if time.monotonic() > deadline:
                raise CheckFailed(f"the starter did not run {argv0}")
            time.sleep(0.02)

    def cleanup(self) -> None:
        errors: list[BaseException] = []
        for sandbox in self.sandboxes:
            try:
                sandbox.kill_all()
            except (OSError, TimeoutError, subprocess.SubprocessError) as err:
                errors.append(err)
        if self.volume is not None:
            for name in (self.volume.name, *self.volume.companion_volumes):
                try:
                    self.node.unpublish(self.pod, name)
                except Exception as err:
                    errors.append(err)
        if errors:
            raise errors[0]


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


Report = Callable[[str], None]


def run_implementation(
    node: Node, impl: Implementation, mode: str, services: Services, examples: Path,
    workdir: Path, report: Report,
) -> Result:  # fmt: skip
    notes = [*impl.notes]
    result = Result(
        impl.name, f"{impl.library.name} {impl.library.version(examples)}",
        impl.version(examples), mode, PASS, notes=notes, optional=impl.optional,
    )  # fmt: skip
    report(f"{impl.name} ({result.version}, {result.library}), {mode} mode")
    ws = Workspace(Path(tempfile.mkdtemp(prefix=f"{impl.name}-{mode}-", dir=workdir)), services)
    ws.path.chmod(0o755)
    run = Run(node, impl, mode, ws)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("mount", run.mount), ("read", run.read),
        *([("write", run.write)] if impl.writable else []),
        ("unmount", run.unmount), ("kill", run.kill),
    ]  # fmt: skip
    try:
        try:
            run.setup()
        except Exception as err:
            result.status, result.failed_check, result.reason = FAIL, "setup", _short(err)
            report(f"  {'setup':<8} FAIL  {result.reason}")
            return result
        for check, do in checks:
            started = time.monotonic()
            try:
                detail = do()
            except Exception as err:
                result.timings[check] = time.monotonic() - started
                result.status, result.failed_check, result.reason = FAIL, check, _short(err)
                report(f"  {check:<8} FAIL  {result.timings[check] * 1000:6.0f} ms  "
                       f"{result.reason}")  # fmt: skip
                return result
            result.timings[check] = time.monotonic() - started
            result.details[check] = detail
            result.killed_cleanup = run.killed_cleanup
            report(f"  {check:<8} ok    {result.timings[check] * 1000:6.0f} ms  {detail}")
        return result
    finally:
        try:
            run.cleanup()
        except Exception as err:
            if result.status == PASS:
                result.status, result.failed_check = FAIL, "cleanup"
                result.reason = _short(err)
            report(f"  cleanup  FAIL  {_short(err)}")
        shutil.rmtree(ws.path, ignore_errors=True)


def select(only: Sequence[str] | None = None) -> list[Implementation]:
    if not only:
        return list(IMPLEMENTATIONS)
    known = {impl.name: impl for impl in IMPLEMENTATIONS}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; the matrix has {sorted(known)}")
    return [known[name] for name in only]


def not_run(impl: Implementation, missing: Sequence[str], report: Report) -> Result:
    reason = impl.why_missing or f"missing {', '.join(missing)}"
    report(f"{impl.name} ({impl.library.name}): not run: {reason}")
    return Result(impl.name, impl.library.name, "-", "-", NOT_RUN, reason=reason,
                  notes=[*impl.notes], optional=impl.optional)  # fmt: skip


def run_matrix(
    zipapp: Path,
    examples: Path,
    *,
    only: Sequence[str] | None = None,
    report: Report = print,
) -> list[Result]:
    """Run the selected rows in each of their modes on one simulated node."""
    implementations = select(only)
    workdir = Path(tempfile.mkdtemp(prefix="csi-async-matrix-"))
    workdir.chmod(0o755)
    services = Services(workdir)
    results: list[Result] = []
    try:
        binds = {EXAMPLES: examples, FS_SCRIPTS: FS_SCRIPTS_ON_HOST}
        with Node(workdir, zipapp, shared_binds=binds) as node:
            for impl in implementations:
                missing = impl.missing(examples)
                if missing:
                    results.append(not_run(impl, missing, report))
                    continue
                for mode in impl.modes:
                    result = run_implementation(
                        node, impl, mode, services, examples, workdir, report
                    )
                    results.append(result)
    finally:
        services.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def ensure_examples(examples: Path) -> None:
    """Build libfuse's examples if they are not there yet (the script is idempotent)."""
    if not (examples / "hello").exists():
        subprocess.run(
            ["bash", str(REPO / "scripts" / "build_fuse_examples.sh"), str(examples)],
            check=True, capture_output=True,
        )  # fmt: skip


def failed(results: Sequence[Result]) -> list[Result]:
    """Results that make the matrix fail: failures, and required rows that did not run."""
    return [r for r in results if r.status == FAIL or (r.status == NOT_RUN and not r.optional)]


# ---------------------------------------------------------------- output


def machine() -> dict[str, str]:
    """What the matrix ran on."""
    os_name = platform.system()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.partition("=")[2].strip('"')
    with contextlib.suppress(OSError):
        os_name += f" ({Path('/etc/debian_version').read_text().strip()})"
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    return {
        "os": os_name,
        "kernel": f"Linux {platform.release()} {platform.machine()}",
        "cpus": str(os.cpu_count() or "?"),
        "memory": memory,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }


def to_json(results: Sequence[Result], command: str, elapsed: float) -> dict[str, Any]:
    return {
        "command": command,
        "machine": machine(),
        "elapsed_seconds": round(elapsed, 3),
        "libraries": {impl.library.name: list(impl.library.notes) for impl in IMPLEMENTATIONS},
        "results": [asdict(r) | {"total": r.total} for r in results],
    }


def summary(results: Sequence[Result], out: Report, elapsed: float) -> None:
    """The table printed at the end of a run, with timings in ms."""
    headers = ["filesystem", "mode", "version", "library", *CHECKS, "total", "result"]
    rows = []
    for r in results:
        times = [f"{r.timings[c] * 1000:.0f}" if c in r.timings else "-" for c in CHECKS]
        outcome = r.status if r.status != FAIL else f"FAIL at {r.failed_check}"
        rows.append([r.name, r.mode, r.version, r.library, *times, f"{r.total * 1000:.0f}",
                     outcome])  # fmt: skip
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    numeric = {headers.index(c) for c in (*CHECKS, "total")}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out("\nSummary (times in ms)")
    out("  " + line(headers))
    for row in rows:
        out("  " + line(row))
    passed = sum(r.status == PASS for r in results)
    skipped = sum(r.status == NOT_RUN for r in results)
    out(f"\n  {passed} of {len(results)} passed, {len(failed(results))} failed, "
        f"{skipped} not run, in {elapsed:.1f} s")  # fmt: skip


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


MARKDOWN_TITLE = "# FUSE compatibility matrix"
RESULTS_HEADING = "## Results"
RESULTS_HEADER = (
    "| Filesystem | Version | FUSE library | Mode | Result | Mount removed after SIGKILL by "
    "| Notes |"
)


def to_markdown(results: Sequence[Result], command: str, elapsed: float) -> str:
    info = machine()
    libraries: dict[str, tuple[str, ...]] = {}
    for impl in IMPLEMENTATIONS:
        libraries.setdefault(impl.library.name, impl.library.notes)
    ran = [r for r in results if r.status != NOT_RUN]
    not_run = [r for r in results if r.status == NOT_RUN]
    lines = [
        "<!-- GENERATED FILE: do not edit by hand. Regenerate it with the command below;",
        "     tests/test_matrix.py fails when it no longer matches e2e/matrix.py. -->",
        MARKDOWN_TITLE,
        "",
        f"Generated by `{command}` on {info['date']}, on {info['os']}, {info['kernel']}, "
        f"{info['cpus']} CPUs, {info['memory']} of memory, Python {info['python']}; the "
        f"whole run took {elapsed:.0f} s. The rows are declared in `e2e/matrix.py`.",
        "",
        "Each program runs unmodified, as uid 65534 with no capabilities, in a sandboxed "
        '"pod" of a simulated node whose `/usr/bin/fusermount3` (and `fusermount`) is the '
        "csi-async zipapp, in native mode (the broker socket at the zipapp's default path). "
        "**proxy** mode runs the program as usual; **starter** mode runs "
        "`fusermount3 --start -- PROGRAM ... /dev/fd/N`. The checks, in order:",
        "",
        "- **mount**: the program mounts the volume (through the broker, `nosuid,nodev`, "
        "owned by uid 65534);",
        f"- **read**: a second container of the pod, as uid {READER_UID}, reads a known file "
        "through mount propagation;",
        "- **write** (writable filesystems): that container writes a file, reads it back, "
        "and the file reaches the backing store (directory, bucket, cipher directory);",
        "- **unmount**: `fusermount3 -u` in the pod removes the mount and the program exits;",
        "- **kill**: a fresh instance is killed with SIGKILL and its mount goes away anyway: "
        "the broker watches the daemon's process and detaches its dead mount; in starter "
        "mode the starter, which outlives the program, unmounts first; with `auto_unmount` "
        "the zipapp's watcher would.",
        "",
        RESULTS_HEADING,
        "",
        RESULTS_HEADER,
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ran:
        lines.append(
            f"| {_cell(r.name)} | {_cell(r.version)} | {_cell(r.library)} | {r.mode} | "
            f"{_cell(r.cell)} | {r.killed_cleanup or '-'} | {_cell('; '.join(r.notes))} |"
        )
    lines += ["", "## Notes by FUSE library", ""]
    for name, notes in libraries.items():
        lines.append(f"- **{name}**: {'; '.join(notes)}.")
    if not_run:
        lines += ["", "## Not run here", ""]
        for r in not_run:
            lines.append(f"- **{r.name}** ({r.library.split()[0]}): {r.reason}.")
    lines += ["", "## Timings (ms)", "", f"| Filesystem | Mode | {' | '.join(CHECKS)} | total |",
              "| --- | --- |" + " ---: |" * (len(CHECKS) + 1)]  # fmt: skip
    for r in ran:
        times = [f"{r.timings[c] * 1000:.0f}" if c in r.timings else "-" for c in CHECKS]
        lines.append(f"| {r.name} | {r.mode} | {' | '.join(times)} | {r.total * 1000:.0f} |")
    return "\n".join(lines) + "\n"


def comparable(markdown: str) -> list[tuple[str, ...]]:
    """What must match between the committed document and a fresh run.

    The rows, modes, library names, results and notes, and the library and
    not-run sections; not the versions, the timings or the machine.
    """
    facts: list[tuple[str, ...]] = []
    section = ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line
            continue
        if section == RESULTS_HEADING and line.startswith("| ") and line != RESULTS_HEADER:
            if line.startswith("| ---"):
                continue
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            name, _version, library, mode, result, killed, notes = cells
            facts.append(("row", name, library.split()[0], mode, result, killed, notes))
        elif section in ("## Notes by FUSE library", "## Not run here") and line.startswith("- "):
            facts.append((section, line))
    return facts


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "e2e", "matrix", *argv])


def main(
    zipapp: Path,
    examples: Path,
    *,
    only: Sequence[str] | None = None,
    json_path: Path | None = None,
    markdown_path: Path | None = None,
    argv: Sequence[str] = (),
    out: Report = print,
) -> int:
    """The `python -m e2e matrix` command: progress, summary, outputs; 1 if a row failed."""
    if markdown_path is not None and only:
        out("--markdown writes the whole matrix: leave out --only")
        return 2
    ensure_examples(examples)
    out("csi-async compatibility matrix: real FUSE programs in unprivileged pods, "
        "through the fd broker.\n")  # fmt: skip
    started = time.monotonic()
    results = run_matrix(zipapp, examples, only=only, report=out)
    elapsed = time.monotonic() - started
    summary(results, out, elapsed)
    command = command_line(argv)
    if json_path is not None:
        json_path.write_text(json.dumps(to_json(results, command, elapsed), indent=2) + "\n")
        out(f"  wrote {json_path}")
    if markdown_path is not None:
        markdown_path.write_text(to_markdown(results, command, elapsed))
        out(f"  wrote {markdown_path}")
    return 1 if failed(results) else 0
