"""A sandboxed pod's program is exactly as unprivileged as a restricted pod's container.

Read from the host, in /proc/<pid>/status of the real program (after its
exec, not of the set-up before it): the uid and gid asked for, no
supplementary groups, no capability in any set, no_new_privs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from e2e.sandbox import PodSandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root")


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def wait_for_exec(pid: int, comm: str, timeout: float = 10.0) -> None:
    """Until the process has exec'd the program (its set-up runs under other names)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"pid {pid} never exec'd {comm}"
        time.sleep(0.005)


@pytest.fixture
def zipapp(tmp_path: Path) -> Path:
    """Anything executable will do: nothing here mounts."""
    script = tmp_path / "fusermount3"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(("uid", "gid"), [(65534, 65534), (4321, 8765)])
def test_a_sandboxed_program_has_the_pod_user_and_no_privilege(
    zipapp: Path, uid: int, gid: int
) -> None:
    with PodSandbox({}, zipapp, uid=uid, gid=gid) as sandbox:
        container = sandbox.spawn(["sleep", "1000"], stdout=subprocess.DEVNULL)
        pid = container.init_pid()
        assert pid is not None
        wait_for_exec(pid, "sleep")
        status = proc_status(pid)
        container.kill()
        container.wait_gone()
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1"
