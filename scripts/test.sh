#!/usr/bin/env bash
# Run csi-async's whole test suite on Debian 12 as root (CI runs exactly this).
# Installs what it needs first (scripts/bootstrap.sh), builds the fusermount3
# zipapp and the libfuse example filesystems, then runs pytest with real
# kernel FUSE mounts. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/test.sh: run as root (the tests make real mounts and sandboxes)" >&2
  exit 1
fi
bash scripts/bootstrap.sh
.venv/bin/python scripts/build_zipapp.py -o build/fusermount3 >/dev/null
bash scripts/build_fuse_examples.sh >/dev/null
exec .venv/bin/python -m pytest "$@"
