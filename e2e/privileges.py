"""How the tests and benchmarks drop a process to a pod's user: util-linux's setpriv.

Each function returns a command prefix: the process execs `prefix + argv` as
the very last step of its set-up (after its mounts and its cgroup, which
need root), so the program starts with the credentials below and nothing of
ours runs after the drop. setpriv (util-linux 2.38) sets no_new_privs, then
changes uid, gid and groups while keeping its capabilities (PR_SET_KEEPCAPS,
so it can go on), empties the bounding, inheritable and ambient sets, arms
the parent-death signal (after the uid change, which clears it) and
execvp()s the program with the PATH of the environment it was given. That
execve as a non-root uid, of a file with no capabilities, is what leaves the
permitted and effective sets empty. Exit status 127 if the program is not
found, 126 if it cannot be executed, as a container runtime reports them.

Standard library only: `e2e.sandbox` (and through the benchmarks' agent
config, `bench`) build their command lines with it on the host; the
processes that exec them (`e2e/sandbox_init.py`, `bench/agent.py`) only
prepend what they are given.
"""

from __future__ import annotations

import shutil


def setpriv() -> str:
    """The host's setpriv (util-linux, in scripts/bootstrap.sh's package list)."""
    found = shutil.which("setpriv")
    if found is None:
        raise FileNotFoundError("setpriv (util-linux) is not installed")
    return found


def as_pod_user(uid: int, gid: int) -> list[str]:
    """A pod container's process: uid/gid, no supplementary groups, no capability
    in any set (bounding and ambient included), no_new_privs, SIGKILL when its
    parent dies. What Pod Security "restricted" leaves a container, and what
    runc's finalizeNamespace does before it execs the container's program."""
    # The setuid-helper user's drops, plus the two that disarm setuid programs.
    *drops, end = as_user_with_setuid_helpers(uid, gid)
    return [*drops, "--bounding-set=-all", "--no-new-privs", end]


def as_user_with_setuid_helpers(uid: int, gid: int) -> list[str]:
    """uid/gid, no supplementary groups, no inheritable or ambient capability,
    SIGKILL when its parent dies, but setuid programs still work.

    For the benchmarks' programs: their native baseline mounts with Debian's
    setuid fusermount3, which needs CAP_SYS_ADMIN left in the bounding set
    and no no_new_privs. The exec as a non-root uid still empties the
    effective and permitted sets of every other program.
    """
    return [
        setpriv(),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--pdeathsig=KILL",
        "--",
    ]


def dying_with_parent() -> list[str]:
    """Only the parent-death signal: SIGKILL when the thread that started it exits.

    For the root processes that set up a container or an agent (`unshare`
    and what it execs, which keep it across exec), so a test runner that is
    itself SIGKILLed leaves none behind.
    """
    return [setpriv(), "--pdeathsig=KILL", "--"]
