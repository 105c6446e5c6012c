"""Real FUSE programs of every library family mount unmodified through the zipapp.

Each test runs a program exactly as Debian ships it, as uid 65534 with no
capabilities in a sandboxed "pod" whose /usr/bin/fusermount3 (and so
/usr/bin/fusermount, a symlink to it) is our zipapp:

* sshfs 3.7.3 (libfuse3: execs fusermount3, keeps the environment);
* bindfs 1.14.7 (libfuse2: execs /bin/fusermount, auto_unmount inside -o);
* gocryptfs 2.3 (go-fuse: execs fusermount3 with nothing in the environment
  but _FUSE_COMMFD);
* rclone 1.60 `mount` (bazil: execs fusermount) and `mount2` (go-fuse).

Another container, of another uid, reads and writes through each mount, and
each mount goes away cleanly: through fusermount3 -u, the program's own
unmount on SIGTERM, or auto_unmount after the program is killed.

bindfs (libfuse2) and gocryptfs list the mountpoint before mounting ("is it
empty?"), so these tests also prove that the pod can read the kubelet target
the driver creates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from csi_async.mount.mountinfo import MountEntry
from e2e.kubelet import Pod
from e2e.node import FuseVolume, Node
from e2e.programs import init_gocryptfs
from e2e.sandbox import NOBODY, Container, PodSandbox

DATA = "/run/data"
SOURCE = "/run/src"
SSH = "/run/bin/ssh"
KNOWN_TEXT = "served from the host\n"
OTHER_UID = 1000


def start(sandbox: PodSandbox, argv: list[str], **popen_kwargs: Any) -> Container:
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    return sandbox.spawn(argv, stderr=subprocess.PIPE, **popen_kwargs)


def assert_unprivileged_fuse(mount: MountEntry, fstype: str) -> None:
    assert mount.fstype == fstype
    assert {"nosuid", "nodev"} <= set(mount.mount_options)
    assert f"user_id={NOBODY}" in mount.super_options


def as_other_uid(node: Node, volume: FuseVolume, script: str) -> str:
    """Run a shell script in a separate container, as another uid, with the volume at DATA."""
    other = node.sandbox({DATA: volume.target}, uid=OTHER_UID, gid=OTHER_UID)
    result = other.run(["sh", "-c", script], capture_output=True, timeout=15)
    assert result.returncode == 0, result.stderr
    stdout: bytes = result.stdout  # captured without text=True
    return stdout.decode()


def reads_and_writes_through_the_mount(node: Node, volume: FuseVolume, source: Path) -> None:
    """Another uid reads source's known file through the mount, and writes one into source."""
    assert as_other_uid(node, volume, f"cat {DATA}/known.txt") == KNOWN_TEXT
    as_other_uid(node, volume, f"echo written > {DATA}/new.txt")
    assert (source / "new.txt").read_text() == "written\n"


def unmount_with_fusermount3(sandbox: PodSandbox, volume: FuseVolume, node: Node) -> None:
    result = sandbox.run(["fusermount3", "-u", DATA], capture_output=True, timeout=15)
    assert result.returncode == 0, result.stderr
    node.wait_unmounted(volume.target)


def broker_requests(node: Node) -> list[tuple[object, object]]:
    """(op, decision) of every request the broker answered, oldest first."""
    return [
        (entry.get("op"), entry.get("decision"))
        for entry in node.driver.log_entries()
        if entry.get("logger") == "csi_async.audit" and "op" in entry
    ]


def wait_until_gone(container: Container, names: set[str], timeout: float = 15) -> None:
    """Wait until no process of the container has one of these names."""
    deadline = time.monotonic() + timeout
    while left := [pid for pid in container.processes() if _comm(pid) in names]:
        assert time.monotonic() < deadline, f"still running: {[_comm(p) for p in left]}"
        time.sleep(0.05)


def shared_dir(path: Path, mode: int = 0o777) -> Path:
    """A host directory for binding into sandboxes, usable by uid 65534 and OTHER_UID."""
    path.mkdir()
    path.chmod(mode)
    return path


def source_dir(tmp_path: Path) -> Path:
    """A world-writable directory holding one world-readable known.txt."""
    source = shared_dir(tmp_path / "src")
    (source / "known.txt").write_text(KNOWN_TEXT)
    (source / "known.txt").chmod(0o644)
    return source


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- sshfs (libfuse3)


