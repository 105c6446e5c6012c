"""The narrated demo: one unprivileged pod mounts sshfs through csi-async.

Run it with `bash scripts/demo.sh` (as root; it installs what it needs), or
`python -m e2e demo --zipapp build/fusermount3` once everything is built.
Every step says what it does and why; the run ends with a table of timings
and exits non-zero if anything failed. Nothing is left behind: no mount, no
socket, no process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from e2e.kubelet import Pod
from e2e.mounts import mounts_at_or_below
from e2e.node import Node

T = TypeVar("T")
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
# Where the pod's containers mount the FUSE volume.
DATA_PATH_IN_DEMO = "/run/data"
GREETING = "Hello from a FUSE filesystem mounted without privileges!\n"


class Narrator:
    """Prints numbered steps with their explanation, and times them."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.timings: list[tuple[str, float, str]] = []

    def say(self, text: str) -> None:
        self.out(textwrap.indent(textwrap.fill(textwrap.dedent(text).strip(), 76), "    "))

    def show(self, text: str) -> None:
        self.out(textwrap.indent(text.rstrip(), "      | "))

    @contextmanager
    def step(self, title: str, why: str) -> Iterator[None]:
        number = len(self.timings) + 1
        self.out(f"\n[{number}] {title}")
        self.say(why)
        started = time.monotonic()
        result = "ok"
        try:
            yield
        except BaseException:
            result = "FAILED"
            raise
        finally:
            elapsed = time.monotonic() - started
            self.timings.append((title, elapsed, result))
            self.out(f"    ... {result} in {elapsed * 1000:.0f} ms")

    def summary(self) -> None:
        width = max(len(title) for title, _, _ in self.timings)
        self.out("\nSummary")
        self.out(f"  {'step':<{width}}  {'time':>9}  result")
        for title, elapsed, result in self.timings:
            self.out(f"  {title:<{width}}  {elapsed * 1000:>6.0f} ms  {result}")
        total = sum(elapsed for _, elapsed, _ in self.timings)
        self.out(f"  {'total':<{width}}  {total * 1000:>6.0f} ms")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_demo(zipapp: Path, narrator: Narrator | None = None) -> int:
    n = narrator or Narrator()
    if not Path(SFTP_SERVER).exists():
        raise FileNotFoundError(f"{SFTP_SERVER} is missing (apt-get install openssh-sftp-server)")
    if shutil.which("sshfs") is None:
        raise FileNotFoundError("sshfs is missing (apt-get install sshfs)")
    workdir = Path(tempfile.mkdtemp(prefix="csi-async-demo-"))
    workdir.chmod(0o755)
    try:
        _demo(n, zipapp, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        n.summary()
    return 0


def _demo(n: Narrator, zipapp: Path, workdir: Path) -> None:
    n.out("csi-async demo: an unprivileged pod mounts sshfs through the fd broker.")
    with n.step(
        "start the node",
        """A Kubernetes node, simulated: a kubelet root directory that is a shared
        mount (as /var/lib/kubelet is on a real node, so that mounts made there
        reach containers), and the csi-async driver serving the CSI socket.
        The driver is the only privileged part.""",
    ):
        node = Node(workdir, zipapp).__enter__()
        n.show(f"kubelet root: {node.root.path}\nCSI endpoint: {node.driver.endpoint}")
    try:
        _pod(n, node, workdir)
    except BaseException:
        node.__exit__(*sys.exc_info())
        raise
    with n.step(
        "stop the node",
        """The driver gets SIGTERM, finishes what it was doing and removes its
        socket; the simulated kubelet root is unmounted and deleted.""",
    ):
        root = node.root.path
        # Also checks that unpublishing left no FUSE mount on the node.
        node.__exit__(None, None, None)
        if mounts_at_or_below(root):
            raise RuntimeError(f"mounts left behind under {root}")
    n.out("\nNothing is left behind: no mount, no socket, no process.")


def _pod(n: Narrator, node: Node, workdir: Path) -> None:
    pod = Pod("demo")
    served = workdir / "srv"
    served.mkdir(mode=0o755)
    (served / "hello.txt").write_text(GREETING)
    (served / "hello.txt").chmod(0o644)
    ssh = workdir / "bin" / "fake-ssh"
    ssh.parent.mkdir(mode=0o755)
    # sshfs runs "ssh ... -s sftp"; this stand-in ignores the arguments and
    # speaks SFTP on stdin/stdout, like the sftp subsystem of an sshd would.
    ssh.write_text(f"#!/bin/sh\nexec {SFTP_SERVER}\n")
    ssh.chmod(0o755)

    with n.step(
        "publish the volumes",
        """Playing kubelet: the pod declares two CSI volumes of this driver. "data"
        is where the FUSE filesystem will appear; "data-broker" (socketFor: data,
        read-only) gives the pod the broker socket for "data". kubelet calls
        NodePublishVolume for each: the driver creates the target directory and
        starts listening on a socket that only this pod can see.""",
    ):
        volume = node.publish_fuse_volume(pod, "data")
        n.show(
            f"target of data:        {volume.target}\n"
            f"broker socket for pod: {volume.socket_binds['/run/csi-async']}/fuse.sock"
        )

    sandbox = node.sandbox(
        {**volume.binds(DATA_PATH_IN_DEMO), "/run/srv": served, "/run/bin": ssh.parent}
    )
    command = [
        "sshfs", "-f", "-o", "ssh_command=/run/bin/fake-ssh",
        "demo@files:/run/srv", DATA_PATH_IN_DEMO,
    ]  # fmt: skip
    with n.step(
        "start the FUSE container",
        """The pod's sshfs container runs as uid 65534 with every capability
        dropped, so it cannot mount anything itself. Its image has the csi-async
        zipapp installed as /usr/bin/fusermount3. libfuse tries to mount, gets
        EPERM, and runs fusermount3 as it always does; the zipapp asks the broker
        over /run/csi-async/fuse.sock; the broker checks the options, opens
        /dev/fuse, mounts FUSE on the volume's target and passes the open fd back,
        which the zipapp hands to sshfs exactly as the real helper would.""",
    ):
        n.show("$ " + " ".join(command))
        fuse_container = sandbox.spawn(command, stderr=subprocess.PIPE)
        try:
            # Give up early if sshfs exits instead of mounting.
            wait_for(
                "sshfs to mount",
                lambda: True if fuse_container.poll() is not None or mounts_at_or_below(
                    volume.target) else None,
            )  # fmt: skip
            mount = node.wait_mounted(volume.target, timeout=0.5)
        except TimeoutError:
            fuse_container.kill()
            stderr = fuse_container.stderr.read().decode() if fuse_container.stderr else ""
            raise RuntimeError(f"sshfs did not mount:\n{stderr}") from None
        n.show(
            f"mount type {mount.fstype}, source {mount.source}, "
            f"options {','.join(mount.mount_options)}\n"
            f"owner {','.join(o for o in mount.super_options if o.endswith('_id=65534'))}"
        )
        audit = [e for e in node.driver.log_entries() if e.get("op") == "mount"]
        if audit:
            entry = audit[-1]
            n.show(f"broker: mount {entry['decision']} for peer pid {entry['peer_pid']} "
                   f"uid {entry['peer_uid']} in {entry['duration_ms']} ms")  # fmt: skip

    with n.step(
        "read through the mount",
        """A second container of the same pod, running as another user (uid 1000),
        reads the file through its own view of the volume. The mount was made
        after this container's view was set up; it arrives through mount
        propagation (mountPropagation: HostToContainer in a pod spec).""",
    ):
        reader = node.sandbox({DATA_PATH_IN_DEMO: volume.target}, uid=1000, gid=1000)
        result = reader.run(["cat", f"{DATA_PATH_IN_DEMO}/hello.txt"], capture_output=True,
                            timeout=20)  # fmt: skip
        if result.returncode != 0 or result.stdout.decode() != GREETING:
            raise RuntimeError(f"unexpected read: {result.stdout!r} {result.stderr!r}")
        n.show(f"$ cat {DATA_PATH_IN_DEMO}/hello.txt\n{result.stdout.decode()}")

    with n.step(
        "unmount and unpublish",
        """sshfs stops; the zipapp's "fusermount3 -u" asks the broker to unmount
        (it can only ever unmount this volume's own mount). Then kubelet calls
        NodeUnpublishVolume for both volumes: the driver stops listening, removes
        the socket and the target directory, and never deletes anyone's files.""",
    ):
        unmount = sandbox.run(["fusermount3", "-u", DATA_PATH_IN_DEMO], capture_output=True,
                              timeout=20)  # fmt: skip
        if unmount.returncode != 0:
            raise RuntimeError(f"fusermount3 -u failed: {unmount.stderr.decode()}")
        node.wait_unmounted(volume.target)
        fuse_container.wait(20)
        socket_dir = volume.socket_binds["/run/csi-async"]
        node.unpublish(pod, "data")
        node.unpublish(pod, "data-broker")
        wait_for("the target to go", lambda: True if not volume.target.exists() else None)
        if socket_dir.exists() or os.path.exists(socket_dir / "fuse.sock"):
            raise RuntimeError("the broker socket is still there")
