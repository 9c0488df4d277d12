#!/usr/bin/env bash
# Runs one libFuzzer command line (the ctest fuzz.* tests call it). CI keeps only the head and the
# tail of a long log, and a finding is reported in the middle, so on failure the finding's lines
# are repeated at the end, with the input that broke it (gzip, base64) to replay it elsewhere:
#   base64 -d | gunzip > input; build-asan/tests/fuzz/fuzz_TARGET input
set -u
log=$(mktemp)
"$@" > "$log" 2>&1
rc=$?
cat "$log"
if ((rc != 0)); then
    echo "==== fuzz finding (repeated from above) ===="
    grep -m 5 -E "fuzz property violated|ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer|LeakSanitizer|libFuzzer)|runtime error:|SUMMARY:" "$log"
    unit=$(grep -o -E "Test unit written to [^ ]+" "$log" | tail -n 1 | cut -d' ' -f5)
    if [[ -n $unit && -f $unit ]]; then
        echo "input $(basename "$unit"), $(stat -c %s "$unit") bytes, gzip | base64:"
        gzip -9 -c "$unit" | base64 -w 0
        echo
    fi
fi
rm -f "$log"
exit "$rc"
