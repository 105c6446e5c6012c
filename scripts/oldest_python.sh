#!/usr/bin/env bash
# Print the path of a Python 3.10, the oldest Python the fusermount3 zipapp
# claims to run on, installing one if the machine has none. scripts/test.sh
# runs the zipapp's CLI tests with it (FUSERMOUNT3_TEST_PYTHON).
#
# Where it looks, in order:
#   1. $FUSERMOUNT3_TEST_PYTHON, if set (it must be a 3.10);
#   2. a Python 3.10 that uv installed here before (build/uv-python);
#   3. a python3.10 already on the machine: on PATH, or in pyenv's versions;
#   4. `uv python install 3.10` (uv comes from PyPI with the test
#      dependencies; it downloads a python-build-standalone build).
# Exits 1, saying so, if none of them gives one: the tests are not skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

want=3.10
managed_dir=$PWD/build/uv-python
uv=.venv/bin/uv

is_wanted() {
  [[ -x $1 ]] && [[ $("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == "$want" ]]
}

if [[ -n ${FUSERMOUNT3_TEST_PYTHON:-} ]]; then
  if is_wanted "$FUSERMOUNT3_TEST_PYTHON"; then
    echo "$FUSERMOUNT3_TEST_PYTHON"
    exit 0
  fi
  echo "oldest_python: FUSERMOUNT3_TEST_PYTHON=$FUSERMOUNT3_TEST_PYTHON is not a Python $want" >&2
  exit 1
fi

if [[ -x $uv ]]; then
  found=$(UV_PYTHON_INSTALL_DIR=$managed_dir "$uv" python find --managed-python --no-python-downloads "$want" 2>/dev/null || true)
  if [[ -n $found ]] && is_wanted "$found"; then
    echo "$found"
    exit 0
  fi
fi

candidates=()
if command -v "python$want" >/dev/null 2>&1; then
  candidates+=("$(command -v "python$want")")
fi
pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
for dir in "$pyenv_root"/versions/"$want".*; do
  [[ -d $dir ]] && candidates+=("$dir/bin/python$want")
done
for candidate in ${candidates[@]+"${candidates[@]}"}; do
  # A pyenv shim on PATH may not run without a pyenv version selected.
  if is_wanted "$candidate"; then
    echo "$candidate"
    exit 0
  fi
done

if [[ ! -x $uv ]]; then
  echo "oldest_python: no Python $want here and no uv in .venv to install one (bash scripts/bootstrap.sh)" >&2
  exit 1
fi
echo "oldest_python: installing Python $want with uv into $managed_dir" >&2
if ! UV_PYTHON_INSTALL_DIR=$managed_dir "$uv" python install --no-bin "$want" >&2; then
  echo "oldest_python: uv could not install Python $want (it downloads python-build-standalone);" \
       "install a python$want, or set FUSERMOUNT3_TEST_PYTHON" >&2
  exit 1
fi
found=$(UV_PYTHON_INSTALL_DIR=$managed_dir "$uv" python find --managed-python --no-python-downloads "$want")
is_wanted "$found" || { echo "oldest_python: uv installed $found, which is not a Python $want" >&2; exit 1; }
echo "$found"
