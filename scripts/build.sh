#!/usr/bin/env bash
# Configures and builds qcowfs and its tests into build/ (RelWithDebInfo, warnings are errors).
# Extra arguments are passed to the CMake configure step, e.g. -DQCOWFS_ONLY_PURE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_WERROR=ON "$@"
cmake --build build -j"$(nproc)"
