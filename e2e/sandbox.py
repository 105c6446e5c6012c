"""Run "containers" the way an unprivileged pod would, without a container runtime.

A container is `unshare --mount --propagation slave --pid --fork --kill-child
--mount-proc --ipc` running `e2e/sandbox_init.py`, which builds the container's
view and then execs the program as an unprivileged user:

* a mount namespace copied from the host's with every mount made a slave
  (runc's prepareRoot makes "/" rslave the same way); nothing propagates
  back out;
* volume binds made when the container starts, as containerd (CRI
  WithMounts) and runc (mountToRootfs, mountPropagate) make them: an rbind of
  the host path, then `rprivate` (mountPropagation None, Kubernetes' default)
  or `rslave` (HostToContainer), then a read-only remount if asked. The
  source resolves to the topmost mount at that moment, so a container started
  after a FUSE mount holds a copy of that FUSE mount (with no propagation tie
  under None), and one started before holds a bind of the plain directory,
  which sees later mounts only with HostToContainer;
* before that, the runtime's own checks on the host (containerd's WithMounts):
  a stat of every bind source, which fails the creation on anything but
  ENOENT ("failed to stat ...: transport endpoint is not connected" for a
  dead FUSE mount) and creates a missing one; and for HostToContainer, that
  the mount holding the source is shared or a slave (ensureSharedOrSlave).
  The failure is a `ContainerCreateError`, raised before anything runs;
* host paths given as `hide_host_paths` (the kubelet root) detached from the
  container's view once its binds are made: a runc container has
  pivot_root'ed away from the host's mount tree;
* PID namespace with its own /proc; the program is PID 1, as in a pod;
* IPC namespace and a private /dev: tmpfs with null, zero, full, random,
  urandom and tty bound from the host, /dev/shm, the /dev/fd symlinks, and
  **/dev/fuse as a bind of /dev/null** — libfuse's open("/dev/fuse") works, its
  own mount(2) fails with EPERM, so it falls back to the fusermount3 helper
  (`dummy_dev_fuse=False`: no /dev/fuse at all, as in a real restricted pod);
* the device nodes a device plugin's Allocate returned (`devices`, kubelet's
  DeviceSpecs), made as containerd and runc make them: the host node's type,
  numbers, mode and owner (containerd's DeviceFromPath), created with mknod
  at the container path (runc's createDeviceNode). A real /dev/fuse there
  replaces the dummy. With `device_ownership_from_security_context` (the
  containerd CRI option of that name) the node belongs to the pod's uid and
  gid instead, which a non-root pod needs where the host's /dev/fuse is 0600
  (no udev rule making it 0666, as on this machine). The cgroup device rule
  ("rw") is not modelled: the sandbox has no device cgroup;
* the given zipapp bound read-only over /usr/bin/fusermount3 (and every other
  helper name in FUSERMOUNT_PATHS that resolves to a distinct file; on this
  Debian /bin is a symlink to usr/bin and fusermount is a symlink to
  fusermount3, so there is one bind, and a second over mergerfs's
  /usr/bin/mergerfs-fusermount where the mergerfs package is installed);
* private tmpfs on /tmp and /run (configurable), so volume binds can be made
  at container paths that do not exist on the host, below those;
* volume binds {container path: host path}, recursive, created on top of the
  tmpfs mounts above or onto paths that already exist; a container path
  whose creation would write to the host is refused;
* then one exec of util-linux's setpriv (`e2e.privileges.as_pod_user`), which
  becomes uid/gid (default 65534) with no supplementary groups, empty
  capability sets including the bounding and ambient sets and no_new_privs,
  and execs the program.

`binds` and `ro_binds` are made with the `propagation` given to PodSandbox,
HostToContainer unless told otherwise (what the existing callers assume);
`mounts` (CRI mounts, as kubelet's makeMounts builds them, see e2e.pods)
carry their own, None by default as in a pod spec.

The rest of the host filesystem stays visible, read/write as far as uid
65534's permissions go: this is isolation for realism, not for security. In
particular /root is mode 0700 here, so the project's venv Python
(/root/.pyenv/...) cannot run inside a container; /usr/bin/python3 can.
Programs and files that live under unreachable paths must be bound in: a
bind only needs the file itself to be readable, not the host path leading
to it.

Signals: `Container.terminate()`/`send_signal()` reach the container's PID 1
(`unshare` itself ignores SIGTERM and SIGINT). As in a pod, PID 1 only
reacts to signals it has a handler for. `Container.kill()` SIGKILLs PID 1,
which makes the kernel kill everything else in the PID namespace.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from csi_async.mount.mountinfo import MountEntry, read_mountinfo
from e2e import privileges, sandbox_init

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TMPFS = ("/tmp", "/run")
# Every name FUSE programs exec their helper by (fusermount3_proxy/names.py),
# where images have it: mergerfs looks in /usr/local/bin first, then PATH.
FUSERMOUNT_PATHS = (
    "/usr/bin/fusermount3",
    "/usr/bin/fusermount",
    "/bin/fusermount3",
    "/bin/fusermount",
    "/usr/local/bin/mergerfs-fusermount",
    "/usr/bin/mergerfs-fusermount",
)
NOBODY = 65534
# How long spawn() waits for a container to be set up before returning anyway.
READY_TIMEOUT = 30.0
SANDBOX_INIT = Path(sandbox_init.__file__).resolve()

# Exit statuses of a container that never got to exec its program.
EXIT_SETUP_FAILED = sandbox_init.EXIT_SETUP_FAILED
EXIT_NOT_EXECUTABLE = sandbox_init.EXIT_NOT_EXECUTABLE
EXIT_NOT_FOUND = sandbox_init.EXIT_NOT_FOUND

# volumeMounts[].mountPropagation values, and the runc options containerd
# turns them into (kubelet's translateMountPropagation maps an unset field
# and "None" to PROPAGATION_PRIVATE). Bidirectional needs a privileged
# container and a shared source; this emulator does not model it.
NONE = "None"
HOST_TO_CONTAINER = "HostToContainer"
RUNC_PROPAGATION = {NONE: sandbox_init.RPRIVATE, HOST_TO_CONTAINER: sandbox_init.RSLAVE}


def runc_propagation(mount_propagation: str | None) -> str:
    """The OCI mount option for a volumeMount's mountPropagation (None when unset)."""
    try:
        return RUNC_PROPAGATION[mount_propagation or NONE]
    except KeyError:
        raise ValueError(
            f"mountPropagation {mount_propagation!r} is not modelled (None or HostToContainer)"
        ) from None


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a ContainerAllocateResponse (v1beta1 DeviceSpec), as kubelet passes it on."""

    container_path: str
    host_path: str
    permissions: str


def _device_node(device: DeviceSpec) -> sandbox_init.DeviceNodeSpec:
    """containerd's DeviceFromPath: what the host node is, to be made at the container path."""
    st = os.stat(device.host_path)
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        raise ValueError(f"device {device.host_path} is not a device node")
    if not device.permissions or set(device.permissions) - set("rwm"):
        raise ValueError(f"device permissions {device.permissions!r} are not r, w, m")
    return {
        "path": device.container_path, "type": kind,
        "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
        "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
    }  # fmt: skip


