#!/usr/bin/env python3
"""qcowfs-stream: every image variant of the read-path tests, fed through `cat img |` into
`decode`, equals `qemu-img convert -O raw` to a pipe and to a sparse file; images whose tables come
after their data (made with qemu-io and by hand) decode, also with a tiny --memory (spill file);
`encode` of sparse raw files round-trips through a pipe and passes qemu-img check/compare; each
kind of bad stream fails with its message within a second; -p draws a progress line."""

import os
import random
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import streamhelp as S  # noqa: E402

KiB, MiB, GiB, TiB = H.KiB, H.MiB, H.GiB, H.TiB
T = H.TestRun("stream", deadline=400)
BIN = S.stream_bin()
if not os.access(BIN, os.X_OK):
    T.check("qcowfs-stream binary exists at %s" % BIN, False)
    T.finish()

work = H.tempdir("stream")
SRC = os.path.join(work, "src")
OUT = os.path.join(work, "out")
os.makedirs(SRC)
os.makedirs(OUT)


def img(name):
    return os.path.join(SRC, name)


# (name, image, decode args, cwd for the oracle)
variants = []


def add(name, p, args="", cwd=None):
    variants.append((name, p, args, cwd))


def build(name, fn):
    with T.step("build %s" % name):
        fn()


# ---- the variants of test_read_variants.py, made the same way --------------------------------

def std_writes(cs):
    c = max(cs, 64 * KiB)
    return [
        "write -P 0x5a 4k 100k",
        "write -P 0xa5 %d %d" % (7 * c + 12345, c + 70003),
        "write -P 0x11 %d %d" % (c, c),
        "write -z %d 4k" % c,
        "write -z %d %d" % (2 * c, c),
        "write -P 0x22 %d %d" % (3 * c, c),
        "write -z -u %d %d" % (3 * c, c),
        "write -c -P 0x33 %d %d" % (4 * c, cs),
        "write -P 0x44 %d %d" % (5 * c, 2 * c),
        "discard %d %d" % (5 * c, c),
        "write -P 0x66 %d 1000" % (6 * c + 7),
    ]


def v(name, opts, cs=64 * KiB, size=4 * MiB):
    def fn():
        p = img(name + ".qcow2")
        H.create(p, size, opts)
        H.qemu_io(p, *std_writes(cs))
        add(name, p)
    build(name, fn)


v("v2", "compat=0.10")
v("v3", "compat=1.1")
v("cs512", "cluster_size=512", cs=512)
v("cs4k", "cluster_size=4k", cs=4 * KiB)
v("cs64k", "cluster_size=64k")
v("cs2m", "cluster_size=2M", cs=2 * MiB, size=24 * MiB)
for bits in (1, 2, 4, 8, 16, 32, 64):
    v("refcount%d" % bits, "compat=1.1,refcount_bits=%d" % bits)


def zeros():
    p = img("zeros.qcow2")
    H.create(p, 4 * MiB, "compat=1.1")
    H.qemu_io(p, "write -P 0x77 0 4M", "write -z 64k 64k", "write -z -u 256k 192k",
              "write -z 1000000 5000", "write -z -u 3M 1M")
    add("zero clusters", p)


build("zeros", zeros)

varied = os.path.join(work, "varied.bin")
H.write_varied_raw(varied, 4 * MiB, seed=7)
varied_big = os.path.join(work, "varied-big.bin")
H.write_varied_raw(varied_big, 8 * MiB, seed=8)


def compressed(name, opts, src=varied):
    def fn():
        p = img(name + ".qcow2")
        H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, p)
        add(name, p)
    build(name, fn)


compressed("cmp-zlib", "compression_type=zlib")
compressed("cmp-zstd", "compression_type=zstd")
compressed("cmp-zlib-4k", "compression_type=zlib,cluster_size=4k")
compressed("cmp-zstd-512", "compression_type=zstd,cluster_size=512")
compressed("cmp-zstd-2m", "compression_type=zstd,cluster_size=2M", src=varied_big)


def more_compressed():
    p = img("plain.qcow2")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", varied, p)
    add("uncompressed copy of varied data", p)
    p = img("zstd-io.qcow2")
    H.create(p, 4 * MiB, "compression_type=zstd")
    H.qemu_io(p, "write -c -P 0x12 0 128k", "write -c -P 0x34 1M 64k", "write -P 0x56 1M 100",
              "write -c -P 0x78 3M 1M")
    add("zstd via qemu-io write -c", p)
    p = img("cmp-mixed.qcow2")
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", varied, p)
    H.qemu_io(p, "write -P 0x99 100000 3000", "write -z 1M 64k", "write -z -u 2M 100k",
              "discard 3M 64k")
    add("compressed then overwritten", p)


