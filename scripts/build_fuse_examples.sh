#!/usr/bin/env bash
# Build libfuse3's example filesystems (hello, passthrough, and passthrough_hp
# if its source is present) from Debian's libfuse3-dev examples, and
# e2e/fs/jacobsa_flatfs against Debian's jacobsa/fuse Go source, for the e2e
# tests. They run as uid 65534 inside test sandboxes, so the results are mode
# 0755 in 0755 directories.
#
# Usage: scripts/build_fuse_examples.sh [OUTDIR]   (default: build/fuse-examples)
# Idempotent: a binary is rebuilt only when it is missing or older than its sources.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-build/fuse-examples}
examples=${FUSE_EXAMPLES_DIR:-/usr/share/doc/libfuse3-dev/examples}

die() { echo "build_fuse_examples: $*" >&2; exit 1; }

[ -d "$examples" ] || die "$examples not found (apt-get install libfuse3-dev)"
command -v pkg-config >/dev/null || die "pkg-config not found"
pkg-config --exists fuse3 || die "pkg-config cannot find fuse3 (apt-get install libfuse3-dev)"
command -v gcc >/dev/null || die "gcc not found"

# The binaries must be reachable by uid 65534: create every missing
# directory as 0755 regardless of the caller's umask.
umask 022
mkdir -p "$out/src"
chmod 0755 "$out" "$out/src"

# Copy (decompressing if Debian gzipped it) one example source into $out/src.
fetch() {
  local name=$1
  if [ -f "$examples/$name" ]; then
    cmp -s "$examples/$name" "$out/src/$name" || cp "$examples/$name" "$out/src/$name"
  elif [ -f "$examples/$name.gz" ]; then
    local tmp
    tmp=$(mktemp "$out/src/.$name.XXXXXX")
    gzip -dc "$examples/$name.gz" >"$tmp"
    chmod 0644 "$tmp"
    if cmp -s "$tmp" "$out/src/$name"; then rm -f "$tmp"; else mv "$tmp" "$out/src/$name"; fi
  else
    return 1
  fi
}

# Rebuild $out/$1 with compiler $2 from the remaining arguments (sources) if needed.
build() {
  local bin=$1 cc=$2
  shift 2
  local main=$1 stale=0 src
  for src in "$@"; do
    [ "$out/$bin" -nt "$out/src/$src" ] || stale=1
  done
  if [ "$stale" = 1 ]; then
    local tmp
    tmp=$(mktemp "$out/.$bin.XXXXXX")
    # shellcheck disable=SC2046  # pkg-config output is meant to be word-split
    if ! "$cc" -Wall -O2 -o "$tmp" "$out/src/$main" $(pkg-config fuse3 --cflags --libs); then
      rm -f "$tmp"
      return 1
    fi
    mv -f "$tmp" "$out/$bin"
    echo "built $out/$bin"
  fi
  chmod 0755 "$out/$bin"
}

fetch hello.c || die "hello.c not found in $examples"
fetch passthrough.c || die "passthrough.c not found in $examples"
fetch passthrough_helpers.h || die "passthrough_helpers.h not found in $examples"
build hello gcc hello.c || die "compiling hello.c failed"
build passthrough gcc passthrough.c passthrough_helpers.h || die "compiling passthrough.c failed"

# Optional: Debian 12's libfuse3-dev does not ship it, newer ones may.
if fetch passthrough_hp.cc 2>/dev/null; then
  if command -v g++ >/dev/null && build passthrough_hp g++ passthrough_hp.cc; then
    :
  else
    echo "build_fuse_examples: passthrough_hp.cc did not build; skipped (optional)" >&2
  fi
fi

# jacobsa/fuse (the library of gcsfuse and goofys): Debian ships it as Go
# source, golang-github-jacobsa-fuse-dev, built here in GOPATH mode with
# Debian's go. Its 2015 internal/buffer/runtime.s no longer links with a
# current Go; e2e/fs/jacobsa_flatfs/buffer_shim replaces those two files
# through -overlay (see its runtime.go). Without go or the library the
# binary is missing and the matrix says so.
gocode=${GOCODE_DIR:-/usr/share/gocode}
jacobsa_buffer=$gocode/src/github.com/jacobsa/fuse/internal/buffer
flatfs=e2e/fs/jacobsa_flatfs
if command -v go >/dev/null && [ -d "$jacobsa_buffer" ]; then
  stale=0
  for src in "$flatfs/main.go" "$flatfs/buffer_shim/runtime.go" "$flatfs/buffer_shim/runtime.s"; do
    [ "$out/jacobsa-flatfs" -nt "$src" ] || stale=1
  done
  if [ "$stale" = 1 ]; then
    gotmp=$(mktemp -d)
    shim=$(pwd -P)/$flatfs/buffer_shim
    printf '{"Replace":{"%s":"%s","%s":"%s"}}' \
      "$jacobsa_buffer/runtime.go" "$shim/runtime.go" \
      "$jacobsa_buffer/runtime.s" "$shim/runtime.s" >"$gotmp/overlay.json"
    if GO111MODULE=off GOPATH="$gocode:$gotmp/gopath" GOCACHE="$gotmp/cache" GOFLAGS= \
         go build -overlay "$gotmp/overlay.json" -o "$gotmp/jacobsa-flatfs" "$flatfs/main.go"; then
      mv -f "$gotmp/jacobsa-flatfs" "$out/jacobsa-flatfs"
      echo "built $out/jacobsa-flatfs"
    else
      echo "build_fuse_examples: $flatfs did not build against $gocode" >&2
    fi
    rm -rf "$gotmp"
  fi
  [ -f "$out/jacobsa-flatfs" ] && chmod 0755 "$out/jacobsa-flatfs"
else
  echo "build_fuse_examples: no go or no $jacobsa_buffer (apt-get install golang-go" \
       "golang-github-jacobsa-fuse-dev): jacobsa-flatfs not built" >&2
fi

# Make sure uid 65534 can actually get there: every directory from / down.
dir=$(cd "$out" && pwd -P)
while [ "$dir" != / ]; do
  perms=$(stat -c %A "$dir")
  [ "${perms:9:1}" = x ] || [ "${perms:9:1}" = t ] \
    || echo "build_fuse_examples: warning: $dir is not traversable by other users;" \
            "bind the binaries into test sandboxes instead of running them in place" >&2
  dir=$(dirname "$dir")
done
