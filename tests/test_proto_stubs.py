"""The committed betterproto2 stubs must be exactly what the proto generates."""

from __future__ import annotations

import dataclasses
import filecmp
import subprocess
import sys
from pathlib import Path

from csi_async._proto.csi import v1 as csi
from csi_async._proto.google import protobuf

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


def test_the_stubs_carry_no_descriptor_proto() -> None:
    """gen_proto.sh generates from a copy of csi.proto without the csi_secret option.

    The committed proto keeps the option (and the descriptor.proto import it needs), as
    the spec has it; the stubs get wrappers.proto alone, and the fields stay the same.
    """
    proto = (REPO / "proto" / "csi" / "v1" / "csi.proto").read_text()
    assert 'import "google/protobuf/descriptor.proto";' in proto
    assert "[(csi_secret) = true]" in proto
    assert not hasattr(protobuf, "FieldOptions")
    assert hasattr(protobuf, "BoolValue")
    fields = {field.name for field in dataclasses.fields(csi.NodePublishVolumeRequest)}
    assert {"secrets", "volume_context", "target_path"} <= fields
