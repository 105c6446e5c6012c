"""Unprivileged libfuse3 programs mount through the zipapp and the broker.

Every test runs the real driver, real kernel FUSE mounts, and the FUSE
program as uid 65534 with no capabilities in a sandboxed "pod" whose
/usr/bin/fusermount3 is our zipapp.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from csi_async.mount.mountinfo import mounts_at
from e2e.kubelet import Pod
from e2e.node import FuseVolume, Node
from e2e.sandbox import Container, PodSandbox
from tests.daemon_watch import wait_until_the_watch_is_done

HELLO_TEXT = "Hello World!\n"
# What a FUSE mount whose daemon is gone answers.
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
DATA = "/run/data"


def start(sandbox: PodSandbox, argv: list[str]) -> Container:
    return sandbox.spawn(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def read_as_other_uid(node: Node, volume: FuseVolume, path: str) -> str:
    """Read through the mount from a separate container running as uid 1000."""
    reader = node.sandbox({DATA: volume.target}, uid=1000, gid=1000)
    result = reader.run(["cat", f"{DATA}/{path}"], capture_output=True, timeout=15)
    assert result.returncode == 0, result.stderr
    stdout: bytes = result.stdout  # captured without text=True
    return stdout.decode()


@pytest.mark.parametrize("mode", ["native", "meta-fuse"])
def test_hello_mounts_unprivileged_and_other_processes_read_it(
    node: Node, fuse_examples: Path, mode: str
) -> None:
    volume = node.publish_fuse_volume(Pod("app"), mode=mode)
    sandbox = node.sandbox(volume.binds(DATA), env=volume.env)
    hello = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    mount = node.wait_mounted_by(hello, volume.target)

    assert mount.fstype == "fuse.hello"
    assert "user_id=65534" in mount.super_options
    # A separate process on the node reads at the kubelet target path...
    assert (volume.target / "hello").read_text() == HELLO_TEXT
    # ...and a second "container" of another uid reads through propagation.
    assert read_as_other_uid(node, volume, "hello") == HELLO_TEXT

    result = sandbox.run(["fusermount3", "-u", DATA], capture_output=True, timeout=15)
    assert result.returncode == 0, result.stderr
    node.wait_unmounted(volume.target)
    assert hello.wait(15) == 0


def test_passthrough_reads_and_writes_through_the_mount(
    node: Node, fuse_examples: Path, tmp_path: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    source = tmp_path / "source"
    source.mkdir()
    source.chmod(0o777)
    (source / "input.txt").write_text("through passthrough\n")
    (source / "input.txt").chmod(0o644)
    sandbox = node.sandbox({**volume.binds(DATA), "/run/source": source})
    program = start(sandbox, [str(fuse_examples / "passthrough"), "-f", DATA])
    node.wait_mounted_by(program, volume.target)

    reader = node.sandbox({DATA: volume.target})
    cat = reader.run(["cat", f"{DATA}/run/source/input.txt"], capture_output=True, timeout=15)
    assert cat.stdout == b"through passthrough\n", cat.stderr
    write = reader.run(
        ["sh", "-c", f"echo written > {DATA}/run/source/output.txt"], capture_output=True,
        timeout=15,
    )  # fmt: skip
    assert write.returncode == 0, write.stderr
    assert (source / "output.txt").read_text() == "written\n"


def test_a_read_only_volume_mounts_read_only(node: Node, fuse_examples: Path) -> None:
    volume = node.publish_fuse_volume(Pod("app"), readonly=True)
    sandbox = node.sandbox(volume.binds(DATA))
    hello = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    mount = node.wait_mounted_by(hello, volume.target)
    assert "ro" in mount.mount_options
    assert "ro" in mount.super_options


@pytest.mark.parametrize("asked", [[], ["-o", "default_permissions"]], ids=["plain", "asked"])
def test_the_mount_has_the_programs_options_plus_only_what_safety_requires(
    node: Node, fuse_examples: Path, asked: list[str]
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    hello = start(sandbox, [str(fuse_examples / "hello"), "-f", *asked, DATA])
    mount = node.wait_mounted_by(hello, volume.target)
    # Per mount: libfuse's own "rw", the always-on nosuid,nodev, the
    # kernel's default atime mode. Per superblock: the ids the broker sets,
    # the node's allow_other, and default_permissions only if asked for
    # (fusermount3 never adds it either).
    assert set(mount.mount_options) == {"rw", "nosuid", "nodev", "relatime"}
    expected = {"rw", "user_id=65534", "group_id=65534", "allow_other"}
    if asked:
        expected.add("default_permissions")
    assert set(mount.super_options) == expected


@pytest.mark.parametrize(
    ("asked", "allowed"), [([], True), (["-o", "default_permissions"], False)],
    ids=["daemon-checks", "kernel-checks"],
)  # fmt: skip
def test_a_non_owner_writes_when_the_daemon_leaves_permission_checks_to_itself(
    node: Node, fuse_examples: Path, tmp_path: Path, asked: list[str], allowed: bool
) -> None:
    # passthrough, run as uid 65534, reports the source dir as 65534's, mode
    # 0755, and does every write as 65534 itself. A writer of uid 1000 gets
    # through unless the kernel checks those modes (default_permissions).
    source = tmp_path / "source"
    source.mkdir()
    os.chown(source, 65534, 65534)
    source.chmod(0o755)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox({**volume.binds(DATA), "/run/source": source})
    program = start(sandbox, [str(fuse_examples / "passthrough"), "-f", *asked, DATA])
    node.wait_mounted_by(program, volume.target)
    writer = node.sandbox({DATA: volume.target}, uid=1000, gid=1000)
    write = writer.run(
        ["sh", "-c", f"echo written > {DATA}/run/source/by-1000.txt"], capture_output=True,
        timeout=15,
    )  # fmt: skip
    if allowed:
        assert write.returncode == 0, write.stderr
        assert (source / "by-1000.txt").read_text() == "written\n"
        assert (source / "by-1000.txt").stat().st_uid == 65534
    else:
        assert write.returncode != 0
        assert b"Permission denied" in write.stderr
        assert not (source / "by-1000.txt").exists()


def test_suid_and_dev_never_appear(node: Node, fuse_examples: Path) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    # libfuse turns -o suid,dev into a flag string without nosuid/nodev.
    hello = start(sandbox, [str(fuse_examples / "hello"), "-f", "-o", "suid,dev", DATA])
    mount = node.wait_mounted_by(hello, volume.target)
    assert {"nosuid", "nodev"} <= set(mount.mount_options)


def test_a_forbidden_option_is_refused_on_the_programs_stderr(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    # libfuse passes SELinux context options straight to the helper.
    result = sandbox.run(
        [str(fuse_examples / "hello"), "-f", "-o", "context=system_u:object_r:tmp_t:s0", DATA],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "fusermount3: option 'context=system_u:object_r:tmp_t:s0' refused" in (
        result.stderr.decode()
    )
    assert not mounts_at(os.fspath(volume.target))


def test_auto_unmount_cleans_up_after_the_program_is_killed(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    # A shell is PID 1 and outlives hello, so killing hello does not take
    # the watcher (our fusermount3, hello's child) down with the container.
    container = sandbox.spawn(
        ["sh", "-c", f"{fuse_examples / 'hello'} -f -o auto_unmount {DATA} & sleep 600"]
    )
    node.wait_mounted_by(container, volume.target)
    hello_pids = [pid for pid in container.processes() if _comm(pid) == "hello"]
    assert len(hello_pids) == 1
    os.kill(hello_pids[0], signal.SIGKILL)
    node.wait_unmounted(volume.target, timeout=15)


def test_the_program_killed_and_restarted_mounts_again_through_the_same_socket(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    first = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    node.wait_mounted_by(first, volume.target)
    first.kill()  # SIGKILL of the container: no helper survives to unmount
    first.wait(15)
    # The broker watched the daemon's process and detached the dead mount,
    # so a restarted container can bind the volume again.
    node.wait_unmounted(volume.target)
    second = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    node.wait_mounted_by(second, volume.target)
    assert read_as_other_uid(node, volume, "hello") == HELLO_TEXT


def test_a_dead_mount_the_broker_could_not_watch_is_replaced_on_the_next_mount(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    # Without -f hello daemonizes: the process that ran fusermount3 exits
    # while the mount lives on, so the broker stops watching it.
    container = sandbox.spawn(["sh", "-c", f"{fuse_examples / 'hello'} {DATA}; sleep 600"])
    node.wait_mounted_by(container, volume.target)
    # Once the shell has moved on to `sleep`, the foreground hello has exited
    # and the only hello left is the daemon serving the mount.
    deadline = time.monotonic() + 15
    while "sleep" not in [_comm(p) for p in container.processes()]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    daemons = [p for p in container.processes() if _comm(p) == "hello"]
    assert len(daemons) == 1
    # The broker probes the mount as it sees fusermount3 and the foreground
    # hello exit; a probe after the kill below would detach the dead mount.
    wait_until_the_watch_is_done(node, dict(volume.socket_binds), fuse_examples / "hello")
    os.kill(daemons[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:  # the dead mount stays: reads fail with ENOTCONN
        try:
            (volume.target / "hello").read_text()
        except OSError as err:
            assert err.errno in DEAD
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # A new MOUNT finds the connection dead, detaches it and mounts fresh.
    # (This container does not bind the volume: binding a dead FUSE mount
    # fails with ENOTCONN. The mountpoint a program names is advisory; the
    # broker mounts on the volume's target.)
    restarter = node.sandbox(dict(volume.socket_binds))
    restarted = start(restarter, [str(fuse_examples / "hello"), "-f", "/tmp"])
    # Until the new mount serves: the dead one answers ENOTCONN, and between
    # its detach and the new mount the bare directory answers ENOENT. (The
    # new superblock may get the dead one's device and mount id back once
    # nothing holds the dead one, so mountinfo cannot tell them apart.)
    deadline = time.monotonic() + 15
    while True:
        try:
            if (volume.target / "hello").read_text() == HELLO_TEXT:
                break
        except OSError as err:
            assert err.errno in (*DEAD, errno.ENOENT), err
        assert restarted.poll() is None, "the restarted daemon exited"
        assert time.monotonic() < deadline, "the dead mount was never replaced"
        time.sleep(0.05)
    assert (volume.target / "hello").read_text() == HELLO_TEXT
    assert restarted.poll() is None
    assert len([m for m in mounts_at(os.fspath(volume.target)) if m.is_fuse]) == 1


def test_a_second_mount_while_the_first_daemon_lives_is_busy(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    first = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    node.wait_mounted_by(first, volume.target)
    second = sandbox.run([str(fuse_examples / "hello"), "-f", DATA], capture_output=True,
                         timeout=30)  # fmt: skip
    assert second.returncode != 0
    assert (
        f"fusermount3: {DATA} is already mounted: the volume's FUSE filesystem is there and "
        f"its daemon is still running; stop that program or unmount it first with "
        f"fusermount3 -u {DATA}\n"
    ) in second.stderr.decode()
    assert first.poll() is None


def test_a_mount_below_the_volumes_live_mount_is_told_it_needs_a_volume_of_its_own(
    node: Node, fuse_examples: Path, tmp_path: Path
) -> None:
    # What an automounter (afuse) or a program given a directory inside the
    # mounted filesystem does: its mountpoint is below the first mount.
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    source.chmod(0o755)
    (source / "sub").chmod(0o777)
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox({**volume.binds(DATA), "/run/source": source})
    first = start(sandbox, [str(fuse_examples / "passthrough"), "-f", DATA])
    node.wait_mounted_by(first, volume.target)
    below = f"{DATA}/run/source/sub"
    second = sandbox.run([str(fuse_examples / "hello"), "-f", below], capture_output=True,
                         timeout=30)  # fmt: skip
    assert second.returncode != 0
    assert (
        f"fusermount3: {below} is inside the volume's FUSE filesystem, which is already "
        f"mounted at {DATA} and still served: a volume holds one FUSE mount, on its root, "
        f"whatever mountpoint is asked for, so nothing can be mounted below it (an "
        f"automounter such as afuse included); give the second filesystem a csi-async "
        f"volume (and broker socket) of its own\n"
    ) in second.stderr.decode()
    assert first.poll() is None
    assert len([m for m in mounts_at(os.fspath(volume.target)) if m.is_fuse]) == 1


def test_a_mount_elsewhere_through_a_mounted_volumes_socket_is_told_where_it_lands(
    node: Node, fuse_examples: Path
) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    first = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    node.wait_mounted_by(first, volume.target)
    # An automounter's private directory, say: not on the volume at all, yet
    # the broker socket only ever mounts on the volume.
    second = sandbox.run(
        ["sh", "-c", f"mkdir /tmp/elsewhere && exec {fuse_examples / 'hello'} -f /tmp/elsewhere"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert second.returncode != 0
    assert (
        f"fusermount3: the volume is already mounted (at {DATA}) and its FUSE daemon is still "
        f"running: /tmp/elsewhere would land on the same volume, since a volume holds one "
        f"FUSE mount, on its root, whatever mountpoint is asked for; give the second "
        f"filesystem a csi-async volume (and broker socket) of its own, or unmount the first "
        f"with fusermount3 -u {DATA}\n"
    ) in second.stderr.decode()
    assert first.poll() is None


def test_starter_mode_runs_the_program_on_dev_fd(node: Node, fuse_examples: Path) -> None:
    volume = node.publish_fuse_volume(Pod("app"))
    sandbox = node.sandbox(volume.binds(DATA))
    starter = start(
        sandbox, ["fusermount3", "--start", "--", str(fuse_examples / "hello"), "-f", "/dev/fd/N"]
    )
    node.wait_mounted_by(starter, volume.target)
    assert read_as_other_uid(node, volume, "hello") == HELLO_TEXT
    starter.send_signal(signal.SIGTERM)
    # The starter forwards SIGTERM to hello and exits with hello's status:
    # libfuse 3.14 reports a session loop ended by a signal as exit 8.
    assert starter.wait(15) == 8
    node.wait_unmounted(volume.target)


def test_unpublish_with_a_live_mount_unmounts_and_removes_everything(
    node: Node, fuse_examples: Path
) -> None:
    pod = Pod("app")
    volume = node.publish_fuse_volume(pod)
    sandbox = node.sandbox(volume.binds(DATA))
    hello = start(sandbox, [str(fuse_examples / "hello"), "-f", DATA])
    node.wait_mounted_by(hello, volume.target)
    socket_dir = volume.socket_binds["/run/csi-async"]

    node.unpublish(pod, "data")
    node.unpublish(pod, "data-broker")
    assert not mounts_at(os.fspath(volume.target))
    assert not volume.target.exists()
    assert not socket_dir.exists()
    assert hello.wait(15) is not None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
