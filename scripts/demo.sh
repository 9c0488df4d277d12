#!/usr/bin/env bash
# The run command: builds qcowfs, makes a few real qcow2 images with qemu-img/qemu-io, mounts them
# at /tmp/qcowfs-demo/mnt, shows the tree and proves the exposed bytes match `qemu-img convert`.
# The mount is left in place so you can look around; the last lines say how to unmount it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bash scripts/install-deps.sh
bash scripts/build.sh

demo=/tmp/qcowfs-demo
images=$demo/images
mnt=$demo/mnt
ref=$demo/ref          # qemu-img's own raw conversions, the oracle
work=$demo/work        # inputs for the images
loopmnt=$demo/ext4     # where the ext4 inside fs.raw is mounted briefly
log=$demo/qcowfs.log
qcowfs=$repo/build/qcowfs

say() { printf '\n== %s\n' "$*"; }

is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

# ---- a clean slate: unmount what an earlier run left behind ----------------------------------
if is_mounted "$loopmnt"; then umount "$loopmnt" || umount -l "$loopmnt"; fi
if is_mounted "$mnt"; then
    say "unmounting the previous demo mount"
    fusermount3 -u "$mnt" || umount -l "$mnt"
fi
rm -rf "$images" "$ref" "$work"
mkdir -p "$images/archive" "$images/golden" "$mnt" "$ref" "$work" "$loopmnt"
rm -f "$log"

# ---- images ---------------------------------------------------------------------------------
say "making images in $images"
cd "$images"

# vm1: data written by qemu-io, an internal snapshot, then more writes after it.
qemu-img create -q -f qcow2 vm1.qcow2 256M
qemu-io -f qcow2 -c "write -q -P 0x11 0 8M" -c "write -q -P 0x22 64M 4M" vm1.qcow2
qemu-img snapshot -c before-upgrade vm1.qcow2
qemu-io -f qcow2 -c "write -q -P 0x33 0 2M" -c "write -q -z 64M 1M" -c "write -q -P 0x44 200M 512k" vm1.qcow2
echo "vm1.qcow2: 256 MiB, snapshot 'before-upgrade', changed afterwards"

# archive/backup-zstd: every cluster compressed with zstd.
qemu-img create -q -f raw "$work/backup.raw" 64M
seq 1 2000000 | dd of="$work/backup.raw" conv=notrunc status=none
qemu-io -f raw -c "write -q -P 0xab 32M 1M" "$work/backup.raw"
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$work/backup.raw" archive/backup-zstd.qcow2
echo "archive/backup-zstd.qcow2: 64 MiB, compressed clusters (zstd)"

# golden/base (qcow2 v2, 4 KiB clusters) under overlay (v3, extended L2), with a relative backing name.
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k golden/base.qcow2 128M
qemu-io -f qcow2 -c "write -q -P 0x55 0 16M" -c "write -q -P 0x66 100M 3M" golden/base.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k -b golden/base.qcow2 -F qcow2 overlay.qcow2
qemu-io -f qcow2 -c "write -q -P 0x77 4M 100k" -c "write -q -z 101M 64k" overlay.qcow2
echo "overlay.qcow2: overlay (extended L2) on golden/base.qcow2 (qcow2 v2)"

# fs: an ext4 file system inside a qcow2 image, to mount through a read-only loop device.
mkdir -p "$work/fs-content"
echo "hello from inside a qcow2 image" > "$work/fs-content/hello.txt"
seq 1 1000 > "$work/fs-content/numbers.txt"
mkfs.ext4 -q -F -L qcowfs-demo -d "$work/fs-content" "$work/fs.raw" 32M >/dev/null
qemu-img convert -f raw -O qcow2 "$work/fs.raw" fs.qcow2
echo "fs.qcow2: 32 MiB ext4 file system"

# big: 16 TiB virtual size, almost nothing allocated.
qemu-img create -q -f qcow2 big.qcow2 16T
qemu-io -f qcow2 -c "write -q -P 0x5a 15T 1M" big.qcow2
echo "big.qcow2: 16 TiB sparse, 1 MiB written at 15 TiB"

# ---- mount ----------------------------------------------------------------------------------
cd "$demo"
say "mounting: $qcowfs --log=$log $images $mnt"
"$qcowfs" --log="$log" "$images" "$mnt"

