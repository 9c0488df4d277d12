#!/usr/bin/env bash
# Read and write benchmark of qcowfs against qemu-storage-daemon's FUSE export; see contrib/bench/README.md.
# Not part of the test suite. Needs root: it installs packages, drops the page cache and mounts FUSE.
#   sudo bash contrib/bench/run.sh [--quick] [--reads-only|--writes-only] [--size 1G] [--reps 3] [--json FILE] ...
# QCOWFS_BIN=/path/to/qcowfs selects the binary (default: build/qcowfs, built here if missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if [[ $EUID -ne 0 ]]; then
    echo "run.sh: must run as root (apt-get, drop_caches, FUSE mounts): sudo bash $0 $*" >&2
    exit 1
fi

need=()
[[ -x /usr/bin/qemu-storage-daemon ]] || need+=(qemu-system-common)
command -v fio >/dev/null || need+=(fio)
{ command -v qemu-img && command -v qemu-io; } >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
    echo "run.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [[ -z "${QCOWFS_BIN:-}" ]]; then
    QCOWFS_BIN="$repo/build/qcowfs"
    if [[ ! -x "$QCOWFS_BIN" ]]; then
        echo "run.sh: building qcowfs in $repo/build" >&2
        (cd "$repo" && cmake -S . -B build && cmake --build build -j"$(nproc)")
    fi
fi
export QCOWFS_BIN

exec python3 "$here/bench.py" "$@"
