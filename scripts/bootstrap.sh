#!/usr/bin/env bash
# Install what csi-async's demo and tests need on Debian 12, as root:
# the FUSE programs the tests run, and a virtualenv (.venv) with the pinned
# Python dependencies (requirements/constraints.txt). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv gcc pkg-config util-linux procps
  fuse3 libfuse3-dev libfuse2
  sshfs openssh-sftp-server bindfs gocryptfs rclone s3fs python3-pyfuse3
  mergerfs fuse-zip fuse-posixovl squashfuse squashfs-tools fuse-overlayfs unionfs-fuse
  archivemount golang-go golang-github-jacobsa-fuse-dev ntfs-3g
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.csi-async-deps
want=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "bootstrap: installing Python dependencies"
  log=$(mktemp)
  # pip's build warnings are noise unless the install fails.
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -c requirements/constraints.txt -e '.[test,dev]'; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
  echo "$want" > "$stamp"
fi
