"""Every FUSE program of the matrix: one `Implementation` per row, declared as data.

A row names its FUSE library (with what a pod author must know about every
program built on it), how to learn the program's version, what it serves (a
setup from setups.py that prepares files or asks services.py for a server), its
proxy-mode command line (starter mode is derived from it), whether it takes
writes, and what a pod author must know about it. Adding a program is adding
an entry to IMPLEMENTATIONS, and a library here or a setup in setups.py if
no existing one fits; runner.py runs it in each mode it supports and
report.py renders it.

CANNOT_WORK lists programs that cannot mount through csi-async, each with
the reason; the matrix runs them too and checks that they never reach the
broker, and docs/compatibility.md lists them with their reasons.
"""

from __future__ import annotations

from collections.abc import Sequence

from e2e.matrix.row import OWN_MOUNTPOINT, SOURCE, CannotWork, Implementation, Library
from e2e.matrix.setups import (
    LOWER,
    OVERLAY_DIRS,
    OVERLAY_IDS,
    SFTP_SERVER,
    UPPER,
    serves_archive,
    serves_gocryptfs,
    serves_layers,
    serves_nothing,
    serves_ntfs_image,
    serves_s3_bucket,
    serves_sftp,
    serves_source,
    serves_source_owned_by_the_writer,
    squashfs_image,
    tar_archive,
    tar_member,
    zip_archive,
    zip_member,
)
from e2e.matrix.versions import Probe, built_using, debian_upstream_version, dpkg_version

# ---------------------------------------------------------------- FUSE libraries


LIBFUSE3 = Library(
    "libfuse3", dpkg_version("libfuse3-3"), True,
    ("in proxy mode libfuse opens /dev/fuse before it runs fusermount3, and gives up if it "
     "cannot: the container needs an openable /dev/fuse, which the device plugin gives it "
     "(here: the device node its Allocate returns); starter mode needs neither /dev/fuse "
     "nor a fusermount3 exec",
     "libfuse >= 3.3 takes /dev/fd/N as the mountpoint: starter mode works"),
    without_device_plugin=(
        "starter mode (`fusermount3 --start -- PROGRAM ... /dev/fd/N`), or `-o auto_unmount` "
        "(libfuse then runs the helper without opening /dev/fuse), or an openable dummy "
        "/dev/fuse"),
)  # fmt: skip
LIBFUSE2 = Library(
    "libfuse2", dpkg_version("libfuse2"), False,
    ("libfuse2 execs fusermount, not fusermount3: install the zipapp under both names",
     "like libfuse3 it opens /dev/fuse first and gives up if it cannot: the container "
     "needs an openable /dev/fuse (the device plugin's)",
     "auto_unmount goes inside -o (not --auto-unmount)",
     "no /dev/fd/N mountpoints: proxy mode only"),
    without_device_plugin=(
        "`-o auto_unmount` inside -o (libfuse then runs fusermount without opening /dev/fuse), "
        "or an openable dummy /dev/fuse; no starter mode"),
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


MERGERFS_LIBFUSE = Library(
    "mergerfs's libfuse", dpkg_version("mergerfs"), False,
    ("mergerfs links its own fork of libfuse2 statically, which runs mergerfs-fusermount "
     "(from /usr/local/bin, then PATH) before fusermount: install the zipapp under that "
     "name too, or the host's real helper answers and refuses",
     "given /dev/fd/N it leaves the starter's mount unserved: proxy mode only"),
    without_device_plugin=(
        "an openable dummy /dev/fuse, as for libfuse2 (its fork is libfuse 2.9.7's code; "
        "not run here without the device plugin)"),
)  # fmt: skip
JACOBSA = Library(
    "jacobsa/fuse", debian_upstream_version("golang-github-jacobsa-fuse-dev"), False,
    ("jacobsa/fuse execs fusermount from PATH and keeps the environment; it always "
     "passes default_permissions and does not open /dev/fuse itself",
     "Debian 12 ships a 2015 snapshot (golang-github-jacobsa-fuse-dev), which takes no "
     "/dev/fd/N mountpoint: proxy mode only; gcsfuse and goofys build on later versions"),
)  # fmt: skip
BAZIL = Library(
    "bazil/fuse", built_using("rclone", "golang-bazil-fuse"), False,
    ("bazil execs fusermount (not fusermount3) and keeps the environment",
     "does not open /dev/fuse itself: it always runs fusermount",
     "no /dev/fd/N mountpoints: proxy mode only"),
)  # fmt: skip


# ---------------------------------------------------------------- the rows


HELLO_TEXT = "Hello World!\n"
MEMFS_TEXT = "Hello from pyfuse3!\n"
JACOBSA_TEXT = "Hello from jacobsa/fuse!\n"
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
    Implementation(
        name="mergerfs",
        library=MERGERFS_LIBFUSE,
        version=Probe(("mergerfs", "--version"), r"mergerfs version: (\S+)"),
        argv=("mergerfs", "-f", SOURCE, "{mnt}"),
        setup=serves_source(),
        requires=("/usr/bin/mergerfs",),
    ),
    Implementation(
        name="fuse-zip",
        library=LIBFUSE2,
        version=Probe(("fuse-zip", "--version"), r"fuse-zip version: (\S+)"),
        argv=("fuse-zip", "-f", "{archive}", "{mnt}"),
        setup=serves_archive("data.zip", zip_archive, zip_member),
        notes=(
            "fuse-zip saves the changes into the archive when it unmounts (here the archive "
            "and its directory belong to the pod's uid), and the unmount check finds the "
            "written file there",
        ),
        requires=("/usr/bin/fuse-zip",),
    ),
    Implementation(
        name="fuse-posixovl",
        library=LIBFUSE2,
        version=dpkg_version("fuse-posixovl"),
        argv=("mount.posixovl", "-S", SOURCE, "{mnt}", "--", "-f"),
        setup=serves_source_owned_by_the_writer,
        notes=(
            "Debian installs it as /sbin/mount.posixovl; libfuse's options, -f (foreground) "
            "included, go after --",
            "it asks for default_permissions itself and shows a directory that has no "
            "permission record as mode 0755 of the real directory's owner: only that uid "
            "may create files in it, so here the writer owns the source directory",
        ),
        requires=("/sbin/mount.posixovl",),
    ),
    Implementation(
        name="squashfuse",
        library=LIBFUSE3,
        version=dpkg_version("squashfuse"),
        argv=("squashfuse", "-f", "{archive}", "{mnt}"),
        setup=serves_archive("data.squashfs", squashfs_image),
        writable=False,
        notes=("a squashfs image made by mksquashfs; read-only",),
        requires=("/usr/bin/squashfuse", "/usr/bin/mksquashfs"),
    ),
    Implementation(
        name="fuse-overlayfs",
        library=LIBFUSE3,
        version=Probe(("fuse-overlayfs", "--version"), r"fuse-overlayfs: version (\S+)"),
        argv=("fuse-overlayfs", "-f", "-o", f"{OVERLAY_DIRS},{OVERLAY_IDS}", "{mnt}"),
        setup=serves_layers,
        notes=(
            "the upper and work directories must belong to the pod's uid",
            "it gives each new file to the uid that creates it, which only root may do: "
            "uidmapping and gidmapping map the writer's uid (1000) to the daemon's",
        ),
        requires=("/usr/bin/fuse-overlayfs",),
    ),
    Implementation(
        name="unionfs-fuse",
        library=LIBFUSE2,
        version=dpkg_version("unionfs-fuse"),
        argv=("unionfs", "-f", "-o", "cow", f"{UPPER}=RW:{LOWER}=RO", "{mnt}"),
        setup=serves_layers,
        notes=("-o cow: writes go to the RW branch, the RO branch stays as it was",),
        requires=("/usr/bin/unionfs",),
    ),
    Implementation(
        name="archivemount",
        library=LIBFUSE2,
        version=Probe(("archivemount", "--version"), r"archivemount version (\S+)"),
        argv=("archivemount", "-f", "{archive}", "{mnt}"),
        setup=serves_archive("data.tar", tar_archive, tar_member),
        notes=(
            "archivemount saves the changes into the archive when it unmounts (here the "
            "archive and its directory belong to the pod's uid), and the unmount check finds "
            "the written file there",
        ),
        requires=("/usr/bin/archivemount",),
    ),
    Implementation(
        name="jacobsa-flatfs",
        library=JACOBSA,
        version=debian_upstream_version("golang-github-jacobsa-fuse-dev"),
        argv=("{examples}/jacobsa-flatfs", "{mnt}"),
        setup=serves_nothing("hello", JACOBSA_TEXT),
        notes=(
            "e2e/fs/jacobsa_flatfs, a small in-memory file system, built by "
            "scripts/build_fuse_examples.sh against Debian's Go source of the library; that "
            "2015 source no longer links with Go 1.19 as it is, so two runtime calls are "
            "swapped for equivalents (e2e/fs/jacobsa_flatfs/buffer_shim)",
        ),
        requires=("{examples}/jacobsa-flatfs",),
    ),
)


