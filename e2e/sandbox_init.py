"""First process of a PodSandbox container: set up mounts, then exec the program unprivileged.

`e2e.sandbox.PodSandbox` runs this as

    unshare --mount --propagation slave --pid --fork --kill-child --mount-proc --ipc \
        <python> -I -S e2e/sandbox_init.py <json spec>

so it starts as root, as PID 1 of a fresh PID namespace, in a mount namespace
whose mounts are all slaves of (or private copies of) the host's: runc's
prepareRoot, which makes "/" rslave before it sets up the container's mounts.
It is run as a plain script in isolated mode, so it must stay standard-library
only and import nothing from this package. `e2e.hostenv` reuses its syscall
wrappers.

Each volume bind is made as runc's mountToRootfs makes a "bind" mount from the
OCI spec containerd's WithMounts writes: mount(source, dest, MS_BIND|MS_REC),
then the propagation option (rprivate for mountPropagation None, rslave for
HostToContainer) applied with MS_REC, then a remount for "ro". The source is
resolved here, when the container starts: a path with a FUSE mount on it gives
a bind of that FUSE mount itself.

Host paths listed in `hide` (the kubelet root) are detached from the
container's mount namespace once the binds are made: a runc container has
pivot_root'ed away from the host's mount tree, so it holds no copy of the
kubelet root or of other pods' mounts, only its own binds.

The last step is one exec: of the spec's `drop_privileges` command
(`e2e.privileges.as_pod_user`, util-linux's setpriv) followed by the
program. setpriv becomes the pod's user with no capabilities and
no_new_privs, then execs the program: the program never runs privileged,
and no code of ours runs between the drop and the program. The working
directory and umask are set before, as root (runc, too, tries the chdir as
root first), and the ready byte is written just before that exec, so the
container counts as started while setpriv drops, before the program runs.

Exit status when the program could not be started: 125 (setup failed), 126
(found but not executable), 127 (not found) — the same convention as
podman/docker, and setpriv's.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import stat
import sys
from typing import TypedDict

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

EXIT_SETUP_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

# Character devices a container runtime gives every container. /dev/fuse is
# added separately: a bind of /dev/null (the stand-in pods used before the
# device plugin) unless the spec has no dummy, or a real device for it.
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


# runc's propagation options (the OCI mount options containerd writes).
RPRIVATE = "rprivate"
RSLAVE = "rslave"
PROPAGATION_FLAGS = {RPRIVATE: MS_REC | MS_PRIVATE, RSLAVE: MS_REC | MS_SLAVE}


class BindSpec(TypedDict):
    dst: str
    src: str
    readonly: bool
    # RPRIVATE or RSLAVE.
    propagation: str


class DeviceNodeSpec(TypedDict):
    """A device node as runc creates it from the OCI spec's linux.devices (mknod)."""

    path: str
    # "c" or "b", the host node's major and minor, its mode bits, owner and group.
    type: str
    major: int
    minor: int
    mode: int
    uid: int
    gid: int


class Spec(TypedDict):
    argv: list[str]
    env: dict[str, str]
    # The command that becomes the pod's user and execs the rest of its
    # command line (argv): e2e.privileges.as_pod_user(uid, gid).
    drop_privileges: list[str]
    cwd: str
    umask: int
    tmpfs: list[str]
    binds: list[BindSpec]
    # Device nodes a device plugin's Allocate asked for (kubelet's DeviceSpecs).
    devices: list[DeviceNodeSpec]
    # Whether /dev/fuse is a bind of /dev/null when no device is put there.
    dummy_dev_fuse: bool
    # cgroup.procs file to join before the program starts, as a container
    # of a pod runs in that pod's cgroup; "" for none.
    cgroup_procs: str
    # Host mount points to detach from the container's view (see above).
    hide: list[str]
    # Written to (one byte) and closed once the container is set up, just
    # before the exec (of drop_privileges), like runc's exec fifo; -1 for none.
    ready_fd: int


