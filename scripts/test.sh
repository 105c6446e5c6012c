#!/usr/bin/env bash
# Run csi-async's whole test suite on Debian 12 as root (CI runs exactly this).
# Installs what it needs first (scripts/bootstrap.sh), builds the fusermount3
# zipapp and the libfuse example filesystems, then runs pytest with real
# kernel FUSE mounts. Then, as the zipapp claims Python >= 3.10, its CLI
# tests once more with the zipapp run by a Python 3.10
# (scripts/oldest_python.sh finds or installs one). Extra arguments go to
# pytest, and run only what they name (no second pass).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/test.sh: run as root (the tests make real mounts and sandboxes)" >&2
  exit 1
fi
bash scripts/bootstrap.sh
.venv/bin/python scripts/build_zipapp.py -o build/fusermount3 >/dev/null
bash scripts/build_fuse_examples.sh >/dev/null
if (($#)); then
  exec .venv/bin/python -m pytest "$@"
fi
status=0
.venv/bin/python -m pytest || status=$?
oldest=$(bash scripts/oldest_python.sh)
echo "scripts/test.sh: the zipapp's CLI tests, the zipapp run by $("$oldest" -V 2>&1) ($oldest)"
FUSERMOUNT3_TEST_PYTHON=$oldest .venv/bin/python -m pytest tests/test_proxy_cli.py || status=$?
exit "$status"