def sftp_sandbox(node: Node, volume: FuseVolume, tmp_path: Path, source: Path) -> PodSandbox:
    """A pod with the volume at DATA, source at SOURCE, and SSH: an ssh stand-in.

    SSH ignores the ssh arguments sshfs passes and runs a local sftp-server
    in SOURCE, inside the pod, so it dies with the pod.
    """
    bin_dir = shared_dir(tmp_path / "bin", 0o755)
    script = bin_dir / "ssh"
    script.write_text(f"#!/bin/sh\ncd {SOURCE} && exec /usr/lib/openssh/sftp-server\n")
    script.chmod(0o755)
    return node.sandbox({**volume.binds(DATA), SOURCE: source, os.path.dirname(SSH): bin_dir})


def test_sshfs_serves_a_directory_that_another_uid_reads_and_writes(
    node: Node, tmp_path: Path
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = sftp_sandbox(node, volume, tmp_path, source)
    sshfs = start(sandbox, ["sshfs", "-f", "-o", f"ssh_command={SSH}", f"localhost:{SOURCE}", DATA])
    mount = node.wait_mounted_by(sshfs, volume.target)

    assert_unprivileged_fuse(mount, "fuse.sshfs")
    assert mount.source == f"localhost:{SOURCE}"
    reads_and_writes_through_the_mount(node, volume, source)

    unmount_with_fusermount3(sandbox, volume, node)
    assert sshfs.wait(15) == 0


def test_sshfs_with_auto_unmount_is_unmounted_by_fusermount3_and_its_watcher_exits(
    node: Node, tmp_path: Path
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = sftp_sandbox(node, volume, tmp_path, source)
    # A shell is PID 1, so the watcher (our fusermount3, sshfs's child) must
    # exit by itself: it does not die with sshfs, and the shell outlives both.
    container = start(
        sandbox,
        ["sh", "-c", f"sshfs -f -o auto_unmount,ssh_command={SSH} localhost:{SOURCE} {DATA}; "
                     "echo $?; exec sleep 600"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    mount = node.wait_mounted_by(container, volume.target)
    assert_unprivileged_fuse(mount, "fuse.sshfs")
    assert "fusermount3" in {_comm(pid) for pid in container.processes()}  # the watcher
    assert as_other_uid(node, volume, f"cat {DATA}/known.txt") == KNOWN_TEXT

    unmount_with_fusermount3(sandbox, volume, node)
    assert container.stdout is not None  # spawned with stdout=PIPE
    assert container.stdout.readline() == b"0\n"  # sshfs's exit status
    wait_until_gone(container, {"sshfs", "sftp-server", "fusermount3"})


# ---------------------------------------------------------------- bindfs (libfuse2)


def test_bindfs_through_libfuse2s_fusermount_reads_and_writes_the_source(
    node: Node, tmp_path: Path
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox({**volume.binds(DATA), SOURCE: source})
    # libfuse2 execs /bin/fusermount (argv[0] "fusermount").
    bindfs = start(sandbox, ["bindfs", "-f", SOURCE, DATA])
    mount = node.wait_mounted_by(bindfs, volume.target)

    assert_unprivileged_fuse(mount, "fuse")  # libfuse2 sends no subtype to fusermount
    assert mount.source == SOURCE
    reads_and_writes_through_the_mount(node, volume, source)

    unmount_with_fusermount3(sandbox, volume, node)
    assert bindfs.wait(15) == 0


def test_bindfs_with_auto_unmount_in_its_options_is_cleaned_up_after_it_is_killed(
    node: Node, tmp_path: Path
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox({**volume.binds(DATA), SOURCE: source})
    # libfuse2 passes auto_unmount inside -o, not as --auto-unmount. A shell
    # is PID 1, so the watcher outlives bindfs as it would in a pod.
    container = start(sandbox, ["sh", "-c", f"bindfs -f -o auto_unmount {SOURCE} {DATA} & "
                                            "exec sleep 600"])  # fmt: skip
    node.wait_mounted_by(container, volume.target)
    assert as_other_uid(node, volume, f"cat {DATA}/known.txt") == KNOWN_TEXT
    processes = {pid: _comm(pid) for pid in container.processes()}
    assert "fusermount" in processes.values()  # the watcher, under the name libfuse2 ran
    bindfs = [pid for pid, name in processes.items() if name == "bindfs"]
    assert len(bindfs) == 1

    # Either the broker (watching bindfs's process) or the watcher detaches
    # the mount first; the other then finds nothing left to unmount.
    os.kill(bindfs[0], signal.SIGKILL)
    node.wait_unmounted(volume.target)
    wait_until_gone(container, {"bindfs", "fusermount"})


# ---------------------------------------------------------------- gocryptfs (go-fuse)


def test_gocryptfs_mounts_through_the_default_socket_with_an_empty_environment_and_encrypts(
    node: Node, tmp_path: Path
) -> None:
    secrets = shared_dir(tmp_path / "secrets", 0o755)
    (secrets / "pass").write_text("correct horse battery staple\n")
    (secrets / "pass").chmod(0o644)
    cipher = tmp_path / "cipher"
    init_gocryptfs(cipher, secrets / "pass")
    volume = node.publish_fuse_volume(Pod("app"))
    # go-fuse runs fusermount3 with only _FUSE_COMMFD in its environment, so
    # the zipapp finds the broker at its default /run/csi-async/fuse.sock.
    sandbox = node.sandbox({**volume.binds(DATA), "/run/cipher": cipher, "/run/secrets": secrets})
    gocryptfs = start(sandbox, ["gocryptfs", "-fg", "-passfile", "/run/secrets/pass",
                                "/run/cipher", DATA])  # fmt: skip
    mount = node.wait_mounted_by(gocryptfs, volume.target)

    assert_unprivileged_fuse(mount, "fuse.gocryptfs")
    as_other_uid(node, volume, f"echo secret > {DATA}/plain.txt")
    encrypted = [p for p in cipher.iterdir() if not p.name.startswith("gocryptfs.")]
    assert len(encrypted) == 1
    assert "plain" not in encrypted[0].name
    assert b"secret" not in encrypted[0].read_bytes()
    assert as_other_uid(node, volume, f"cat {DATA}/plain.txt") == "secret\n"

    # Like kubelet stopping the container: gocryptfs unmounts through
    # fusermount3 -u, then exits 15 from its signal handler or 0 from main,
    # whichever of its goroutines gets there first.
    gocryptfs.send_signal(signal.SIGTERM)
    assert gocryptfs.stderr is not None  # start() pipes it
    assert gocryptfs.wait(15) in (0, 15), gocryptfs.stderr.read().decode()
    node.wait_unmounted(volume.target)
    assert broker_requests(node) == [("mount", "allowed"), ("unmount", "allowed")]


# ---------------------------------------------------------------- rclone (bazil, go-fuse)


@pytest.mark.parametrize("command", ["mount", "mount2"])
def test_rclone_mounts_a_local_directory_that_another_uid_reads_and_writes(
    node: Node, tmp_path: Path, command: str
) -> None:
    source = source_dir(tmp_path)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox({**volume.binds(DATA), SOURCE: source})
    # mount: bazil, execs fusermount; mount2: go-fuse, execs fusermount3.
    # --allow-non-empty: rclone refuses a mountpoint that is already a mount
    # point, and a volume is always one inside a container (a bind).
    # --umask 000 lets other uids write (rclone reports its own uid as owner).
    rclone = start(sandbox, ["rclone", command, "--config", "/dev/null", "--cache-dir", "/tmp/rc",
                             "--allow-non-empty", "--umask", "000", SOURCE, DATA])  # fmt: skip
    mount = node.wait_mounted_by(rclone, volume.target)

    assert_unprivileged_fuse(mount, "fuse.rclone")
    reads_and_writes_through_the_mount(node, volume, source)

    # rclone unmounts on SIGTERM, then exits 143 from its signal handler or
    # 0 from its main goroutine, whichever gets there first.
    rclone.send_signal(signal.SIGTERM)
    assert rclone.stderr is not None  # start() pipes it
    assert rclone.wait(15) in (0, 128 + signal.SIGTERM), rclone.stderr.read().decode()
    node.wait_unmounted(volume.target)
    assert broker_requests(node) == [("mount", "allowed"), ("unmount", "allowed")]