class SetupError(Exception):
    """The sandbox could not be built as specified."""


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2)."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        _raise_errno(f"mount {source!r} on {target!r}")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    if _libc.umount2(_b(target), flags) != 0:
        _raise_errno(f"umount {target!r}")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, per-mount options, fstype) for each line of our mountinfo."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            sep = fields.index("-", 6)
            result.append((_unescape(fields[4]), fields[5], fields[sep + 1]))
    return result


def _owning_mount_point(path: str) -> str:
    """Mount point of the mount that contains `path` (which must exist)."""
    best = "/"
    for mount_point, _, _ in _mounts():
        if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(
            mount_point
        ) >= len(best):
            best = mount_point
    return best


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _ensure_mountpoint(dst: str, is_dir: bool, private: set[str]) -> None:
    if os.path.lexists(dst):
        return
    # Creating the mount point must never write to the host: only create it if
    # the missing part hangs off one of this sandbox's own tmpfs mounts (and
    # not off a bind of a host directory that happens to be below it).
    anchor = _nearest_existing(dst)
    owner = _owning_mount_point(os.path.realpath(anchor))
    if owner not in private:
        raise SetupError(
            f"{dst} does not exist, and creating it would write to {owner!r} "
            f"outside the sandbox; bind onto an existing path or below one of {sorted(private)}"
        )
    parent = os.path.dirname(dst)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if is_dir:
        os.mkdir(dst, 0o755)
    else:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))


def _remount_readonly(dst: str) -> None:
    # A bind remount replaces all per-mount flags, so keep the ones the bind
    # inherited from its source.
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    options = ""
    for mount_point, opts, _ in _mounts():
        if mount_point == dst:
            options = opts
    for name, bit in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC)):
        if name in options.split(","):
            flags |= bit
    mount(None, dst, None, flags)


def _bind_fd(fd: int, dst: str, recursive: bool = True) -> None:
    # Binding from /proc/self/fd/N uses the file opened before any tmpfs was
    # mounted, so host paths under /tmp or /run stay reachable as sources.
    mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | (MS_REC if recursive else 0))


def _set_propagation(dst: str, propagation: str) -> None:
    """runc's mountPropagate: the propagation option, applied after the bind."""
    try:
        flags = PROPAGATION_FLAGS[propagation]
    except KeyError:
        raise SetupError(f"unknown propagation {propagation!r} for {dst}") from None
    mount(None, dst, None, flags)


def _open_hidden(paths: list[str]) -> list[int]:
    """O_PATH fds of the mounts to detach later, taken before /tmp and /run are covered."""
    mount_points = {mount_point for mount_point, _, _ in _mounts()}
    fds = []
    for path in paths:
        if path in mount_points:
            fds.append(os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY))
    return fds


def _detach_hidden(fds: list[int]) -> None:
    # Through the fd: the path itself may be covered by the tmpfs on /tmp now.
    # The copies are slaves of the host's mounts, so nothing propagates back.
    for fd in fds:
        umount2(f"/proc/self/fd/{fd}", MNT_DETACH)
        os.close(fd)


def _make_device(device: DeviceNodeSpec) -> None:
    # runc's createDeviceNode (no user namespace): mknod with the host node's
    # numbers and mode, then chown to its owner. Only below /dev, as a pod's
    # devices are.
    path = os.path.normpath(device["path"])
    if not path.startswith("/dev/") or path.count("/") != 2:
        raise SetupError(f"device path {device['path']} is not a file directly in /dev")
    kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[device["type"]]
    os.mknod(path, kind | (device["mode"] & 0o777), os.makedev(device["major"], device["minor"]))
    os.chmod(path, device["mode"] & 0o777)  # mknod applied the umask
    os.chown(path, device["uid"], device["gid"])