build("more compressed", more_compressed)


def ext_l2_writes(cs):
    sc = cs // 32
    return [
        "write -P 0x01 0 %d" % sc,
        "write -P 0x02 %d %d" % (3 * sc + 100, 2 * sc),
        "write -z %d %d" % (cs + 5 * sc, sc),
        "write -P 0x03 %d %d" % (2 * cs, cs),
        "write -z %d %d" % (2 * cs + 7 * sc, 3 * sc),
        "write -z -u %d %d" % (2 * cs + 20 * sc, sc),
        "write -P 0x04 %d %d" % (3 * cs + 31 * sc, 2 * sc),
        "write -c -P 0x05 %d %d" % (5 * cs, cs),
        "discard %d %d" % (2 * cs + 12 * sc, sc),
    ]


def ext_l2(name, cs, size):
    def fn():
        p = img(name + ".qcow2")
        H.create(p, size, "extended_l2=on,cluster_size=%d" % cs)
        H.qemu_io(p, *ext_l2_writes(cs))
        add(name, p)
    build(name, fn)


ext_l2("extl2-64k", 64 * KiB, 4 * MiB)
ext_l2("extl2-2m", 2 * MiB, 16 * MiB)


def ext_l2_backed():
    base = img("extl2-base.qcow2")
    H.create(base, 4 * MiB)
    H.qemu_io(base, "write -P 0xbb 0 4M")
    top = img("extl2-top.qcow2")
    H.create(top, 4 * MiB, "extended_l2=on,cluster_size=64k", backing="extl2-base.qcow2", cwd=SRC)
    H.qemu_io(top, *ext_l2_writes(64 * KiB))
    add("extended L2 over a backing file", top, "--backing " + S.q(base))
    add("extended L2 base", base)


build("extl2-backed", ext_l2_backed)


def chain():
    prev = None
    for i in range(4):
        p = img("chain%d.qcow2" % i)
        H.create(p, 4 * MiB, backing=os.path.basename(prev) if prev else None, cwd=SRC)
        H.qemu_io(p, "write -P 0x%02x %d 300k" % (0x10 + i, i * 700 * KiB + 1234),
                  "write -z %d 64k" % ((3 - i) * 900 * KiB),
                  "write -P 0x%02x 3M 4k" % (0x50 + i))
        # the backing file's own backing files are found by the names in their headers
        add("chain depth %d" % i, p, "--backing " + S.q(prev) if prev else "")
        prev = p


build("chain", chain)


def backings():
    base = img("nbf-base.qcow2")
    H.create(base, 4 * MiB)
    H.qemu_io(base, "write -P 0x17 0 4M")
    top = img("nbf-top.qcow2")
    H.create(top, 4 * MiB, backing="nbf-base.qcow2", cwd=SRC)
    H.qemu_io(top, "write -P 0x18 1M 64k")
    off, typ, ln = H.header_extensions(top)[0]
    H.patch(top, off, b"\x7e\x57\xe5\x75")
    add("backing format extension absent, unknown extension present", top, "--backing " + S.q(base))

    rawbase = os.path.join(SRC, "rawbase.bin")
    H.write_varied_raw(rawbase, 4 * MiB, seed=3)
    p = img("rawbacked.qcow2")
    H.create(p, 4 * MiB, backing="rawbase.bin", backing_fmt="raw", cwd=SRC)
    H.qemu_io(p, "write -P 0x21 64k 64k", "write -z 1M 100k", "write -P 0x22 3000001 999")
    add("raw backing file", p, "--backing " + S.q(rawbase))

    bases = os.path.join(SRC, "bases")
    os.makedirs(bases)
    H.create("sib.qcow2", 4 * MiB, cwd=bases)
    H.qemu_io("sib.qcow2", "write -P 0x41 0 2M", cwd=bases)
    d2 = os.path.join(SRC, "rel2")
    os.makedirs(d2)
    H.create("stop.qcow2", 4 * MiB, backing="../bases/sib.qcow2", cwd=d2)
    H.qemu_io("stop.qcow2", "write -P 0x42 1536k 1M", cwd=d2)
    add("relative backing name (../bases)", os.path.join(d2, "stop.qcow2"),
        "--backing " + S.q(os.path.join(bases, "sib.qcow2")))

    sb = img("shortbase.qcow2")
    H.create(sb, 1000000)
    H.qemu_io(sb, "write -P 0x61 0 1000448")
    top = img("shorttop.qcow2")
    H.create(top, 4 * MiB, backing="shortbase.qcow2", cwd=SRC)
    H.qemu_io(top, "write -P 0x62 2M 64k", "write -P 0x63 500000 1000")
    add("backing file shorter than the overlay", top, "--backing " + S.q(sb))
    rb = os.path.join(SRC, "shortraw.bin")
    with open(rb, "wb") as f:
        f.write(b"\x7e" * 100000)
    top2 = img("shortrawtop.qcow2")
    H.create(top2, 1 * MiB, backing="shortraw.bin", backing_fmt="raw", cwd=SRC)
    add("raw backing file shorter than the overlay", top2, "--backing " + S.q(rb))


