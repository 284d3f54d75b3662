#!/usr/bin/env bash
# The test tools gpu_check.sh uses, as wheels for the GPU machine, which reaches no package
# registry and whose image lists no pytest (the device tool's KINDS.md). Run here, where pip works:
#
#   bash benchmarks/device_wheels.sh        # -> .whl/ (git-ignored through .git/info/exclude)
#
# then carry ".whl" with the device call: gpu_check.sh installs, into a folder of its own on
# PYTHONPATH, each of these the image cannot import (so none shadows a package the image has).
# All are pure-Python wheels, for the device's Python 3.12.
# (No pytest-benchmark: gpu_check.sh runs pytest without the ini's --benchmark-disable.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXCLUDE=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree or submodule
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl \
    pytest pluggy iniconfig packaging pygments pytest-xdist execnet
ls .whl
