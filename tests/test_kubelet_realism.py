"""Restarts as a real kubelet v1.36 + containerd 1.6 + runc do them, with real FUSE programs.

The pods here are run by the node's pod worker (e2e.pods): the FUSE program
is a native sidecar (an init container with restartPolicy Always) whose
startupProbe looks for the FUSE mount in its mountinfo, the app container
starts after it, and every container binds its volumes when it starts, as
the runtime does (e2e.sandbox). So, as on a real node (see
shared/reference/csi-and-kubelet.md §6):

* the app container, started after the FUSE mount, holds a copy of that
  FUSE mount itself; a later unmount and remount on the host target does not
  reach it, whatever its mountPropagation;
* a restarted container binds its volumes afresh, and the runtime first
  stats each one: a dead FUSE mount on the target fails the creation with
  "transport endpoint is not connected", and kubelet retries with back-off.

The tests named test_a_* and test_b_* are the issue "Real kubelet: restarts
that recover": they fail until the driver swaps the dead mount's copies in
the pod's mount namespaces for the new mount (a, b) and notices a daemon's
death across its own restart (b). The others check the emulator's model.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest

from csi_async._proto.csi.v1 import NodePublishVolumeRequest
from csi_async.mount.mountinfo import MountEntry, read_mountinfo
from e2e.kubelet import KEY_POD_UID, Pod
from e2e.node import Node
from e2e.pods import (
    ALWAYS,
    CRASH_LOOP_BACK_OFF,
    CREATE_CONTAINER_ERROR,
    ContainerSpec,
    PodSpec,
    RunningPod,
    fuse_startup_probe,
    fuse_volume_spec,
    kill_processes,
)
from e2e.sandbox import HOST_TO_CONTAINER, NONE, Container
from tests.daemon_watch import wait_until_the_watch_is_done

HELLO_TEXT = "Hello World!\n"
DATA = "/run/data"
HELLO = f"{DATA}/hello"
# The app idles until kubelet stops it (PID 1 needs a SIGTERM handler).
IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]
APP_UID = 1000
# After the FUSE sidecar is back, the app must read again within this.
READ_AGAIN_WITHIN = 5.0
# kubelet notices an exit within a relist (1 s) and restarts a first crash at once.
RESTART_WITHIN = 15.0

MODES = ["native", "meta-fuse"]
HELPERS = ["proxy", "starter"]


def fuse_command(fuse_examples: Path, helper: str) -> list[str]:
    """proxy: libfuse runs the zipapp as its fusermount3; starter: the zipapp runs hello."""
    hello = str(fuse_examples / "hello")
    if helper == "proxy":
        return [hello, "-f", DATA]
    return ["fusermount3", "--start", "--", hello, "-f", "/dev/fd/N"]


def fuse_pod(fuse_examples: Path, mode: str, helper: str, app_propagation: str | None) -> PodSpec:
    """The documented pattern: the FUSE program as a native sidecar gated by its
    startupProbe, then the app, which reads the volume."""
    fuse = fuse_volume_spec("data", mode)
    sidecar = ContainerSpec(
        "fuse",
        fuse_command(fuse_examples, helper),
        fuse.fuse_container_mounts(DATA),
        env=fuse.env,
        restart_policy=ALWAYS,
        startup_probe=fuse_startup_probe(DATA),
    )
    app = ContainerSpec(
        "app",
        IDLE,
        [fuse.consumer_mount(DATA, app_propagation)],
        run_as_user=APP_UID,
        run_as_group=APP_UID,
    )
    return PodSpec(
        containers=[app],
        init_containers=[sidecar],
        volumes=fuse.volumes,
        termination_grace_period_seconds=5,
    )


def mounts_in(container: Container, path: str) -> list[MountEntry]:
    """What is mounted at `path` in the container's own mount namespace, bottom first."""
    pid = container.init_pid()
    assert pid is not None, "the container is gone"
    return [m for m in read_mountinfo(pid) if m.mount_point == path]


def wait_reads(running: RunningPod, name: str, deadline: float, what: str) -> None:
    """Until `cat /run/data/hello` in the container gives the file, or fail at deadline."""
    while True:
        ok, text = running.read(name, HELLO, timeout=max(deadline - time.monotonic(), 1.0))
        if ok and text == HELLO_TEXT:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {text.strip() or 'no output'}\n{running.describe()}")
        time.sleep(0.05)


def kill_fuse_daemon(running: RunningPod) -> Container:
    """SIGKILL the hello process of the FUSE sidecar; returns the container it ran in."""
    container = running.container("fuse")
    killed = kill_processes(container, "hello")
    assert len(killed) == 1, f"expected one hello in the sidecar, killed {killed}"
    return container


