#!/usr/bin/env bash
# Runs one libFuzzer target for a while: scripts/fuzz.sh TARGET SECONDS [libFuzzer options...]
# TARGET is format, entries or image (tests/fuzz/fuzz_TARGET.cpp). Builds build-asan/ if needed.
# New inputs collect in build-asan/fuzz/corpus-TARGET (the checked-in seeds are only read);
# a crash is saved as build-asan/fuzz/artifacts/TARGET-crash-* and the exit status is non-zero.
# Example: scripts/fuzz.sh image 3600 -fork=2    (an hour on both cores)
set -euo pipefail
cd "$(dirname "$0")/.."

if (($# < 2)); then
    echo "usage: scripts/fuzz.sh TARGET SECONDS [libFuzzer options...]  (TARGET: format, entries, image)" >&2
    exit 2
fi
target=$1 seconds=$2
shift 2
[[ -f tests/fuzz/fuzz_$target.cpp ]] || { echo "fuzz.sh: no target '$target' (tests/fuzz/fuzz_$target.cpp)" >&2; exit 2; }

bash scripts/build-asan.sh "fuzz_$target"
work=build-asan/fuzz
mkdir -p "$work/corpus-$target" "$work/artifacts"
seeds=tests/fuzz/corpus extra=()
if [[ $target == entries ]]; then seeds=tests/fuzz/corpus-entries extra=(-max_len=4096); fi
exec "build-asan/tests/fuzz/fuzz_$target" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2560 \
    -print_final_stats=1 -artifact_prefix="$work/artifacts/$target-" "${extra[@]}" "$@" \
    "$work/corpus-$target" "$seeds"
