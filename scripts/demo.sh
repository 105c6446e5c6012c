#!/usr/bin/env bash
# The csi-async demo on Debian 12, as root: an unprivileged "pod" mounts sshfs
# through the broker, a second "container" reads through the mount, and
# everything is torn down. Installs what it needs first (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/demo.sh: run as root (the demo makes real mounts and sandboxes)" >&2
  exit 1
fi
bash scripts/bootstrap.sh
.venv/bin/python scripts/build_zipapp.py -o build/fusermount3 >/dev/null
exec .venv/bin/python -m e2e demo --zipapp build/fusermount3
