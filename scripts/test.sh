#!/usr/bin/env bash
# The test command: installs dependencies, builds, and runs every registered test with ctest.
# Unit tests (doctest) always run; integration tests mount real images and need root and
# /dev/fuse (without them they report "skipped", not "failed").
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build.sh

cd build
status=0
ctest --output-on-failure --timeout 900 || status=$?
exit "$status"
