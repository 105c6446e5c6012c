"""The committed betterproto2 stubs must be exactly what the proto generates."""

from __future__ import annotations

import dataclasses
import filecmp
import subprocess
import sys
from pathlib import Path

from csi_async._proto import v1beta1 as dp
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


def test_the_device_plugin_stubs_speak_kubelets_paths() -> None:
    """proto/deviceplugin/v1beta1/api.proto keeps kubelet's package, so the gRPC paths match.

    kubelet dials /v1beta1.Registration/Register and /v1beta1.DevicePlugin/<method>; a
    renamed package would still generate, and no kubelet would ever reach the plugin.
    """
    proto = (REPO / "proto" / "deviceplugin" / "v1beta1" / "api.proto").read_text()
    assert "Licensed under the Apache License, Version 2.0" in proto
    assert "\npackage v1beta1;\n" in proto
    servicer = dp.DevicePluginBase()
    assert sorted(servicer.__mapping__()) == [
        "/v1beta1.DevicePlugin/Allocate",
        "/v1beta1.DevicePlugin/GetDevicePluginOptions",
        "/v1beta1.DevicePlugin/GetPreferredAllocation",
        "/v1beta1.DevicePlugin/ListAndWatch",
        "/v1beta1.DevicePlugin/PreStartContainer",
    ]
    assert list(dp.RegistrationBase().__mapping__()) == ["/v1beta1.Registration/Register"]
    # The field numbers kubelet's Go stubs use, on the wire.
    spec = dp.DeviceSpec(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rw")
    assert bytes(spec) == b"\n\t/dev/fuse\x12\t/dev/fuse\x1a\x02rw"
    request = dp.ContainerAllocateRequest(devices_ids=["fuse-1"])
    assert bytes(request) == b"\n\x06fuse-1"