build("backing files", backings)

for mode in ("off", "metadata", "falloc", "full"):
    def fn(mode=mode):
        p = img("prealloc-%s.qcow2" % mode)
        H.create(p, 4 * MiB, "preallocation=%s" % mode)
        H.qemu_io(p, "write -P 0x81 100k 200k", "write -z 2M 64k")
        add("preallocation=%s" % mode, p)
    build("prealloc-" + mode, fn)


def odd_sizes():
    for name, size in (("odd1000000", 1000000), ("odd12345", 12345)):
        p = img(name + ".qcow2")
        H.create(p, size, "cluster_size=64k")
        vsize = H.info(p)["virtual-size"]
        H.qemu_io(p, "write -P 0x91 0 %d" % min(vsize, 5000),
                  "write -P 0x92 %d %d" % (vsize - 1000, 1000))
        add("virtual size %d" % size, p)
    p = img("odd-cs4k.qcow2")
    H.create(p, 1000000, "cluster_size=4k")
    H.qemu_io(p, "write -P 0x93 0 1000448")
    add("virtual size 1000000, 4k clusters, full", p)


build("odd-sizes", odd_sizes)


def snapshots():
    for name, opts in (("snap", "compat=1.1"), ("snapv2", "compat=0.10")):
        p = img(name + ".qcow2")
        H.create(p, 4 * MiB, opts)
        H.qemu_io(p, "write -P 0xa1 0 1M", "write -P 0xa2 2M 64k")
        H.qemu_img("snapshot", "-c", "s1", p)
        H.qemu_io(p, "write -P 0xa3 512k 1M", "write -z 2M 64k", "write -c -P 0xa4 3M 64k")
        H.qemu_img("snapshot", "-c", "s2", p)
        H.qemu_io(p, "write -P 0xa5 0 4k", "discard 3M 64k", "write -P 0xa6 1000000 12345")
        add("%s (internal snapshots; the active disk)" % name, p)


build("snapshots", snapshots)


def dirty():
    p = img("dirty.qcow2")
    H.create(p, 4 * MiB, "compat=1.1,lazy_refcounts=on")
    H.qemu_io(p, "write -P 0xd1 0 1M", "write -P 0xd2 3M 12345")
    feats = H.read_field(p, "incompatible_features")
    H.write_field(p, "incompatible_features", feats | 1)
    add("dirty bit set", p)


build("dirty", dirty)


# ---- images whose tables come after their data -------------------------------------------------

def qemu_reordered():
    # Write, snapshot, rewrite (the L2 table is copied to the end, after data it maps), delete
    # the snapshot (the old places are freed) and write again: new data lands in the freed
    # clusters, before the L2 table that maps it; compressed clusters too.
    p = img("reordered.qcow2")
    H.create(p, 16 * MiB)
    H.qemu_io(p, "write -P 1 0 4M")
    H.qemu_img("snapshot", "-c", "s1", p)
    H.qemu_io(p, "write -P 2 1M 1M", "write -c -P 7 6M 64k")
    H.qemu_img("snapshot", "-d", "s1", p)
    H.qemu_io(p, "write -P 3 5M 1M", "write -c -P 9 7M 64k", "discard 2M 256k",
              "write -P 4 9M 2M")
    l2 = H.read_u64(p, H.l1_entry_offset(p, 0)) & 0x00fffffffffffe00
    first_data = H.read_u64(p, l2) & 0x00fffffffffffe00
    T.check("qemu-io image: the L2 table (at 0x%x) follows data it maps (at 0x%x)" % (l2, first_data),
            first_data < l2)
    add("qemu-io: write, snapshot, rewrite, delete snapshot, write (L2 after its data)", p)
    return p


