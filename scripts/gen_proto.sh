#!/usr/bin/env bash
# Regenerate csi_async/_proto from proto/csi/v1/csi.proto with betterproto2-compiler.
# Usage: scripts/gen_proto.sh [OUTDIR]   (default: csi_async/_proto)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-csi_async/_proto}
py=${PYTHON:-.venv/bin/python}
bindir=$(dirname "$(readlink -f "$py")")
venvbin=$(dirname "$py")
include=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
rm -rf "$out"
mkdir -p "$out"
PATH="$venvbin:$bindir:$PATH" "$py" -m grpc_tools.protoc -I proto -I "$include" \
  --python_betterproto2_out="$out" \
  --python_betterproto2_opt=client_generation=async,server_generation=async \
  proto/csi/v1/csi.proto >/dev/null
