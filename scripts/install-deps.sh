#!/usr/bin/env bash
# Installs what building, testing and demonstrating qcowfs needs on Debian 12 (bookworm).
# Idempotent: when every package is already installed it does not touch apt at all.
# Run as root, or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    build-essential g++ cmake pkg-config   # toolchain
    libfuse3-dev fuse3                     # FUSE library, fusermount3
    zlib1g-dev libzstd-dev                 # compressed clusters
    libboost1.81-dev liburing-dev          # Asio coroutines over io_uring
    doctest-dev                            # unit tests
    clang-14 libclang-rt-14-dev libfuzzer-14-dev  # sanitizer build and libFuzzer targets (build-asan/)
    qemu-utils python3                     # qemu-img/qemu-io/qemu-nbd: test oracle and demo images
    libnbd-bin                             # nbdinfo: the dirty bitmaps QEMU serves (bitmap tests)
    fio                                    # many large writes in flight at once, verified (write tests)
    e2fsprogs util-linux kmod              # mkfs.ext4, losetup/mount, modprobe
    ca-certificates
)

as_root=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        echo "install-deps: run as root (or install sudo)" >&2
        exit 1
    fi
fi

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$p")
done

if ((${#missing[@]} > 0)); then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Mirrors are occasionally unreachable for a moment: retry the index download a few times.
    for attempt in 1 2 3; do
        if "${as_root[@]}" apt-get update; then
            break
        fi
        if ((attempt == 3)); then
            echo "install-deps: apt-get update failed" >&2
            exit 1
        fi
        sleep $((attempt * 5))
    done
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${packages[@]}"
else
    echo "install-deps: all ${#packages[@]} packages already installed"
fi

# qcowfs needs the FUSE device; the fuse module may not be loaded on a fresh machine.
if [[ ! -c /dev/fuse ]]; then
    "${as_root[@]}" modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]]; then
    echo "install-deps: warning: /dev/fuse is missing (modprobe fuse did not help);" \
         "mounting will fail and the integration tests will be skipped" >&2
fi
