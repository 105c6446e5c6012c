"""The README's demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from e2e.mounts import mounts_at_or_below


def test_the_demo_narrates_every_step_and_cleans_up(zipapp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "e2e", "demo", "--zipapp", str(zipapp)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ["start the node", "publish the volumes", "start the FUSE container",
                 "read through the mount", "unmount and unpublish", "stop the node"]:  # fmt: skip
        assert f"] {step}" in out
    assert "Hello from a FUSE filesystem mounted without privileges!" in out
    assert "mount type fuse.sshfs" in out
    assert "Nothing is left behind" in out
    assert "Summary" in out
    root = re.search(r"kubelet root: (\S+)", out)
    assert root is not None
    assert mounts_at_or_below(root.group(1)) == []
    assert not Path(root.group(1)).exists()


def test_a_failing_demo_exits_non_zero(tmp_path: Path) -> None:
    broken = tmp_path / "fusermount3"
    broken.write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    broken.chmod(0o755)
    tmp_path.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "e2e", "demo", "--zipapp", str(broken)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 1
    assert "demo failed" in result.stderr
    assert "FAILED" in result.stdout
