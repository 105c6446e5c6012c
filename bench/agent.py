"""The benchmarks' process spawner, living in its own mount namespace.

bench/agent_client.py starts it, from the repository's root, as

    setpriv --pdeathsig=KILL -- unshare --mount --propagation slave \
        <python> -E -s -S -m bench.agent '<json config>'

so it is root in a mount namespace whose mounts are slaves of the host's: a
FUSE mount the driver makes on a kubelet target propagates in, and what the
agent changes here (below) never reaches the host. Standard library only.

Set-up, per config:
- "zipapp": bind it over /usr/bin/fusermount3, so libfuse programs started
  here run our helper (like a pod image that ships it);
- "dev_fuse": "null" binds /dev/null over /dev/fuse (libfuse's own mount(2)
  then fails with EPERM and it falls back to the helper, as in a pod without
  /dev/fuse); "open" binds a fresh 0666 node 10:229 over it (the host's is
  0600 here, and the real setuid fusermount3 opens it with the caller's
  fsuid, so a non-root native mount needs it world-writable, as Debian ships it);
- "user_allow_other": a fuse.conf with user_allow_other over /etc/fuse.conf
  (the native helper then accepts allow_other from a non-root user).

Then it reads JSON commands, one per line, on stdin and answers one JSON
line each on stdout. Programs run as uid/gid 65534 with no supplementary
groups (through the config's "as_user" command,
e2e.privileges.as_user_with_setuid_helpers), in their pod's cgroup when one
is given (the driver's broker serves only processes whose cgroup names the
volume's pod, as kubelet places a pod's containers). A broker socket is
reached through an inherited O_PATH fd of its directory
("/proc/self/fd/N/fuse.sock"): the native socket directory is below the
driver's 0700 state dir, which uid 65534 cannot traverse, and this avoids a
bind per program. On EOF every child is killed; if the benchmark dies, the
parent-death signal kills the agent and then its children.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import minifuse

NOBODY = 65534
SOCKET_ENV = "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH"
PATH_FD_ENV = "BENCH_PATH_FD"
SYSTEM_PYTHON = "/usr/bin/python3"
NATIVE_FUSERMOUNT = "/usr/bin/fusermount3"
MS_BIND = 0x1000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
FUSE_DEV = os.makedev(10, 229)
MOUNT_WAIT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else os.fsencode(value)

    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool = False) -> None:
    mount(source, target, None, MS_BIND, None)
    if read_only:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def join_cgroup(cgroup_procs: str) -> None:
    """Move the calling process into a cgroup (a pod's, for the broker's peer check).

    The directory is made again if it is gone: e2e's Node removes every empty
    pod cgroup when it exits, including those of other runs on the machine.
    """
    os.makedirs(os.path.dirname(cgroup_procs), exist_ok=True)
    with open(cgroup_procs, "w", encoding="ascii") as procs:
        procs.write("0")


def set_up(config: dict[str, Any]) -> None:
    scratch = config["scratch"]
    if config.get("dev_fuse") or config.get("user_allow_other"):
        mount("tmpfs", scratch, "tmpfs", 0, "mode=755,size=1m")
    if config.get("dev_fuse") == "null":
        bind("/dev/null", "/dev/fuse")
    elif config.get("dev_fuse") == "open":
        node = os.path.join(scratch, "fuse")
        os.mknod(node, stat.S_IFCHR | 0o666, FUSE_DEV)
        # Whatever the umask said; this node only exists in this namespace.
        os.chmod(node, 0o666)  # noqa: S103
        bind(node, "/dev/fuse")
    if config.get("user_allow_other"):
        conf = os.path.join(scratch, "fuse.conf")
        with open(conf, "w", encoding="ascii") as f:
            f.write("user_allow_other\n")
        os.chmod(conf, 0o644)
        bind(conf, "/etc/fuse.conf", read_only=True)
    if config.get("zipapp"):
        bind(config["zipapp"], os.path.realpath(NATIVE_FUSERMOUNT), read_only=True)


def mountinfo_line(path: str) -> str | None:
    """The mountinfo line of the topmost mount on path; None if nothing is mounted there."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.split()[4] == path:
                found = line.strip()
    return found


