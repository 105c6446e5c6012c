"""What a row's program serves: the setups of catalogue.py, and the files they make.

A setup takes the row's fresh Workspace and returns what it Served: host
directories to bind into the program's container, values for its argv, the
file the read check reads, and how to check that a write reached the backing
store (a directory, a bucket, a cipher directory, an archive). A program
that serves something new gets a setup here.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from e2e.matrix.result import CheckFailed
from e2e.matrix.row import (
    KNOWN_FILE,
    KNOWN_TEXT,
    OWN_MOUNTPOINT,
    READER_UID,
    SOURCE,
    WRITTEN_FILE,
    WRITTEN_TEXT,
    Served,
    Setup,
    Workspace,
)
from e2e.programs import init_gocryptfs
from e2e.sandbox import NOBODY


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


def serves_source_owned_by_the_writer(ws: Workspace) -> Served:
    """serves_source, but the directory belongs to the uid that writes through the mount."""
    served = serves_source()(ws)
    os.chown(served.binds[SOURCE], READER_UID, READER_UID)
    return served


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


ARCHIVES = "/run/archives"


def _owned_by_the_pod(path: Path) -> None:
    os.chown(path, NOBODY, NOBODY)


Member = Callable[[Path, str], bytes]  # reads a member of an archive


def serves_archive(
    name: str, write: Callable[[Path, Path], None], member: Member | None = None
) -> Setup:
    """An archive holding KNOWN_FILE at ARCHIVES/name, which the program may rewrite.

    write(source, archive) builds it from a source directory. Programs that
    take writes (fuse-zip, archivemount) save them into the archive when
    they unmount: with member(archive, name), the unmount check then reads
    WRITTEN_FILE out of the archive.
    """

    def setup(ws: Workspace) -> Served:
        source = _source(ws)
        archives = ws.shared_dir("archives")
        _owned_by_the_pod(archives)
        archive = archives / name
        write(source, archive)
        _owned_by_the_pod(archive)

        def verify() -> None:
            assert member is not None
            try:
                text = member(archive, WRITTEN_FILE).decode(errors="replace")
            except (OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as err:
                raise CheckFailed(f"the written file is not in the archive: {err}") from None
            if text != WRITTEN_TEXT:
                raise CheckFailed(f"the archive holds {text!r}")

        return Served(
            binds={ARCHIVES: archives},
            values={"archive": f"{ARCHIVES}/{name}"},
            verify_after_unmount=verify if member is not None else None,
        )

    return setup


def zip_archive(source: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(source / KNOWN_FILE, KNOWN_FILE)


def zip_member(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as zf:
        return zf.read(name)


def tar_archive(source: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tf:
        tf.add(source / KNOWN_FILE, KNOWN_FILE)


def tar_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tf:
        member = tf.extractfile(name)
        if member is None:
            raise KeyError(f"{name} is not a regular file in the archive")
        return member.read()


def squashfs_image(source: Path, archive: Path) -> None:
    subprocess.run(
        ["mksquashfs", str(source), str(archive), "-quiet", "-noappend", "-all-root"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


UPPER, LOWER, WORK = "/run/upper", "/run/lower", "/run/work"
OVERLAY_DIRS = f"lowerdir={LOWER},upperdir={UPPER},workdir={WORK}"
# fuse-overlayfs chowns each new file to the uid that created it, which only
# root may do: map the writer's uid to the daemon's.
OVERLAY_IDS = f"uidmapping={READER_UID}:{NOBODY}:1,gidmapping={READER_UID}:{NOBODY}:1"


def serves_layers(ws: Workspace) -> Served:
    """A read-only lower directory with KNOWN_FILE, and an empty upper one the pod owns.

    Writes land in the upper directory (copy-on-write); the lower one stays
    as it was. WORK is an empty directory for fuse-overlayfs.
    """
    lower = _source(ws)
    lower.chmod(0o755)
    # The mount's root shows the upper directory's mode: 0777 lets other uids write.
    upper = ws.shared_dir("upper")
    work = ws.shared_dir("work", 0o700)
    for path in (upper, work):
        _owned_by_the_pod(path)
    verify_upper = _expect_file(upper / WRITTEN_FILE)

    def verify() -> None:
        verify_upper()
        if (lower / WRITTEN_FILE).exists():
            raise CheckFailed("the write reached the read-only lower directory")

    return Served(binds={LOWER: lower, UPPER: upper, WORK: work}, verify_write=verify)


def serves_ntfs_image(ws: Workspace) -> Served:
    """A small, empty NTFS image made by mkntfs, writable by the pod's uid."""
    images = ws.shared_dir("images")
    image = images / "ntfs.img"
    with image.open("wb") as out:
        out.truncate(8 * 1024 * 1024)
    subprocess.run(["mkntfs", "-F", "-q", "-f", str(image)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    _owned_by_the_pod(image)
    # A mountpoint of its own, so that its helper gets past the write-access
    # check on a volume's root-owned target and on to mount(2).
    mountpoint = ws.shared_dir("own-mnt", 0o755)
    _owned_by_the_pod(mountpoint)
    return Served(
        binds={"/run/images": images, OWN_MOUNTPOINT: mountpoint},
        values={"image": "/run/images/ntfs.img"},
    )