def wait_sidecar_recreated(running: RunningPod, old: Container) -> float:
    """Until kubelet has a new FUSE sidecar running and started; returns when it was created.

    Fails at once if the runtime refused to create it.
    """
    status = running.status("fuse")
    deadline = time.monotonic() + RESTART_WITHIN
    while True:
        refused = running.create_errors("fuse")
        assert not refused, (
            f"kubelet could not recreate the FUSE sidecar: {refused[0].message}\n"
            f"{running.describe()}"
        )
        current = status.container
        if current is not None and current is not old and status.running and status.started:
            assert status.created_at is not None
            return status.created_at
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the FUSE sidecar was not restarted within {RESTART_WITHIN:.0f} s\n"
                f"{running.describe()}"
            )
        time.sleep(0.05)


def start_pod(node: Node, spec: PodSpec, name: str = "app") -> RunningPod:
    running = node.run_pod(Pod(name), spec)
    running.wait_running(timeout=60)
    return running


# ------------------------------------------------------------------ the issue


@pytest.mark.parametrize("app_propagation", [NONE, HOST_TO_CONTAINER])
@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("mode", MODES)
def test_a_killed_fuse_daemon_is_restarted_and_the_app_reads_again(
    node: Node, fuse_examples: Path, mode: str, helper: str, app_propagation: str
) -> None:
    running = start_pod(node, fuse_pod(fuse_examples, mode, helper, app_propagation))
    app = running.container("app")
    # The app started after the mount: it holds a copy of the FUSE mount
    # itself, tied to the host's only under HostToContainer.
    held = mounts_in(app, DATA)
    assert [m.is_fuse for m in held] == [True], held
    assert held[0].slave == (app_propagation == HOST_TO_CONTAINER), held
    wait_reads(running, "app", time.monotonic() + 5, "the app cannot read the mount")

    old = kill_fuse_daemon(running)
    restarted = wait_sidecar_recreated(running, old)
    wait_reads(
        running,
        "app",
        restarted + READ_AGAIN_WITHIN,
        f"the app (started after the first mount, mountPropagation {app_propagation}) "
        f"cannot read {HELLO} {READ_AGAIN_WITHIN:.0f} s after the FUSE sidecar was restarted",
    )
    assert running.container("app") is app
    assert running.status("app").restart_count == 0


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("mode", MODES)
def test_b_after_a_driver_restart_a_killed_fuse_daemon_is_restarted_and_the_app_reads_again(
    node: Node, fuse_examples: Path, mode: str, helper: str
) -> None:
    running = start_pod(node, fuse_pod(fuse_examples, mode, helper, NONE))
    app = running.container("app")
    wait_reads(running, "app", time.monotonic() + 5, "the app cannot read the mount")

    node.driver.stop(signal.SIGKILL)
    node.driver.start()
    # The established mount never noticed: its daemon holds the FUSE fd.
    wait_reads(running, "app", time.monotonic() + 5, "the app cannot read after the restart")

    old = kill_fuse_daemon(running)
    # kubelet's restart stats the volume: a dead FUSE mount left on the
    # target fails the sidecar's creation (and then again, with back-off).
    restarted = wait_sidecar_recreated(running, old)
    wait_reads(
        running,
        "app",
        restarted + READ_AGAIN_WITHIN,
        f"the app (started after the first mount) cannot read {HELLO} "
        f"{READ_AGAIN_WITHIN:.0f} s after the FUSE sidecar was restarted",
    )
    assert running.container("app") is app
    assert running.status("app").restart_count == 0


# ------------------------------------------------------------------ the emulator's model


def test_containers_started_before_the_mount_see_it_only_with_host_to_container(
    node: Node, fuse_examples: Path
) -> None:
    fuse = fuse_volume_spec("data")
    # Two sidecars without startupProbes start (in order) before the FUSE
    # sidecar, whose probe then gates the app.
    early = [
        ContainerSpec(name, IDLE, [fuse.consumer_mount(DATA, propagation)], restart_policy=ALWAYS)
        for name, propagation in (("early-none", NONE), ("early-h2c", HOST_TO_CONTAINER))
    ]
    sidecar = ContainerSpec(
        "fuse",
        fuse_command(fuse_examples, "proxy"),
        fuse.fuse_container_mounts(DATA),
        restart_policy=ALWAYS,
        startup_probe=fuse_startup_probe(DATA),
    )
    app = ContainerSpec("app", IDLE, [fuse.consumer_mount(DATA)])
    spec = PodSpec(
        containers=[app],
        init_containers=[*early, sidecar],
        volumes=fuse.volumes,
        termination_grace_period_seconds=5,
    )
    running = start_pod(node, spec)

    created = {
        name: running.status(name).created_at for name in ("early-none", "early-h2c", "fuse", "app")
    }
    assert None not in created.values()
    fuse_started = running.status("fuse").started_at
    assert fuse_started is not None
    order = sorted(created, key=lambda n: created[n] or 0.0)
    assert order == ["early-none", "early-h2c", "fuse", "app"], created
    assert (created["app"] or 0.0) >= fuse_started  # the startupProbe gated the app

    # None: the bind of the bare directory, and nothing ever arrives.
    none_view = mounts_in(running.container("early-none"), DATA)
    assert len(none_view) == 1 and not none_view[0].is_fuse, none_view
    ok, text = running.read("early-none", HELLO)
    assert not ok and "No such file or directory" in text, text
    # HostToContainer: the FUSE mount arrived on top of the bind.
    h2c_view = mounts_in(running.container("early-h2c"), DATA)
    assert [m.is_fuse for m in h2c_view] == [False, True], h2c_view
    wait_reads(running, "early-h2c", time.monotonic() + 5, "early-h2c cannot read")

    # It follows the remount after a sidecar restart, because its bind is of
    # the directory under the FUSE mount, not of the FUSE mount.
    old = kill_fuse_daemon(running)
    restarted = wait_sidecar_recreated(running, old)
    wait_reads(
        running, "early-h2c", restarted + READ_AGAIN_WITHIN, "early-h2c does not see the new mount"
    )
    assert not any(m.is_fuse for m in mounts_in(running.container("early-none"), DATA))