@dataclass(frozen=True)
class Mount:
    """A CRI Mount (runtime.v1.Mount) as kubelet's makeMounts hands it to the runtime."""

    container_path: str
    host_path: Path | str
    readonly: bool = False
    # mountPropagation of the volumeMount: None (the default) or HostToContainer.
    propagation: str = NONE


class ContainerCreateError(Exception):
    """The runtime refused to create the container (kubelet: CreateContainerError).

    The message is containerd's; `errno` is set when a syscall failed (the
    stat of a bind source).
    """

    def __init__(self, message: str, err: int = 0, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.errno = err
        self.path = path


def _wait_readable(fd: int, timeout: float) -> None:
    """Until fd has data or EOF (the writer closed it), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            return


def _go_strerror(err: int) -> str:
    # Go's syscall error strings are the C ones, lower-cased.
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


def _mount_holding(path: str, table: list[MountEntry]) -> MountEntry | None:
    """containerd's LookupMount: the mount whose mount point is the longest prefix of path."""
    best: MountEntry | None = None
    for entry in table:
        point = entry.mount_point
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = entry
    return best


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _all_pids() -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def pids_in_pidns(ns: tuple[int, int]) -> list[int]:
    """Host PIDs of all live (non-zombie) processes in the PID namespace `ns` = (st_dev, st_ino)."""
    found = []
    for pid in _all_pids():
        try:
            st = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ns:
            fields = _stat_fields(pid)
            if fields is not None and fields[0] != "Z":
                found.append(pid)
    return found


class Container(subprocess.Popen[Any]):
    """A container: the Popen is `unshare`, whose only child is the container's PID 1."""

    # The runtime's id for it (64 hex digits, as containerd's).
    container_id: str = ""
    _init_pid: int | None = None
    _pidns: tuple[int, int] | None = None
    # Held open so the namespace's inode number cannot be handed to a newer
    # container while we still compare against it (nsfs recycles numbers).
    _pidns_fd: int | None = None

    def init_pid(self, timeout: float = 5.0) -> int | None:
        """Host PID of the container's PID 1; None once the container is gone."""
        deadline = time.monotonic() + timeout
        while self._init_pid is None:
            if self.poll() is not None:
                return None
            for pid in (p for p in _all_pids() if _ppid(p) == self.pid):
                try:
                    ns_fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue  # exited already; `unshare` is about to follow
                st = os.fstat(ns_fd)
                self._pidns_fd = ns_fd
                self._pidns = (st.st_dev, st.st_ino)
                self._init_pid = pid
                break
            else:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"unshare (pid {self.pid}) did not fork the container")
                time.sleep(0.005)
        return self._init_pid

    @property
    def pidns(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the container's PID namespace."""
        self.init_pid()
        return self._pidns

    def processes(self) -> list[int]:
        """Host PIDs of everything still running in this container."""
        ns = self.pidns
        return [] if ns is None else pids_in_pidns(ns)

    def _signal_init(self, sig: int) -> bool:
        """Signal PID 1 without racing against PID reuse."""
        if self.returncode is not None:
            return False
        pid = self.init_pid()
        if pid is None:
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            # `unshare` is our unreaped child, so its PID cannot have been
            # reused; a process whose parent it is must be the container.
            if _ppid(pid) != self.pid:
                return False
            signal.pidfd_send_signal(pidfd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    def send_signal(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self._signal_init(sig)
            super().send_signal(sig)
        else:
            self._signal_init(sig)

    def stop(self, grace: float = 10.0) -> int:
        """kubelet-style stop: SIGTERM to PID 1, SIGKILL after `grace` seconds."""
        self.terminate()
        try:
            return self.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait()

    def wait_gone(self, timeout: float = 10.0) -> None:
        """Wait until `unshare` has exited and the PID namespace is empty."""
        ns = self.pidns if self.returncode is None else self._pidns
        self.wait(timeout)
        deadline = time.monotonic() + timeout
        while ns is not None and pids_in_pidns(ns):
            if time.monotonic() > deadline:
                left = [_describe(pid) for pid in pids_in_pidns(ns)]
                raise TimeoutError(f"processes left in container {self.pid}: {left}")
            time.sleep(0.01)
        if self._pidns_fd is not None:
            os.close(self._pidns_fd)
            self._pidns_fd = None


def _describe(pid: int) -> str:
    """pid, command, state and kernel wait channel: why a process will not die."""
    parts = [str(pid)]
    for name in ("cmdline", "wchan"):
        try:
            parts.append(Path(f"/proc/{pid}/{name}").read_text().replace("\0", " ").strip())
        except OSError:
            parts.append("?")
    fields = _stat_fields(pid)
    parts.append(f"state={fields[0] if fields else '?'} ppid={fields[1] if fields else '?'}")
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        parts += [line for line in status.splitlines() if line.startswith(("SigPnd", "ShdPnd",
                  "SigBlk", "NSpid", "Threads"))]  # fmt: skip
    except OSError:
        pass
    return " | ".join(parts)


class PodSandbox:
    """A pod: containers sharing one set of binds, user and environment.

    Each `spawn` is a separate container (own mount and PID namespace), like
    the containers of a pod without shareProcessNamespace, and makes its
    binds afresh, as a container runtime does for each container it creates.
    """

    def __init__(
        self,
        binds: Mapping[str, Path | str] | None,
        zipapp: Path | str,
        uid: int = NOBODY,
        gid: int = NOBODY,
        env: Mapping[str, str] | None = None,
        *,
        ro_binds: Mapping[str, Path | str] | None = None,
        mounts: Sequence[Mount] = (),
        propagation: str = HOST_TO_CONTAINER,
        hide_host_paths: Sequence[Path | str] = (),
        tmpfs: Sequence[str] = DEFAULT_TMPFS,
        cwd: str = "/",
        umask: int = 0o022,
        die_with_parent: bool = False,
        cgroup_procs: str = "",
        devices: Sequence[DeviceSpec] = (),
        dummy_dev_fuse: bool = True,
        device_ownership_from_security_context: bool = False,
    ) -> None:
        """`binds`/`ro_binds` use `propagation` (HostToContainer by default);
        `mounts` carry their own (None by default, as in a pod spec).

        `die_with_parent` SIGKILLs a container when the *thread* that spawned
        it exits (`e2e.privileges.dying_with_parent`), so a test runner that is
        itself SIGKILLed leaves no containers; do not use it when spawning from
        short-lived threads.
        """
        self.uid = uid
        self.gid = gid
        self.cgroup_procs = cgroup_procs
        self.devices = [_device_node(device) for device in devices]
        if device_ownership_from_security_context:
            for node in self.devices:
                node["uid"], node["gid"] = uid, gid
        self.dummy_dev_fuse = dummy_dev_fuse
        self.cwd = cwd
        self.umask = umask
        self.tmpfs = [self._container_path(t) for t in tmpfs]
        self.env = {"PATH": DEFAULT_PATH, "HOME": "/", "LANG": "C.UTF-8", **(env or {})}
        self.zipapp = Path(zipapp).resolve()
        self._check_zipapp()
        self.hide = [os.path.realpath(p) for p in hide_host_paths]
        self.binds: list[sandbox_init.BindSpec] = []
        # The CRI mounts: a missing source is created, a HostToContainer
        # source must be on a shared or slave mount (check_mounts).
        self.mounts: list[Mount] = []
        self._cri_sources: set[str] = set()
        runc_propagation(propagation)  # validate it
        requested = [
            *((Mount(dst, src, False, propagation), False) for dst, src in (binds or {}).items()),
            *((Mount(dst, src, True, propagation), False) for dst, src in (ro_binds or {}).items()),
            *((mount, True) for mount in mounts),
        ]
        for mount, is_cri in requested:
            host = Path(mount.host_path).resolve()
            # Only ENOENT means missing (a dead FUSE mount fails lstat with
            # ENOTCONN: check_mounts reports that when the container is
            # created). A missing CRI mount source is created then, as
            # containerd does; a missing bind is the caller's mistake.
            try:
                os.lstat(host)
            except FileNotFoundError:
                if not is_cri:
                    raise FileNotFoundError(f"bind source {host} does not exist (ENOENT)") from None
            except OSError:
                pass
            if is_cri:
                self.mounts.append(
                    Mount(mount.container_path, host, mount.readonly, mount.propagation)
                )
                self._cri_sources.add(str(host))
            self.binds.append(
                {
                    "dst": self._container_path(mount.container_path),
                    "src": str(host),
                    "readonly": mount.readonly,
                    "propagation": runc_propagation(mount.propagation),
                }
            )
        for target in self._fusermount_targets():
            # Part of the image, not a volume.
            self.binds.append(
                {"dst": target, "src": str(self.zipapp), "readonly": True,
                 "propagation": sandbox_init.RPRIVATE}
            )  # fmt: skip
        unshare = shutil.which("unshare")
        if unshare is None:
            raise FileNotFoundError("unshare (util-linux) is not installed")
        self._unshare = unshare
        self._drop_privileges = privileges.as_pod_user(uid, gid)
        self._dying_with_parent = privileges.dying_with_parent() if die_with_parent else []
        self.containers: list[Container] = []

    @staticmethod
    def _container_path(path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"container path {path!r} must be absolute")
        return os.path.normpath(path)

    def _check_zipapp(self) -> None:
        st = self.zipapp.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"zipapp {self.zipapp} is not a regular file")
        owner = st.st_uid == self.uid
        needed = stat.S_IRUSR | stat.S_IXUSR if owner else stat.S_IROTH | stat.S_IXOTH
        if st.st_mode & needed != needed:
            raise PermissionError(
                f"zipapp {self.zipapp} (mode {stat.filemode(st.st_mode)}) must be readable and "
                f"executable by uid {self.uid}; chmod a+rx it"
            )

    @staticmethod
    def _fusermount_targets() -> list[str]:
        # mount(2) follows symlinks in the target, so binding over a symlink
        # would bind over its target again; bind each distinct file once.
        targets: list[str] = []
        for name in FUSERMOUNT_PATHS:
            if os.path.lexists(name):
                real = os.path.realpath(name)
                if os.path.isfile(real) and real not in targets:
                    targets.append(real)
        if not targets:
            # Creating /usr/bin/fusermount3 would modify the host.
            raise FileNotFoundError("no fusermount3 on the host to bind the zipapp over")
        return targets

    def spec(self, argv: Sequence[str], ready_fd: int = -1) -> sandbox_init.Spec:
        if not argv:
            raise ValueError("empty argv")
        return {
            "argv": list(argv),
            "env": dict(self.env),
            "drop_privileges": list(self._drop_privileges),
            "cwd": self.cwd,
            "umask": self.umask,
            "tmpfs": list(self.tmpfs),
            "binds": list(self.binds),
            "devices": list(self.devices),
            "dummy_dev_fuse": self.dummy_dev_fuse,
            "cgroup_procs": self.cgroup_procs,
            "hide": list(self.hide),
            "ready_fd": ready_fd,
        }

    def check_mounts(self, container_id: str = "") -> None:
        """What containerd's WithMounts does on the host before the container exists.

        Every bind source is stat()ed (following symlinks, as os.Stat does);
        any error but ENOENT fails the creation. A missing CRI mount source is
        created (MkdirAll 0755); a missing plain bind is left for the
        container's setup to report (exit 125). A HostToContainer source must
        sit on a shared or slave mount. Raises ContainerCreateError with
        containerd's message.
        """
        container_id = container_id or uuid.uuid4().hex + uuid.uuid4().hex
        prefix = f'failed to generate container "{container_id}" spec: failed to generate spec: '
        for bind in self.binds:
            src = bind["src"]
            try:
                os.stat(src)
            except FileNotFoundError:
                if src not in self._cri_sources:
                    continue
                try:
                    os.makedirs(src, 0o755, exist_ok=True)
                except OSError as e:
                    raise ContainerCreateError(
                        f'{prefix}failed to mkdir "{src}": mkdir {src}: '
                        f"{_go_strerror(e.errno or errno.EIO)}",
                        e.errno or errno.EIO, src,
                    ) from None  # fmt: skip
            except OSError as e:
                err = e.errno or errno.EIO
                raise ContainerCreateError(
                    f'{prefix}failed to stat "{src}": stat {src}: {_go_strerror(err)}', err, src
                ) from None
        table: list[MountEntry] | None = None
        for mount in self.mounts:
            if mount.propagation != HOST_TO_CONTAINER:
                continue
            table = table if table is not None else read_mountinfo()
            src = str(mount.host_path)
            holder = _mount_holding(src, table)
            if holder is None or not (holder.shared or holder.slave):
                where = holder.mount_point if holder is not None else "?"
                raise ContainerCreateError(
                    f'{prefix}path "{src}" is mounted on "{where}" but it is not a shared '
                    "or slave mount", 0, src,
                )  # fmt: skip

    def command(self, argv: Sequence[str], ready_fd: int = -1) -> list[str]:
        """The host command line that runs `argv` in a new container."""
        return [
            *self._dying_with_parent,
            self._unshare,
            "--mount",
            "--propagation",
            "slave",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--ipc",
            sys.executable,
            "-I",
            "-S",
            str(SANDBOX_INIT),
            json.dumps(self.spec(argv, ready_fd)),
        ]

    def spawn(
        self, argv: Sequence[str], *, container_id: str = "", **popen_kwargs: Any
    ) -> Container:
        """Create and start a container: the runtime's checks (check_mounts, which
        raises ContainerCreateError), then the container, whose binds are
        resolved as it starts. Takes subprocess.Popen's keyword arguments
        except env."""
        if "env" in popen_kwargs:
            raise TypeError("pass the container environment to PodSandbox(env=...)")
        if not argv:
            raise ValueError("empty argv")
        container_id = container_id or uuid.uuid4().hex + uuid.uuid4().hex
        self.check_mounts(container_id)
        ready_r, ready_w = os.pipe()
        try:
            pass_fds = (*popen_kwargs.pop("pass_fds", ()), ready_w)
            container = Container(
                self.command(argv, ready_w),
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                pass_fds=pass_fds,
                **popen_kwargs,
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        container.container_id = container_id
        self.containers.append(container)
        try:
            # Learn PID 1 (and so the PID namespace) now, while `unshare` is
            # certainly alive, so that cleanup can always verify it emptied.
            container.init_pid()
            # Like the runtime's StartContainer, return once the container's
            # mounts are made (or its setup failed: it then exits 125).
            _wait_readable(ready_r, READY_TIMEOUT)
        finally:
            os.close(ready_r)
        return container

    def run(
        self,
        argv: Sequence[str],
        timeout: float | None = 60.0,
        input: bytes | str | None = None,
        check: bool = False,
        capture_output: bool = False,
        **popen_kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run() for a container; on timeout the container is killed."""
        if capture_output:
            popen_kwargs.setdefault("stdout", subprocess.PIPE)
            popen_kwargs.setdefault("stderr", subprocess.PIPE)
        if input is not None:
            popen_kwargs["stdin"] = subprocess.PIPE
        with self.spawn(argv, **popen_kwargs) as container:
            try:
                stdout, stderr = container.communicate(input, timeout=timeout)
            except BaseException:
                container.kill()
                container.wait()
                raise
            rc = container.wait()
        self.containers.remove(container)
        result = subprocess.CompletedProcess(list(argv), rc, stdout, stderr)
        if check:
            result.check_returncode()
        return result

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every container started here and wait until their processes are gone."""
        errors: list[BaseException] = []
        for container in self.containers:
            try:
                container.kill()
                container.wait_gone(timeout)
            except (OSError, TimeoutError, subprocess.TimeoutExpired) as e:
                errors.append(e)
            for stream in (container.stdin, container.stdout, container.stderr):
                if stream is not None:
                    stream.close()
        self.containers.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> PodSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()