# ---------------------------------------------------------------- programs that cannot work


NTFS_3G_REASON = (
    'it links its own libfuse (libfuse-lite, "integrated FUSE"), which mounts with mount(2) '
    "in-process and never runs a fusermount helper, so the zipapp is never asked; mount(2) "
    "needs root, which ntfs-3g gets only as a setuid-root binary, and a pod's "
    "allowPrivilegeEscalation: false (no_new_privs) turns setuid off"
)

CANNOT_WORK: tuple[CannotWork, ...] = (
    CannotWork(
        name="ntfs-3g",
        version=Probe(("ntfs-3g", "--version"), r"ntfs-3g (\S+)"),
        argv=("ntfs-3g", "{image}", OWN_MOUNTPOINT),
        setup=serves_ntfs_image,
        reason=NTFS_3G_REASON,
        requires=("/usr/bin/ntfs-3g", "/usr/sbin/mkntfs"),
    ),
    CannotWork(
        name="lowntfs-3g",
        version=Probe(("lowntfs-3g", "--version"), r"lowntfs-3g (\S+)"),
        argv=("lowntfs-3g", "{image}", OWN_MOUNTPOINT),
        setup=serves_ntfs_image,
        reason="ntfs-3g's low-level variant mounts through the same libfuse-lite code, and "
        "Debian does not even install it setuid: " + NTFS_3G_REASON,
        requires=("/usr/bin/lowntfs-3g", "/usr/sbin/mkntfs"),
    ),
)


def row_names() -> list[str]:
    """Every name --only takes: the rows, then the programs that cannot work."""
    return [impl.name for impl in IMPLEMENTATIONS] + [item.name for item in CANNOT_WORK]


def _check_names(only: Sequence[str]) -> None:
    unknown = [name for name in only if name not in row_names()]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; the matrix has {sorted(row_names())}")


def select(only: Sequence[str] | None = None) -> list[Implementation]:
    if not only:
        return list(IMPLEMENTATIONS)
    _check_names(only)
    return [impl for impl in IMPLEMENTATIONS if impl.name in only]


def select_cannot_work(only: Sequence[str] | None = None) -> list[CannotWork]:
    if not only:
        return list(CANNOT_WORK)
    _check_names(only)
    return [item for item in CANNOT_WORK if item.name in only]
