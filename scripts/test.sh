#!/usr/bin/env bash
# The test command: installs dependencies, builds, and runs every registered test with ctest.
# Unit tests (doctest) always run; integration tests mount real images and need root and
# /dev/fuse (without them they report "skipped", not "failed"). Then the sanitizer pass: the
# unit tests once more and each libFuzzer target for a bounded time (QCOWFS_FUZZ_SECONDS, 60 by
# default), built with clang, ASan and UBSan in build-asan/. Exits non-zero if either pass fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build.sh

start=$SECONDS
status=0
(cd build && ctest --output-on-failure --timeout 900) || status=$?
main_time=$((SECONDS - start))

start=$SECONDS
asan_status=0
if bash scripts/build-asan.sh; then
    fuzz_seconds=${QCOWFS_FUZZ_SECONDS:-60}
    cmake -S . -B build-asan -DQCOWFS_FUZZ_SECONDS="$fuzz_seconds" >/dev/null
    (cd build-asan && ctest --output-on-failure -j2 -R '^(unit|fuzz)\.') || asan_status=$?
else
    asan_status=$?
    echo "test: the sanitizer build (build-asan/) failed" >&2
fi
asan_time=$((SECONDS - start))

verdict() { (($1 == 0)) && echo PASS || echo "FAIL (exit $1)"; }
echo
echo "==== test summary ===="
echo "build/       unit + integration tests:           $(verdict "$status")  (${main_time}s)"
echo "build-asan/  ASan/UBSan unit tests + fuzzing:    $(verdict "$asan_status")  (${asan_time}s)"
if ((status != 0 || asan_status != 0)); then
    echo "RESULT: FAIL"
    exit 1
fi
echo "RESULT: PASS"
