"""The committed betterproto2 stubs must be exactly what the proto generates."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "csi_async" / "_proto"


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_proto.sh"), str(out)],
        check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, cwd=REPO,
    )  # fmt: skip
    generated, committed = _tree(out), _tree(COMMITTED)
    assert sorted(generated) == sorted(committed)
    drifted = [
        name
        for name in generated
        if not filecmp.cmp(generated[name], committed[name], shallow=False)
    ]
    assert drifted == [], f"regenerate with scripts/gen_proto.sh (nox -s proto): {drifted}"
