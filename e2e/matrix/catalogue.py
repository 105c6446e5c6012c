"""Every FUSE program of the matrix: one `Implementation` per row, declared as data.

A row names its FUSE library (with what a pod author must know about every
program built on it), how to learn the program's version, what it serves (a
setup that prepares directories or asks services.py for a server), its
proxy-mode command line (starter mode is derived from it), whether it takes
writes, and what a pod author must know about it. Adding a program is adding
an entry to IMPLEMENTATIONS, and a setup or a library here if no existing one
fits; runner.py runs it in each mode it supports and report.py renders it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from e2e.matrix.result import CheckFailed
from e2e.matrix.row import (
    KNOWN_FILE,
    KNOWN_TEXT,
    OWN_MOUNTPOINT,
    SOURCE,
    WRITTEN_FILE,
    WRITTEN_TEXT,
    Implementation,
    Library,
    Served,
    Setup,
    Workspace,
)
from e2e.matrix.versions import Probe, built_using, dpkg_version
from e2e.programs import init_gocryptfs
from e2e.sandbox import NOBODY

# ---------------------------------------------------------------- FUSE libraries


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


# ---------------------------------------------------------------- what a program serves


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


# ---------------------------------------------------------------- the rows


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


def select(only: Sequence[str] | None = None) -> list[Implementation]:
    if not only:
        return list(IMPLEMENTATIONS)
    known = {impl.name: impl for impl in IMPLEMENTATIONS}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; the matrix has {sorted(known)}")
    return [known[name] for name in only]