def mounted_fstype(path: str) -> str | None:
    """The fstype of the topmost mount on path; None if nothing is mounted there."""
    line = mountinfo_line(path)
    if line is None:
        return None
    fields = line.split()
    return fields[fields.index("-") + 1]


def wait_mount(path: str, present: bool) -> None:
    deadline = time.monotonic() + MOUNT_WAIT
    while (mounted_fstype(path) is not None) != present:
        if time.monotonic() > deadline:
            state = "mounted" if present else "unmounted"
            raise RuntimeError(f"{path} not {state} within {MOUNT_WAIT} s")
        time.sleep(0.001)


def recv_fd(sock: socket.socket) -> int:
    """libfuse's receive_fd: one byte and one SCM_RIGHTS fd."""
    size = array.array("i").itemsize
    data, ancillary, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(size))
    for level, kind, cdata in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            return array.array("i", cdata[:size])[0]
    raise RuntimeError(f"the helper sent no fd (got {data!r})")


def shebang_argv(path: str, python_args: tuple[str, ...] = ()) -> list[str]:
    """The script itself, or with python_args what the kernel runs for its "#!" line plus them."""
    if not python_args:
        return [path]
    with open(path, "rb") as script:
        line = script.readline(256).rstrip(b"\n").removeprefix(b"#!").decode()
    interpreter, _, argument = line.partition(" ")
    return [interpreter, *python_args, *([argument] if argument else []), path]