def _setup_dev(
    dev_fds: dict[str, int], devices: list[DeviceNodeSpec], dummy_dev_fuse: bool
) -> None:
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    dummies = [("fuse", dev_fds["null"])] if dummy_dev_fuse else []
    if any(os.path.normpath(d["path"]) == "/dev/fuse" for d in devices):
        dummies = []
    for name, fd in [*dev_fds.items(), *dummies]:
        path = f"/dev/{name}"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        _bind_fd(fd, path, recursive=False)
    for device in devices:
        _make_device(device)
    os.mkdir("/dev/shm", 0o1777)
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    os.symlink("/proc/self/fd", "/dev/fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")


def setup(spec: Spec) -> None:
    """Build the container's mount namespace. Runs as root."""
    if os.getpid() != 1:
        raise SetupError("must run as PID 1 of a new PID namespace (unshare --pid --fork)")
    if os.geteuid() != 0:
        raise SetupError("must start as root")

    # Open every source before mounting anything: a tmpfs on /tmp or /run would
    # otherwise hide host paths below them.
    dev_fds = {n: os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC) for n in DEV_NODES}
    sources: list[tuple[BindSpec, int, bool]] = []
    for bind in spec["binds"]:
        try:
            fd = os.open(bind["src"], os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise SetupError(f"bind source {bind['src']}: {e.strerror}") from e
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        except OSError as e:
            raise SetupError(f"bind source {bind['src']}: {e.strerror}") from e
        sources.append((bind, fd, is_dir))
    hidden = _open_hidden(spec.get("hide", []))

    private = {"/dev"}
    for target in spec["tmpfs"]:
        if not os.path.isdir(target):
            raise SetupError(f"tmpfs target {target} is not an existing directory")
        mode = "1777" if target == "/tmp" else "755"
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=256m")
        private.add(target)

    _setup_dev(dev_fds, spec.get("devices", []), spec.get("dummy_dev_fuse", True))

    # Parents before children, so a bind below another bind lands on top of it.
    for bind, fd, is_dir in sorted(sources, key=lambda s: s[0]["dst"].rstrip("/").count("/")):
        dst = bind["dst"]
        _ensure_mountpoint(dst, is_dir, private)
        _bind_fd(fd, dst)
        _set_propagation(dst, bind.get("propagation", RSLAVE))
        if bind["readonly"]:
            _remount_readonly(dst)
        os.close(fd)
    for fd in dev_fds.values():
        os.close(fd)
    _detach_hidden(hidden)


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and ignored dispositions survive
    # execve; a container process must start with defaults.
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _signal_ready(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: sandbox_init.py <json spec>", file=sys.stderr)
        return EXIT_SETUP_FAILED
    try:
        spec: Spec = json.loads(argv[1])
        if spec["cgroup_procs"]:
            with open(spec["cgroup_procs"], "w", encoding="ascii") as procs:
                procs.write("0")  # "0" means the writing process itself
        setup(spec)
        os.umask(spec["umask"])
        os.chdir(spec["cwd"])
        if not spec["drop_privileges"]:
            raise SetupError("no drop_privileges command: a container's program never runs as root")
        command = [*spec["drop_privileges"], *spec["argv"]]
        _reset_signals()
        _signal_ready(spec.get("ready_fd", -1))
    except (OSError, SetupError, KeyError, ValueError) as e:
        print(f"sandbox_init: {e}", file=sys.stderr, flush=True)
        return EXIT_SETUP_FAILED
    # setpriv looks the program up in the PATH of this environment, and
    # reports a missing or non-executable program itself (127, 126).
    try:
        os.execvpe(command[0], command, spec["env"])
    except FileNotFoundError as e:
        print(f"sandbox_init: exec {command[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return EXIT_NOT_FOUND
    except OSError as e:
        print(f"sandbox_init: exec {command[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return EXIT_NOT_EXECUTABLE


if __name__ == "__main__":
    sys.exit(main(sys.argv))