say "ls -lR $mnt"
ls -lR "$mnt"

# ---- prove the bytes: sha256 of each exposed file against qemu-img's raw conversion -----------
say "comparing exposed files with qemu-img convert -O raw"
failures=0
# check EXPOSED_FILE QEMU_IMG_CONVERT_ARGS...
check() {
    local exposed=$1 out
    shift
    out=$ref/$(basename "$exposed")
    qemu-img convert -O raw "$@" "$out"
    local got want
    got=$(sha256sum < "$exposed" | cut -d' ' -f1)
    want=$(sha256sum < "$out" | cut -d' ' -f1)
    if [[ $got == "$want" ]]; then
        printf 'OK        %-40s sha256 %s\n' "${exposed#"$mnt"/}" "$got"
    else
        printf 'MISMATCH  %-40s qcowfs %s, qemu-img %s\n' "${exposed#"$mnt"/}" "$got" "$want"
        failures=$((failures + 1))
    fi
    rm -f "$out"
}
check "$mnt/vm1.raw" "$images/vm1.qcow2"
check "$mnt/vm1@before-upgrade.raw" -l snapshot.name=before-upgrade "$images/vm1.qcow2"
check "$mnt/archive/backup-zstd.raw" "$images/archive/backup-zstd.qcow2"
check "$mnt/overlay.raw" "$images/overlay.qcow2"
check "$mnt/golden/base.raw" "$images/golden/base.qcow2"
check "$mnt/fs.raw" "$images/fs.qcow2"

# 16 TiB is too much to hash: compare the written MiB and a MiB of the sparse part.
if cmp -s <(dd if="$mnt/big.raw" bs=1M skip=$((15 * 1024 * 1024)) count=1 status=none) \
          <(head -c 1M /dev/zero | tr '\0' '\132') &&
   cmp -s <(dd if="$mnt/big.raw" bs=1M skip=$((8 * 1024 * 1024)) count=1 status=none) \
          <(head -c 1M /dev/zero); then
    printf 'OK        %-40s the MiB at 15 TiB is 0x5a, the MiB at 8 TiB is zeros\n' "big.raw"
else
    printf 'MISMATCH  %-40s unexpected bytes at 8 or 15 TiB\n' "big.raw"
    failures=$((failures + 1))
fi

# ---- a file system inside an image, written through a loop device ---------------------------
say "mounting the ext4 inside fs.raw read-write (losetup + mount), writing a file into it"
loopdev=""
cleanup_loop() {
    if is_mounted "$loopmnt"; then umount "$loopmnt" || true; fi
    if [[ -n $loopdev ]]; then losetup -d "$loopdev" || true; fi
    loopdev=""
}
trap cleanup_loop EXIT
if loopdev=$(losetup -f --show "$mnt/fs.raw" 2>/dev/null); then
    if mount "$loopdev" "$loopmnt" 2>/dev/null; then
        ls -l "$loopmnt"
        echo "hello.txt: $(cat "$loopmnt/hello.txt")"
        echo "written by the demo through qcowfs on $(date)" > "$loopmnt/written.txt"
        cleanup_loop   # umount + detach: the last handle closes, qcowfs writes fs.qcow2 back clean
        # The kernel releases the file asynchronously: give qcowfs a moment to close the image.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            qemu-img check -U -q "$images/fs.qcow2" >/dev/null 2>&1 && break
            sleep 0.5
        done
        if qemu-img check -U "$images/fs.qcow2"; then
            echo "OK        qemu-img check finds fs.qcow2 clean after the write"
        else
            echo "FAILED    qemu-img check of fs.qcow2"
            failures=$((failures + 1))
        fi
    else
        echo "(mount of $loopdev not possible here; skipped)"
    fi
else
    echo "(no loop devices available here; skipped)"
fi
cleanup_loop   # a busy loop device would keep the FUSE mount from unmounting
trap - EXIT

# ---- done -----------------------------------------------------------------------------------
say "the images are still mounted at $mnt"
echo "look around:   ls -l $mnt   (snapshots appear as NAME@SNAPSHOT.raw)"
echo "log file:      $log"
echo "unmount with:  fusermount3 -u $mnt"
if ((failures > 0)); then
    echo "demo: $failures comparison(s) failed" >&2
    exit 1
fi