class Agent:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.as_user: list[str] = config["as_user"]
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.log = open(config["log"], "ab")  # noqa: SIM115
        # P1's timed helpers become 65534 through Popen itself: a setpriv
        # exec would add its own start-up to every timed spawn.
        self.common: dict[str, Any] = {
            "user": NOBODY,
            "group": NOBODY,
            "extra_groups": [],
            "cwd": "/",
            "stdin": subprocess.DEVNULL,
            "stdout": self.log,
            "stderr": self.log,
        }

    # ------------------------------------------------------------ commands

    def spawn(self, cmd: dict[str, Any]) -> dict[str, Any]:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **cmd.get("env", {})}
        fds = []
        if cmd.get("socket_dir"):
            fds.append(os.open(cmd["socket_dir"], os.O_PATH | os.O_DIRECTORY))
            env[SOCKET_ENV] = f"/proc/self/fd/{fds[-1]}/fuse.sock"
        if cmd.get("path_fd"):
            fds.append(os.open(cmd["path_fd"], os.O_PATH | os.O_DIRECTORY))
            env[PATH_FD_ENV] = str(fds[-1])
        kwargs = {
            k: v for k, v in self.common.items() if k not in ("user", "group", "extra_groups")
        }
        if cmd.get("capture"):
            kwargs["stdout"] = subprocess.PIPE
        cgroup_procs = cmd.get("cgroup_procs") or ""
        # The pod's cgroup is joined in the forked child, as root (moving a
        # process needs write access to the cgroup, which 65534 lacks); the
        # agent is single-threaded while it spawns. setpriv then drops to
        # 65534 and execs the program.
        join = (lambda: join_cgroup(cgroup_procs)) if cgroup_procs else None
        try:
            child = subprocess.Popen(
                [*self.as_user, *cmd["argv"]],
                env=env,
                pass_fds=fds,
                preexec_fn=join,  # noqa: PLW1509
                **kwargs,
            )
        finally:
            for fd in fds:
                os.close(fd)
        self.children[cmd["key"]] = child
        return {"pid": child.pid}

    def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        child = self.children.pop(cmd["key"])
        try:
            out, _ = child.communicate(timeout=cmd.get("timeout", 120))
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
        return {"returncode": child.returncode, "stdout": (out or b"").decode(errors="replace")}

    def poll(self, cmd: dict[str, Any]) -> int | None:
        return self.children[cmd["key"]].poll()

    def exited(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {key: c.returncode for key, c in self.children.items() if c.poll() is not None}

    def signal_all(self, cmd: dict[str, Any]) -> dict[str, Any]:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(cmd.get("signal", signal.SIGTERM))
        deadline = time.monotonic() + cmd.get("timeout", 10)
        codes = {}
        for key, child in self.children.items():
            try:
                codes[key] = child.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                child.kill()
                codes[key] = child.wait()
        self.children.clear()
        return codes

    def wait_mount(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until something is (or nothing is) mounted on a path; its mountinfo line."""
        deadline = time.monotonic() + cmd.get("timeout", 30)
        while True:
            line = mountinfo_line(cmd["path"])
            if (line is not None) == cmd.get("present", True):
                return {"line": line}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd['path']}: still {'not ' if line is None else ''}mounted")
            time.sleep(0.005)

    def kill_all(self, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.signal_all({"signal": signal.SIGKILL, "timeout": 30})

    # ------------------------------------------------------------ P1

    def p1(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Interleaved: interpreter floor, zipapp + broker, native fusermount3.

        Each helper is spawned exactly as libfuse does it: a socketpair, the
        helper exec'd with _FUSE_COMMFD, the fd received with recvmsg, then
        the helper reaped (libfuse's fuse_kern_mount waits for it). Timed:
        spawn -> fd received, and spawn -> helper reaped.
        """
        zipapp, opts = cmd["zipapp"], cmd["options"]
        socket_dir = os.open(cmd["socket_dir"], os.O_PATH | os.O_DIRECTORY)
        ours_env = {SOCKET_ENV: f"/proc/self/fd/{socket_dir}/fuse.sock"}
        results: dict[str, list[float]] = {
            "floor": [],
            "ours_fd": [],
            "ours_exit": [],
            "native_fd": [],
            "native_exit": [],
        }

        def timed_spawn(
            argv: list[str], env: dict[str, str], expect_fd: bool = True, stderr: Any = None
        ) -> tuple[float, float, int | None]:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            kwargs = dict(self.common)
            if stderr is not None:
                kwargs["stderr"] = stderr
            with parent:
                full_env = {"PATH": "/usr/bin:/bin", "_FUSE_COMMFD": str(child.fileno()), **env}
                started = time.perf_counter()
                proc = subprocess.Popen(
                    argv, env=full_env, pass_fds=(child.fileno(), socket_dir), **kwargs
                )
                child.close()
                fd = recv_fd(parent) if expect_fd else None
                got_fd = time.perf_counter()
                code = proc.wait()
                reaped = time.perf_counter()
            if code != 0:
                if fd is not None:
                    os.close(fd)
                raise RuntimeError(f"{argv} exited with {code}")
            return (got_fd - started) * 1000, (reaped - started) * 1000, fd

        def plain(argv: list[str], env: dict[str, str]) -> None:
            code = subprocess.run(
                argv,
                env={"PATH": "/usr/bin:/bin", **env},
                pass_fds=(socket_dir,),
                check=False,
                **self.common,
            ).returncode
            if code != 0:
                raise RuntimeError(f"{argv} exited with {code}")

        def floor() -> None:
            _, reaped, _ = timed_spawn([SYSTEM_PYTHON, "-I", "-S", "-c", "pass"], {}, False)
            results["floor"].append(reaped)

        def ours(python_args: tuple[str, ...] = (), stderr: Any = None) -> None:
            # Exec'd as libfuse execs it, through its "#!" line.
            argv = [*shebang_argv(zipapp, python_args), "-o", opts, "--", cmd["mnt_ours"]]
            got_fd, reaped, fd = timed_spawn(argv, ours_env, stderr=stderr)
            assert fd is not None
            try:
                if mounted_fstype(cmd["target"]) is None:
                    raise RuntimeError(f"fd received but nothing is mounted on {cmd['target']}")
                if not python_args:
                    results["ours_fd"].append(got_fd)
                    results["ours_exit"].append(reaped)
                # Serve the connection, so the broker's liveness probe (sent
                # when the helper exits) is answered, then unmount the way
                # libfuse does at exit: through the helper, lazily.
                server = minifuse.serve_in_thread(fd)
                plain(
                    [SYSTEM_PYTHON, "-IS", zipapp, "-u", "-q", "-z", "--", cmd["mnt_ours"]],
                    ours_env,
                )
                server.join(MOUNT_WAIT)
            finally:
                os.close(fd)
            wait_mount(cmd["target"], present=False)

        def native() -> None:
            argv = [NATIVE_FUSERMOUNT, "-o", opts, "--", cmd["mnt_native"]]
            got_fd, reaped, fd = timed_spawn(argv, {})
            assert fd is not None
            try:
                if mounted_fstype(cmd["mnt_native"]) is None:
                    raise RuntimeError(f"fd received but nothing is mounted on {cmd['mnt_native']}")
                results["native_fd"].append(got_fd)
                results["native_exit"].append(reaped)
            finally:
                # Nobody serves it: abort the connection first, then unmount
                # the dead mount with the real helper, as the same user.
                os.close(fd)
            plain([NATIVE_FUSERMOUNT, "-u", "-q", "-z", "--", cmd["mnt_native"]], {})
            wait_mount(cmd["mnt_native"], present=False)

        variants = [floor, ours, native]
        report: dict[str, Any] = dict(results)
        try:
            for i in range(cmd["warmup"] + cmd["n"]):
                order = variants[i % 3 :] + variants[: i % 3]
                for variant in order:
                    variant()
                if i + 1 == cmd["warmup"]:
                    for samples in results.values():
                        samples.clear()
            if cmd.get("importtime"):
                # One more mount, untimed, with the interpreter's import
                # timings (microseconds, self and cumulative) on stderr.
                path = os.path.join(self.config["scratch"], "importtime.txt")
                with open(path, "w+b") as out:
                    ours(("-X", "importtime"), stderr=out)
                    out.seek(0)
                    report["importtime"] = out.read().decode(errors="replace")
                with open(path, "w+b") as out:
                    floor_argv = [SYSTEM_PYTHON, "-X", "importtime", "-I", "-S", "-c", "pass"]
                    timed_spawn(floor_argv, {}, False, stderr=out)
                    out.seek(0)
                    report["importtime_floor"] = out.read().decode(errors="replace")
        finally:
            os.close(socket_dir)
        return report

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "spawn": self.spawn,
            "wait": self.wait,
            "exited": self.exited,
            "poll": self.poll,
            "signal_all": self.signal_all,
            "kill_all": self.kill_all,
            "p1": self.p1,
            "wait_mount": self.wait_mount,
        }
        out = sys.stdout
        out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
        out.flush()
        try:
            for line in sys.stdin:
                cmd = json.loads(line)
                if cmd["op"] == "exit":
                    break
                reply: dict[str, Any]
                try:
                    reply = {"ok": True, "result": handlers[cmd["op"]](cmd)}
                except Exception as err:  # reported to the caller, which raises
                    reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                out.write(json.dumps(reply) + "\n")
                out.flush()
        finally:
            self.kill_all()
            self.log.close()


def main() -> None:
    # setpriv armed the parent-death signal before exec'ing unshare and then
    # this; a parent that died before that left us to init.
    if os.getppid() == 1:
        sys.exit(1)  # the parent is already gone
    config = json.loads(sys.argv[1])
    set_up(config)
    if config.get("cgroup_procs"):
        # Every program this agent starts belongs to that one pod.
        join_cgroup(config["cgroup_procs"])
    Agent(config).run()


if __name__ == "__main__":
    main()
