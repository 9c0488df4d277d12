#!/usr/bin/env bash
# Configures and builds the sanitizer tree build-asan/: clang, AddressSanitizer +
# UndefinedBehaviorSanitizer (abort on the first error), the unit tests and the libFuzzer targets.
# Extra arguments are targets to build (default: everything but the qcowfs binary's integration use).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -f build-asan/CMakeCache.txt ]]; then
    # -O1 with line tables only, asserts on: quick to build, fast enough to fuzz, symbolized reports.
    CC=clang-14 CXX=clang++-14 cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" -DQCOWFS_FUZZ=ON
fi
if (($# > 0)); then
    targets=()
    for t in "$@"; do targets+=(--target "$t"); done
    cmake --build build-asan -j"$(nproc)" "${targets[@]}"
else
    cmake --build build-asan -j"$(nproc)" --target unit_pure unit_engine unit_stream fuzz_format fuzz_entries fuzz_image
fi
