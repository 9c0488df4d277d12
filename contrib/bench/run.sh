#!/usr/bin/env bash
# qcowfs benchmarks; see contrib/bench/README.md. Not part of the test suite. Needs root: it installs
# packages, mounts FUSE file systems and loop devices, and drops the page cache.
#   sudo bash contrib/bench/run.sh [--quick] [side.py options]   issue 9's side-by-side table (side.py)
#   sudo bash contrib/bench/run.sh --detail [bench.py options]   per-image read/write detail (bench.py)
# QCOWFS_BIN=/path/to/qcowfs selects the binary (default: build/qcowfs, built here if missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if [[ $EUID -ne 0 ]]; then
    echo "run.sh: must run as root (apt-get, FUSE mounts, loop devices, drop_caches): sudo bash $0 $*" >&2
    exit 1
fi

need=()
[[ -x /usr/bin/qemu-storage-daemon ]] || need+=(qemu-system-common)
command -v fio >/dev/null || need+=(fio)
{ command -v qemu-img && command -v qemu-io && command -v qemu-nbd; } >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v python3 >/dev/null || need+=(python3)
command -v gcc >/dev/null || need+=(gcc)
command -v pkg-config >/dev/null || need+=(pkg-config)
[[ -e /usr/include/fuse3/fuse.h ]] || need+=(libfuse3-dev)
command -v nbdfuse >/dev/null || need+=(libnbd-bin)
command -v qcowmount >/dev/null || need+=(libqcow-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if ((${#need[@]})); then
    echo "run.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [[ -z "${QCOWFS_BIN:-}" ]]; then
    QCOWFS_BIN="$repo/build/qcowfs"
    if [[ ! -x "$QCOWFS_BIN" ]]; then
        echo "run.sh: building qcowfs in $repo/build" >&2
        (cd "$repo" && cmake -S . -B build && cmake --build build -j"$(nproc)" --target qcowfs)
    fi
fi
export QCOWFS_BIN

if [[ "${1:-}" == "--detail" ]]; then
    shift
    exec python3 "$here/bench.py" "$@"
fi
exec python3 "$here/side.py" "$@"
