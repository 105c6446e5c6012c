#!/usr/bin/env bash
# Regenerate csi_async/_proto from proto/ with betterproto2-compiler: CSI
# (proto/csi/v1/csi.proto, package csi.v1) and kubelet's device plugin API
# (proto/deviceplugin/v1beta1/api.proto, package v1beta1, taken as it is).
# Usage: scripts/gen_proto.sh [OUTDIR]   (default: csi_async/_proto)
#
# The stubs are generated from a copy of csi.proto without its csi_secret field option:
# the option is CSI's marker for secret fields (proto/ keeps it, as the spec has it), but
# betterproto2 drops custom options, and declaring it imports descriptor.proto, whose
# ~60 generated classes cost the driver about 3 MiB for nothing it uses at run time (only
# wrappers.proto's BoolValue is). Options never reach the wire: the messages are the same.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-csi_async/_proto}
py=${PYTHON:-.venv/bin/python}
bindir=$(dirname "$(readlink -f "$py")")
venvbin=$(dirname "$py")
include=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/csi/v1" "$work/deviceplugin/v1beta1"
cp proto/deviceplugin/v1beta1/api.proto "$work/deviceplugin/v1beta1/api.proto"
# Each removal must match (a changed proto fails here rather than keep the import), and
# nothing may name descriptor.proto or the option afterwards.
"$py" - proto/csi/v1/csi.proto "$work/csi/v1/csi.proto" <<'PY'
import re
import sys

source, target = sys.argv[1:]
text = open(source, encoding="utf-8").read()
removals = [
    (r'^import "google/protobuf/descriptor\.proto";\n', 1),
    (r"^extend google\.protobuf\.FieldOptions \{\n(?:[^}\n]*\n)*?\}\n\n?", 1),
    (r" \[\(csi_secret\) = true\]", None),
]
for pattern, expected in removals:
    text, count = re.subn(pattern, "", text, flags=re.MULTILINE)
    if not count or (expected is not None and count != expected):
        sys.exit(f"gen_proto.sh: {pattern!r} matched {count} times in {source}")
if "descriptor" in text or "csi_secret" in text or "FieldOptions" in text:
    sys.exit(f"gen_proto.sh: {source} still uses descriptor.proto after stripping")
open(target, "w", encoding="utf-8").write(text)
PY
rm -rf "$out"
mkdir -p "$out"
PATH="$venvbin:$bindir:$PATH" "$py" -m grpc_tools.protoc -I "$work" -I "$include" \
  --python_betterproto2_out="$out" \
  --python_betterproto2_opt=client_generation=async,server_generation=async \
  "$work/csi/v1/csi.proto" "$work/deviceplugin/v1beta1/api.proto" >/dev/null