def test_the_runtime_refuses_to_bind_a_dead_fuse_mount_and_kubelet_backs_off(
    node: Node, fuse_examples: Path
) -> None:
    fuse = fuse_volume_spec("data")
    # Without -f hello daemonizes: the broker cannot watch the daemon, so
    # killing it leaves a dead mount on the target.
    daemonizing = ["sh", "-c", f"{fuse_examples / 'hello'} {DATA} && {IDLE[2]}"]
    sidecar = ContainerSpec(
        "fuse",
        daemonizing,
        fuse.fuse_container_mounts(DATA),
        restart_policy=ALWAYS,
        startup_probe=fuse_startup_probe(DATA),
    )
    app = ContainerSpec("app", IDLE, [fuse.consumer_mount(DATA)])
    spec = PodSpec(
        containers=[app],
        init_containers=[sidecar],
        volumes=fuse.volumes,
        termination_grace_period_seconds=5,
    )
    running = node.run_pod(
        Pod("app"), spec, relist_period=0.1, backoff_initial=0.2, backoff_max=0.8
    )
    running.wait_running(timeout=60)
    target = node.kubelet.target_path(running.pod, "data")
    # Once the shell runs its idle loop, the foreground hello has exited and
    # the only hello left is the daemon (before its fork, the foreground one
    # was the only hello too).
    sidecar_container = running.container("fuse")
    running.wait_for(
        "hello to daemonize",
        lambda: "sleep" in [_comm(p) for p in sidecar_container.processes()],
        timeout=15,
    )
    # The broker probes the mount as it sees fusermount3 and the foreground
    # hello exit; a probe after the kill below would detach the dead mount.
    socket_dir = node.kubelet.target_path(running.pod, "data-broker")
    wait_until_the_watch_is_done(node, {"/run/csi-async": socket_dir}, fuse_examples / "hello")
    kill_fuse_daemon(running)
    deadline = time.monotonic() + 15
    while True:
        try:
            os.stat(target)
        except OSError as err:
            assert err.errno == errno.ENOTCONN, err
            break
        assert time.monotonic() < deadline, "the mount never went dead"
        time.sleep(0.05)

    running.container("app").kill()  # the app crashes; kubelet restarts it
    running.wait_for(
        "three refused creations", lambda: len(running.create_errors("app")) >= 3, timeout=15
    )
    expected = re.compile(
        r'Error: failed to generate container "[0-9a-f]{64}" spec: failed to generate spec: '
        rf'failed to stat "{re.escape(str(target))}": stat {re.escape(str(target))}: '
        r"transport endpoint is not connected"
    )
    for event in running.create_errors("app"):
        assert expected.fullmatch(event.message), event.message
    status = running.status("app")
    assert status.reason in (CREATE_CONTAINER_ERROR, CRASH_LOOP_BACK_OFF)
    assert status.restart_count == 0  # no new container was ever created
    assert running.warnings("app", "BackOff"), running.describe()


def test_pod_volumes_are_published_concurrently_in_random_order(node: Node) -> None:
    node.kubelet.rng.seed(20261201)
    pods = [Pod(f"p{i}") for i in range(16)]
    for pod in pods:
        node.publish_fuse_volume(pod)
    first: dict[str, str] = {}
    for _, request in node.kubelet.calls:
        if isinstance(request, NodePublishVolumeRequest):
            uid = request.volume_context[KEY_POD_UID]
            first.setdefault(uid, Path(request.target_path).parent.name)
    assert len(first) == len(pods)
    assert set(first.values()) == {"data", "data-broker"}, first


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
