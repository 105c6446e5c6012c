"""What every scenario runs on: the work dir, the built artifacts, a simulated node.

Every scenario starts its own simulated node (e2e.node.Node: a shared
KubeletRoot, the real driver as a subprocess with its CSI socket at
<root>/plugins/<driver>/csi.sock, a grpcio kubelet emulator) and tears it
down again; the helpers here are what they read from it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.sizes import Sizes
from csi_async.volumes.socket_dirs import NATIVE_SOCKET_NAME
from e2e.kubelet import Pod
from e2e.node import FuseVolume, Node

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "build" / "fuse-examples"
NOBODY = 65534
HELLO_TEXT = b"Hello World!\n"
MIB = 1024 * 1024
# The driver is started at the production log level (DriverProcess defaults
# to debug); the last --log-level wins.
DRIVER_ARGS = ["--log-level", "info"]


@dataclass
class Env:
    workdir: Path
    zipapp: Path
    sizes: Sizes
    profile_dir: Path | None
    hello: Path = EXAMPLES / "hello"
    passthrough: Path = EXAMPLES / "passthrough"
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    kubelet_roots: list[Path] = field(default_factory=list)

    def dir(self, name: str, owner: int = 0) -> Path:
        """A fresh directory below the work dir (mode 0755, owned by `owner`)."""
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        os.chown(path, owner, owner)
        return path


def build_artifacts(workdir: Path) -> Path:
    """Build the zipapp into the work dir and libfuse's examples into build/; the zipapp."""
    zipapp = workdir / "fusermount3"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_zipapp.py"), "-o", str(zipapp)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build_fuse_examples.sh"), str(EXAMPLES)],
        check=True,
        capture_output=True,
    )
    return zipapp


@contextlib.contextmanager
def simulated_node(env: Env, name: str, **node_args: Any) -> Iterator[Node]:
    workdir = env.dir(f"node-{name}")
    with Node(workdir, env.zipapp, driver_args=DRIVER_ARGS, **node_args) as node:
        env.kubelet_roots.append(node.root.path)
        yield node


def socket_dir(node: Node, volume: FuseVolume) -> Path:
    """The native-mode broker socket directory of a FUSE volume, on the host."""
    path = node.driver.state_dir / "sockets" / volume.pod.uid / volume.name
    assert (path / NATIVE_SOCKET_NAME).exists(), path
    return path


def pod_cgroup_procs(node: Node, pod: Pod) -> str:
    """The cgroup.procs file of a pod's cgroup, if the node checks broker peers by cgroup.

    kubelet runs a pod's containers in a cgroup named after the pod UID and
    the driver's broker (--peer-check cgroup) serves only processes in it;
    programs started for a volume join its pod's cgroup like a container would.
    """
    if not getattr(node, "pod_cgroups", False):
        return ""
    from e2e.podcgroup import pod_cgroup  # noqa: PLC0415

    return str(pod_cgroup(pod.uid))


def driver_log_durations(node: Node, msg: str) -> list[float]:
    """duration_ms of the driver's log lines with this message (RPCs and broker audit lines)."""
    return [
        float(str(e["duration_ms"]))
        for e in node.driver.log_entries()
        if e.get("msg") == msg and "duration_ms" in e
    ]


def read_hello(target: Path) -> bool:
    """Whether libfuse's hello serves its file through this mount."""
    try:
        return (target / "hello").read_bytes() == HELLO_TEXT
    except OSError:
        return False


def unpublish_all(node: Node, workers: int = 8) -> None:
    """Unpublish every volume of the node in parallel (Node.__exit__ does it serially)."""
    published = list(node._published)

    def one(item: tuple[Pod, str]) -> None:
        node.kubelet.unpublish(*item, strict=False)
        with contextlib.suppress(ValueError):
            node._published.remove(item)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, published))


def fuse_mounts_below(*tops: Path) -> list[str]:
    """Every mount on or below these paths, as "mount point (fstype)": what a run left behind."""
    prefixes = tuple(str(t).rstrip("/") + "/" for t in tops)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4].startswith(prefixes) or fields[4] in {str(t) for t in tops}:
                found.append(f"{fields[4]} ({fields[fields.index('-') + 1]})")
    return found