reordered = None
with T.step("build reordered"):
    reordered = qemu_reordered()


def handmade():
    rnd = random.Random(11)
    cs = 4 * KiB  # one L2 table maps 2 MiB: three tables in a small image
    writes = {}
    for g in (0, 1, 5, 6, 7, 40, 63, 500, 511):
        writes[g] = rnd.randbytes(cs // 2) + bytes([g & 0xff]) * (cs // 2)
    for g in (2, 8, 9, 50, 700, 1100):
        writes[g] = ("c", ((b"compressed %d " % g) * (cs // 8))[:cs // 2] + bytes(cs // 2))
    for g in range(1030, 1050):  # the third L2 table
        writes[g] = bytes([g & 0xff]) * cs
    size = 6 * MiB
    out = []
    for name, order in (("tables-last", ("data", "l2", "l1")),
                        ("l1-first-l2-last", ("l1", "data", "l2")),
                        ("l2-first-l1-last", ("l2", "data", "l1"))):
        p = img("hand-%s.qcow2" % name)
        where = S.build_image(p, size, cs, writes, order=order, seed=len(out))
        H.check_clean(p)  # the hand-made image is valid for qemu
        add("by hand: %s (L1 at 0x%x, L2s at %s)" % (name, where["l1"], [hex(x) for x in
                                                                          where["l2"].values()]), p)
        out.append(p)
    return out


hand = []
with T.step("build hand-made images"):
    hand = handmade()


# ext4 holds files up to 16 TiB - 4 KiB: the read test's 16 TiB image, 64 KiB smaller
BIG = 16 * TiB - 64 * KiB


def big16t():
    p = img("sparse16t.qcow2")
    H.create(p, BIG)
    H.qemu_io(p, "write -P 0xaa 0 64k", "write -P 0xbb 8T 64k",
              "write -P 0xcc %d 64k" % (BIG - 64 * KiB))
    return p


big = None
with T.step("build 16 TiB sparse image"):
    big = big16t()

# ---- decode every variant: to a pipe and to a sparse file --------------------------------------

refs = {}
for name, p, args, cwd in variants:
    with T.step("oracle for %s" % name):
        ref = os.path.join(OUT, "ref-%d.raw" % len(refs))
        H.to_raw(p, ref, cwd=cwd)
        refs[name] = ref

for i, (name, p, args, cwd) in enumerate(variants):
    if name not in refs:
        continue
    ref = refs[name]
    with T.step("decode %s" % name):
        got = os.path.join(OUT, "pipe-%d.raw" % i)
        r = S.decode_pipe(p, got, args)
        diff = S.files_equal(got, ref) if r.code == 0 else None
        T.check("%s: cat | decode - - | equals qemu-img convert" % name, r.code == 0 and diff is None,
                diff or r)
        os.unlink(got)
        got = os.path.join(OUT, "file-%d.raw" % i)
        r = S.decode_file(p, got, args)
        diff = S.files_equal(got, ref) if r.code == 0 else None
        T.check("%s: cat | decode - FILE equals qemu-img convert" % name, r.code == 0 and diff is None,
                diff or r)
        if r.code == 0:
            a, b = S.allocated(got), S.allocated(ref)
            T.check("%s: sparse output allocates %d KiB (qemu-img convert: %d KiB)" % (
                name, a // KiB, b // KiB), a <= b * 5 // 4 + 1 * MiB)
        os.unlink(got)

with T.step("external data files are refused"):
    for opts in ("data_file=%s" % img("ext.data"), "data_file=%s,data_file_raw=on" % img("extraw.data")):
        p = img("ext.qcow2")
        H.create(p, 4 * MiB, opts)
        H.qemu_io(p, "write -P 0x71 0 1M")
        r = S.decode_file(p, os.path.join(OUT, "ext.raw"))
        T.check("external data file (%s): refused, names the data file" % opts,
                r.code == 1 and "external data file" in r.err and img("ext") in r.err, r)
        T.check("external data file: no output left behind", not os.path.exists(os.path.join(OUT, "ext.raw")))
        os.unlink(p)

with T.step("backing file without --backing is refused"):
    r = S.decode_file(img("chain1.qcow2"), os.path.join(OUT, "nb.raw"))
    T.check("backing file without --backing: refused, says --backing", r.code == 1 and "--backing" in r.err
            and "chain0.qcow2" in r.err, r)

if big:
    with T.step("16 TiB sparse image to a sparse file"):
        got = os.path.join(OUT, "big.raw")
        r = S.decode_file(big, got, "-v")
        T.check("16T: decode succeeds in under 20 s", r.code == 0 and r.seconds < 20, r)
        if r.code == 0:
            T.check("16T: the file has the virtual size", os.path.getsize(got) == BIG)
            T.check("16T: only the data is allocated (%d KiB)" % (S.allocated(got) // KiB),
                    S.allocated(got) <= 1 * MiB)
            fd = os.open(got, os.O_RDONLY)
            ok = (H.pread_full(fd, 65536, 0) == b"\xaa" * 65536
                  and H.pread_full(fd, 65536 + 20, 8 * TiB - 10) == bytes(10) + b"\xbb" * 65536 + bytes(10)
                  and H.pread_full(fd, 65536, BIG - 65536) == b"\xcc" * 65536
                  and H.pread_full(fd, 4096, 4 * TiB) == bytes(4096))
            os.close(fd)
            T.check("16T: patterns at 0, 8T and the end, zeros between", ok)
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", got, big],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
            T.check("16T: qemu-img compare", cmp.returncode == 0, cmp.stdout[-300:])
            os.unlink(got)

# ---- bounded memory: tables after data with a tiny --memory -----------------------------------

STATS = "retained at most (\\d+) bytes in memory and (\\d+) in the spill file"


def stats(err):
    import re
    m = re.search(STATS, err)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


for p in ([reordered] if reordered else []) + hand:
    name = os.path.basename(p)
    ref = [refs[n] for n, pp, a, c in variants if pp == p and n in refs]
    if not ref:
        continue
    with T.step("small --memory for %s" % name):
        for mem in ("64k", "0"):
            for mode in ("pipe", "file"):
                got = os.path.join(OUT, "mem.raw")
                spill = os.path.join(work, "spill")
                os.makedirs(spill, exist_ok=True)
                fn = S.decode_pipe if mode == "pipe" else S.decode_file
                r = fn(p, got, "-v --memory %s --spill-dir %s" % (mem, S.q(spill)))
                diff = S.files_equal(got, ref[0]) if r.code == 0 else None
                inmem, spilled = stats(r.err)
                limit = {"64k": 64 * KiB, "0": 0}[mem]
                T.check("%s --memory %s to a %s: equal, at most %s in memory (%s), spilled %s" % (
                    name, mem, mode, mem, inmem, spilled),
                    r.code == 0 and diff is None and inmem is not None and inmem <= limit and spilled > 0,
                    diff or r)
                T.check("%s: the spill file is gone afterwards" % name, os.listdir(spill) == [],
                        os.listdir(spill))
                os.unlink(got)

# ---- encode round trips ---------------------------------------------------------------------------


def sparse_random_raw(path, size, seed):
    """Random data in random runs with holes and explicit zero runs between them."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        at = 0
        while at < size:
            at += rnd.randrange(0, 700 * KiB)
            n = min(rnd.randrange(1, 300 * KiB), size - at)
            if n <= 0:
                break
            f.seek(at)
            kind = rnd.randrange(3)
            if kind == 0:
                f.write(rnd.randbytes(n))
            elif kind == 1:
                f.write(bytes(n))  # written zeros: must stay unallocated
            else:
                f.write((b"text %d " % rnd.randrange(1000)) * (n // 9) + bytes(n % 9))
            at += n


cases = [("plain", "", 64 * KiB), ("zstd", "-c zstd", 64 * KiB), ("zlib", "-c zlib", 64 * KiB),
         ("zstd 512", "-c zstd --cluster-size 512", 512), ("plain 4k", "--cluster-size 4k", 4 * KiB),
         ("zlib 2M", "-c zlib --cluster-size 2M", 2 * MiB)]
for i, (label, args, cs) in enumerate(cases):
    with T.step("encode %s" % label):
        raw = os.path.join(work, "enc-%d.bin" % i)
        sparse_random_raw(raw, 6 * MiB + 512 * (i * 3), seed=100 + i)
        if i == 1:
            with open(raw, "r+b") as f:  # a size that is no multiple of 512 is padded with zeros
                f.truncate(6 * MiB + 1000)
        q = os.path.join(OUT, "enc-%d.qcow2" % i)
        r = S.sh("%s encode %s %s %s" % (S.q(BIN), args, S.q(raw), S.q(q)))
        T.check("encode %s: exit 0" % label, r.code == 0, r)
        if r.code != 0:
            continue
        chk = subprocess.run(["qemu-img", "check", q], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        T.check("encode %s: qemu-img check clean" % label,
                chk.returncode == 0 and b"No errors were found" in chk.stdout, chk.stdout[-400:])
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, q],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        T.check("encode %s: qemu-img compare identical" % label, cmp.returncode == 0, cmp.stdout[-300:])
        inf = H.info(q)
        T.check("encode %s: cluster size %d" % (label, cs), inf.get("cluster-size") == cs, inf)
        if args.startswith("-c "):
            T.check("encode %s: some clusters are compressed" % label,
                    b"compressed clusters" in chk.stdout and b" 0.00% compressed" not in chk.stdout,
                    chk.stdout[-300:])
        # metadata first: L1 and every L2 table come before the first data cluster
        l1 = H.read_field(q, "l1_table_offset")
        l2s = [H.read_u64(q, l1 + 8 * k) & 0x00fffffffffffe00 for k in range(H.read_field(q, "l1_size"))]
        T.check("encode %s: L1 and L2 tables before the data" % label,
                all(x < os.path.getsize(q) for x in l2s) and l1 < min([x for x in l2s if x] or [1 << 62]))
        # unallocated where the raw file is zero
        mapj = subprocess.run(["qemu-img", "map", "--output=json", q], stdout=subprocess.PIPE)
        import json
        data_bytes = sum(e["length"] for e in json.loads(mapj.stdout) if e.get("data"))
        with open(raw, "rb") as f:
            buf = f.read()
        nz = sum(1 for k in range(0, len(buf), cs) if any(buf[k:k + cs]))
        T.check("encode %s: exactly the %d non-zero clusters are allocated" % (label, nz),
                data_bytes == nz * cs or data_bytes == (nz - 1) * cs + (len(buf) - (len(buf) - 1) // cs * cs)
                or abs(data_bytes - nz * cs) < cs, "%d bytes mapped" % data_bytes)
        # through a pipe both ways: stdin -> encode -> stdout -> decode
        back = os.path.join(OUT, "back-%d.raw" % i)
        r = S.sh("cat %s | %s encode %s - - | %s decode - %s" % (S.q(raw), S.q(BIN), args, S.q(BIN),
                                                                  S.q(back)))
        padded = os.path.join(work, "padded.bin")
        with open(raw, "rb") as f, open(padded, "wb") as g:
            d = f.read()
            g.write(d + bytes(-len(d) % 512))
        diff = S.files_equal(back, padded) if r.code == 0 else None
        T.check("encode %s: cat | encode - - | decode - FILE gives the raw file back" % label,
                r.code == 0 and diff is None, diff or r)
        for f in (back, padded, q):
            os.unlink(f)

# ---- bad streams -----------------------------------------------------------------------------------

BAD = os.path.join(work, "bad")
os.makedirs(BAD)


def base_image(name, extra=()):
    p = os.path.join(BAD, name)
    H.create(p, 4 * MiB)
    H.qemu_io(p, "write -P 0x31 0 256k", "write -c -P 0x32 1M 64k", "write -P 0x33 2M 128k", *extra)
    return p


def l2_entry(p, guest):
    return H.l2_entry_offset(p, guest)


def bad_case(label, make, expect, offset=True):
    with T.step("bad stream: %s" % label):
        p = make()
        out = os.path.join(OUT, "bad.raw")
        for mode, fn in (("file", S.decode_file), ("pipe", S.decode_pipe)):
            r = fn(p, out)
            ok = r.code == 1 and expect in r.err and (not offset or "0x" in r.err) and r.seconds < 1.0
            T.check("bad stream %s (%s): exit 1 within 1 s, says '%s'" % (label, mode, expect), ok, r)
            if mode == "file":
                T.check("bad stream %s: no output file left" % label, not os.path.exists(out))
            if os.path.exists(out):
                os.unlink(out)  # made by the shell's redirection in pipe mode


def truncated_data():
    p = base_image("trunc.qcow2")
    data = open(p, "rb").read()
    t = os.path.join(BAD, "trunc-cut.qcow2")
    open(t, "wb").write(data[:len(data) - 100 * KiB])
    return t


def truncated_header():
    p = os.path.join(BAD, "trunc-hdr.qcow2")
    open(p, "wb").write(open(base_image("th.qcow2"), "rb").read()[:60])
    return p


def past_end():
    p = base_image("past.qcow2")
    e = l2_entry(p, 2 * MiB)
    H.patch(p, e, struct.pack(">Q", (1 << 63) | 0x7f0000000))
    return p


def l1_into_header():
    p = base_image("l1hdr.qcow2")
    H.write_field(p, "l1_table_offset", 0)
    return p


def compressed_into_header():
    p = base_image("chdr.qcow2")
    e = l2_entry(p, 1 * MiB)
    raw = H.read_u64(p, e)
    x = 62 - 8
    H.patch(p, e, struct.pack(">Q", (raw & ~((1 << x) - 1)) | 0x200))
    return p


def mapped_twice():
    p = base_image("twice.qcow2")
    first = H.read_u64(p, l2_entry(p, 0))
    H.patch(p, l2_entry(p, 2 * MiB), struct.pack(">Q", first))
    return p


def l2_is_l1():
    p = base_image("l2l1.qcow2")
    l1 = H.read_field(p, "l1_table_offset")
    H.patch(p, H.l1_entry_offset(p, 0), struct.pack(">Q", (1 << 63) | l1))
    return p


def bad_compressed():
    p = base_image("badc.qcow2")
    raw = H.read_u64(p, l2_entry(p, 1 * MiB))
    off = raw & ((1 << 54) - 1)
    H.patch(p, off, b"\xff" * 64)
    return p


def not_qcow2():
    p = os.path.join(BAD, "random.bin")
    open(p, "wb").write(random.Random(5).randbytes(100000))
    return p


def encrypted():
    p = os.path.join(BAD, "luks.qcow2")
    H.qemu_img("create", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o",
               "encrypt.format=luks,encrypt.key-secret=sec0", p, "1M")
    return p


bad_case("truncated inside the data", truncated_data, "the stream ends at offset")
bad_case("truncated inside the header", truncated_header, "inside the qcow2 header")
bad_case("data cluster past the end", past_end, "lies past the end of the stream")
bad_case("L1 table offset in the header", l1_into_header, "overlaps the header")
bad_case("compressed cluster in the header", compressed_into_header, "points into the header")
bad_case("cluster mapped twice", mapped_twice, "mapped twice")
bad_case("L2 table is the L1 table", l2_is_l1, "overlaps the L1 table")
bad_case("compressed cluster does not decompress", bad_compressed, "does not decompress to a cluster")
bad_case("not a qcow2 image", not_qcow2, "not a qcow2 image")
bad_case("encrypted image", encrypted, "encrypted", offset=False)

# ---- progress ----------------------------------------------------------------------------------

with T.step("progress line"):
    p = img("cmp-zstd.qcow2")
    r = S.sh("cat %s | %s decode -p - %s" % (S.q(p), S.q(BIN), S.q(os.path.join(OUT, "p.raw"))))
    last = [l for l in r.err.replace("\r", "\n").splitlines() if l.strip()]
    T.check("decode -p: a final line with bytes done of the virtual size and a rate",
            r.code == 0 and last and "4.0 MiB of 4.0 MiB (100%)" in last[-1] and "/s" in last[-1], r)
    r = S.sh("cat %s | %s decode - %s" % (S.q(p), S.q(BIN), S.q(os.path.join(OUT, "p.raw"))))
    T.check("decode without -p: nothing on stderr", r.code == 0 and r.err == "", r)
    raw = os.path.join(work, "enc-0.bin")
    r = S.sh("%s encode -p -c zstd %s %s" % (S.q(BIN), S.q(raw), S.q(os.path.join(OUT, "p.qcow2"))))
    T.check("encode -p: progress lines for compressing and writing",
            r.code == 0 and "encode: 6.0 MiB of 6.0 MiB (100%)" in r.err and "encode: writing" in r.err, r)

T.finish()
