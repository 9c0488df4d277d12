#!/usr/bin/env bash
# Regenerates the fuzz seed corpus (tests/fuzz/corpus/seed-*.qcow2): one small qemu-img/qemu-io
# image per qcow2 variant, and struct-* structure inputs for fuzz_format cut from them.
# Regression inputs (regress-*) in the corpus are left alone.
# Usage: bash tests/fuzz/make_corpus.sh
set -euo pipefail
cd "$(dirname "$0")"
out=$PWD/corpus
mkdir -p "$out"
rm -f "$out"/seed-* "$out"/struct-*

work=$(mktemp -d /tmp/qcowfs-corpus-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"   # relative backing and data file names resolve here (decoys only)

create() { qemu-img create -q -f qcow2 "$@"; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }
keep() { cp "$1" "$out/seed-$2.qcow2"; }

# Guest writes that leave data, zero and unallocated clusters, and a partial cluster.
pattern() {
    io -c 'write -P 0x11 0 8k' -c 'write -P 0x22 24k 3k' -c 'write -z 40k 8k' \
       -c 'write -P 0x33 100k 1k' -c 'write -P 0x44 200k 4k' "$1"
}

# v2 (compat=0.10) and v3, every cluster size from 512 B to 64 KiB.
for cs in 512 1k 2k 4k; do
    create -o compat=0.10,cluster_size=$cs v2.qcow2 256k; pattern v2.qcow2; keep v2.qcow2 "v2-c$cs"
    create -o cluster_size=$cs v3.qcow2 256k; pattern v3.qcow2; keep v3.qcow2 "v3-c$cs"
done
create -o cluster_size=8k v3.qcow2 256k; pattern v3.qcow2; keep v3.qcow2 v3-c8k
create v3.qcow2 192k; io -c 'write -P 0x55 64k 4k' v3.qcow2; keep v3.qcow2 v3-c64k

# Every refcount width.
for rb in 1 2 4 8 32 64; do
    create -o cluster_size=512,refcount_bits=$rb rc.qcow2 256k; pattern rc.qcow2; keep rc.qcow2 "refcount$rb"
done

# Zero clusters over allocated data (preallocated zero clusters), then a discard.
create -o cluster_size=1k z.qcow2 128k
io -c 'write -P 0x66 0 32k' -c 'write -z 4k 8k' -c 'discard 16k 4k' -c 'write -z -u 20k 2k' z.qcow2
keep z.qcow2 zero-clusters

# Compressed clusters, zlib and zstd.
for ct in zlib zstd; do
    create -o cluster_size=1k,compression_type=$ct c.qcow2 64k
    io -c 'write -c -P 0x77 0 1k' -c 'write -c -P 0x78 3k 1k' -c 'write -P 0x79 5k 1k' c.qcow2
    keep c.qcow2 "compressed-$ct"
done
create -o compat=0.10,cluster_size=1k c.qcow2 64k
io -c 'write -c -P 0x7a 2k 1k' c.qcow2; keep c.qcow2 compressed-v2

# Extended L2 entries (subclusters; QEMU needs 16 KiB clusters at least).
create -o cluster_size=16k,extended_l2=on x.qcow2 128k
io -c 'write -P 0x88 0 1k' -c 'write -z 2k 1k' -c 'write -P 0x89 16k 16k' -c 'write -z 40k 512' x.qcow2
keep x.qcow2 extended-l2

# Internal snapshots (v3, and v2 without the extra data fields' disk size).
for compat in 1.1 0.10; do
    create -o compat=$compat,cluster_size=512 s.qcow2 64k
    io -c 'write -P 0x91 0 2k' s.qcow2
    qemu-img snapshot -c first s.qcow2
    io -c 'write -P 0x92 1k 2k' s.qcow2
    qemu-img snapshot -c second s.qcow2
    io -c 'write -P 0x93 8k 1k' s.qcow2
    keep s.qcow2 "snapshots-$compat"
done

# External data file, normal and raw (the data file itself is not part of the input).
create -o cluster_size=512,data_file=decoy-data.bin d.qcow2 64k
io -c 'write -P 0xa1 0 2k' d.qcow2; keep d.qcow2 data-file
create -o cluster_size=512,data_file=decoy-raw.bin,data_file_raw=on d.qcow2 64k
io -c 'write -P 0xa2 0 2k' d.qcow2; keep d.qcow2 data-file-raw

# Backing files: raw and qcow2, with and without a format extension.
qemu-img create -q -f raw base.raw 64k
create -o cluster_size=512 -b base.raw -F raw o.qcow2 64k
io -c 'write -P 0xb1 1k 1k' o.qcow2; keep o.qcow2 backing-raw
create -o cluster_size=512 base.qcow2 64k
create -o cluster_size=512,compat=0.10 -b base.qcow2 -F qcow2 o.qcow2 64k
io -c 'write -P 0xb2 0 512' o.qcow2; keep o.qcow2 backing-qcow2-v2
create -o cluster_size=512 -b base.qcow2 -F qcow2 o.qcow2 64k
keep o.qcow2 backing-qcow2

# Persistent bitmaps: one enabled (consistent), one left in use by an unclean exit.
create -o cluster_size=512 b.qcow2 64k
qemu-img bitmap --add b.qcow2 enabled
qemu-img bitmap --add -g 4096 b.qcow2 other
io -c 'write -P 0xc1 0 4k' b.qcow2
keep b.qcow2 bitmaps
(qemu-io -f qcow2 -c 'write -P 0xc2 8k 1k' -c 'sigraise 9' b.qcow2 >/dev/null 2>&1 || true) 2>/dev/null
keep b.qcow2 bitmaps-in-use

# Lazy refcounts, clean and dirty (qemu-io killed before it clears the dirty bit).
create -o cluster_size=512,lazy_refcounts=on l.qcow2 64k
io -c 'write -P 0xd1 0 2k' l.qcow2; keep l.qcow2 lazy-clean
(qemu-io -f qcow2 -c 'write -P 0xd2 4k 2k' -c 'sigraise 9' l.qcow2 >/dev/null 2>&1 || true) 2>/dev/null
keep l.qcow2 lazy-dirty

# Preallocation=metadata (L2 entries with host clusters but never written).
create -o cluster_size=512,preallocation=metadata p.qcow2 16k; keep p.qcow2 prealloc-metadata

# Structure seeds for fuzz_format (inputs without the qcow2 magic, see structure() there): the
# snapshot table, the extension area and the bitmap directory of the images above.
python3 - "$out" <<'PY'
import struct, sys
out = sys.argv[1]
def be(fmt, b, at): return struct.unpack_from(">" + fmt, b, at)[0]
def header(path):
    b = open(path, "rb").read()
    return b, be("I", b, 4), be("I", b, 20)
for name in ("snapshots-1.1", "snapshots-0.10"):
    b, version, cb = header(f"{out}/seed-{name}.qcow2")
    nb, off = be("I", b, 60), be("Q", b, 64)
    table = b[off:off + (1 << cb) * 2]
    open(f"{out}/struct-snapshot-table-{name}", "wb").write(
        b"S" + bytes([version == 3, cb - 9]) + struct.pack(">H", nb) + table.rstrip(b"\0"))
for name in ("bitmaps", "backing-qcow2", "data-file"):
    b, version, cb = header(f"{out}/seed-{name}.qcow2")
    hl = be("I", b, 100)
    boff, bsize = be("Q", b, 8), be("I", b, 16)
    area = b[hl:1 << cb].rstrip(b"\0")
    rel = boff - hl if boff else 0
    open(f"{out}/struct-extensions-{name}", "wb").write(
        b"E" + bytes([version == 3, cb - 9]) + struct.pack(">HH", rel, bsize) + area)
b, version, cb = header(f"{out}/seed-bitmaps.qcow2")
hl = be("I", b, 100)
at = hl
while at + 8 <= len(b):
    t, n = be("I", b, at), be("I", b, at + 4)
    if t == 0x23852875:
        nb, size, off = be("I", b, at + 8), be("Q", b, at + 16), be("Q", b, at + 24)
        open(f"{out}/struct-bitmap-directory", "wb").write(
            b"B" + bytes([cb - 9]) + struct.pack(">H", nb) + bytes([0]) + b[off:off + size])
        break
    if t == 0:
        break
    at += 8 + (n + 7) // 8 * 8
PY

ls -l "$out" | awk '{ total += $5 } END { print "corpus: " NR - 1 " files, " total " bytes" }'
