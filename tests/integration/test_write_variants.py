#!/usr/bin/env python3
"""Writes through the mount, over every image variant of the read tests: the same seeded random
operations go to MNT/NAME.raw and to a reference raw file (made by `qemu-img convert -O raw`
before mounting): pwrite of 1 byte to 3 MiB at random and unaligned offsets (straddling cluster
and L2-table boundaries too), fallocate PUNCH_HOLE and ZERO_RANGE, fallocate to allocate,
truncate to grow and shrink (with internal snapshots, shrinking must fail and change nothing),
writes past the end, fsync. The mounted file is read back during the run; after unmounting,
`qemu-img check` must be clean, `qemu-img compare` against the reference identical, the dirty
and corrupt bits clear, internal snapshots, backing files and external data files as before.

Environment: QCOWFS_TEST_SEED=N repeats a run (the seed is printed), QCOWFS_WRITE_OPS=N sets the
number of operations per variant, QCOWFS_VARIANTS=a,b runs only those variants."""

import os
import random
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_variants", deadline=840)

SEED = int(os.environ.get("QCOWFS_TEST_SEED") or random.SystemRandom().randrange(1, 1 << 31))
NOPS = int(os.environ.get("QCOWFS_WRITE_OPS") or 150)
ONLY = [v for v in os.environ.get("QCOWFS_VARIANTS", "").split(",") if v]
print("seed %d (repeat with QCOWFS_TEST_SEED=%d), %d operations per variant" % (SEED, SEED, NOPS),
      flush=True)

work = H.tempdir("wvariants")


class Variant:
    def __init__(self, name, cs=64 * KiB, extl2=False, snapshots=False, compress=True,
                 grow=True):
        self.name = name
        self.dir = os.path.join(work, name)
        self.src = os.path.join(self.dir, "src")
        os.makedirs(self.src)
        self.img = os.path.join(self.src, "disk.qcow2")
        self.view = "disk.raw"
        self.cs = cs
        self.l2_span = cs * (cs // (16 if extl2 else 8))  # guest bytes one L2 table maps
        self.snapshots = snapshots
        self.compress = compress
        self.grow = grow  # False: no operation makes the disk bigger than it is
        self.protected = []      # files the writes must not change (backing, ...)
        self.raw_data_file = None  # data_file_raw=on: the data file must equal the disk
        self.ref = os.path.join(self.dir, "ref.raw")
        self.snap_refs = {}      # snapshot name -> sha256 of its content before mounting
        self.ok = True

    def path(self, name):
        return os.path.join(self.src, name)


def varied_raw(path, size, seed, used=0.5):
    """A raw file of `size` bytes whose first `used` part holds varied data (text, random bytes,
    zero runs, patterns), the rest zeros (left unallocated by qemu-img convert)."""
    H.write_varied_raw(path, int(size * used) // 512 * 512, seed=seed)
    os.truncate(path, size)
    return path


def scatter(v, size, compress=None):
    """qemu-io commands spreading data, zero clusters (write -z, with and without unmap),
    compressed clusters (write -c), discarded ranges and unaligned writes over the image,
    including around L2-table boundaries."""
    cs = v.cs
    c = max(cs, 64 * KiB)
    compress = v.compress if compress is None else compress
    cmds = [
        "write -P 0x5a 4k 100k",
        "write -P 0xa5 %d %d" % (3 * c + 12345, c + 70003),
        "write -P 0x11 %d %d" % (6 * c, 2 * c),
        "write -z %d 4k" % (6 * c + 512),           # zeros inside an allocated cluster
        "write -z %d %d" % (7 * c, c),              # a zero cluster over allocated data
        "write -z %d %d" % (9 * c, 2 * c),          # zero clusters over unallocated space
        "write -P 0x22 %d %d" % (11 * c, c),
        "write -z -u %d %d" % (11 * c, c),          # zero with unmap
        "write -P 0x44 %d %d" % (13 * c, 2 * c),
        "discard %d %d" % (13 * c, c),              # discard an allocated cluster
        "write -P 0x66 %d 1000" % (size - 3 * c + 7),
    ]
    if compress:
        # compressed writes need unallocated clusters: the images' last quarter is unused
        q = size * 3 // 4 // c * c
        cmds += ["write -c -P 0x33 %d %d" % (q, cs),
                 "write -c -P 0x34 %d %d" % (q + 2 * c, 2 * cs)]
    # around L2-table boundaries inside the image
    span = v.l2_span
    k = 1
    while k * span < size and k <= 3:
        b = k * span
        cmds.append("write -P 0x%02x %d %d" % (0x70 + k, max(b - cs - 300, 0), 2 * cs + 600))
        if b + 4 * cs < size:
            cmds.append("write -z %d %d" % (b + 2 * cs, cs))
        k += 1
    return cmds


variants = []


def variant(name, **kw):
    def deco(fn):
        if ONLY and name not in ONLY:
            return fn
        v = Variant(name, **kw)
        with T.step("build %s" % name):
            fn(v)
            H.to_raw(v.img, v.ref, cwd=v.src)
            for s in H.snapshot_names(v.img):
                out = os.path.join(v.dir, "snap-%s.raw" % s)
                H.to_raw(v.img, out, snapshot=s, cwd=v.src)
                v.snap_refs[s] = out
            v.protected_hash = H.hash_files(v.protected)
            v.snap_table = H.snapshot_table(v.img)
            variants.append(v)
        return fn
    return deco


def from_raw(v, size, opts, compress=False, seed=1, used=0.5):
    raw = varied_raw(os.path.join(v.dir, "base.bin"), size, seed=seed, used=used)
    H.qemu_img("convert", *(["-c"] if compress else []), "-f", "raw", "-O", "qcow2",
               "-o", opts, raw, v.img)
    os.unlink(raw)


SIZE = 32 * MiB

# ---- versions, cluster sizes, refcount widths --------------------------------------------------


@variant("v2")
def _(v):
    from_raw(v, SIZE, "compat=0.10", seed=2)
    H.qemu_io(v.img, *scatter(v, SIZE))


@variant("v3")
def _(v):
    from_raw(v, SIZE, "compat=1.1", seed=3)
    H.qemu_io(v.img, *scatter(v, SIZE))


for _name, _cs, _size in (("cs512", 512, 16 * MiB), ("cs4k", 4 * KiB, SIZE),
                         ("cs64k", 64 * KiB, SIZE), ("cs2m", 2 * MiB, 64 * MiB)):
    def _mk(v, cs=_cs, size=_size):
        from_raw(v, size, "cluster_size=%d" % cs, seed=cs)
        H.qemu_io(v.img, *scatter(v, size))
    variant(_name, cs=_cs)(_mk)

for _bits in (1, 2, 8, 16, 64):
    def _mk(v, bits=_bits):
        from_raw(v, SIZE, "compat=1.1,refcount_bits=%d" % bits, seed=bits)
        # one-bit refcounts cannot count the clusters compressed data shares
        H.qemu_io(v.img, *scatter(v, SIZE, compress=bits > 1))
    variant("refcount%d" % _bits, compress=_bits > 1)(_mk)


# ---- compression -------------------------------------------------------------------------------

for _ct in ("zlib", "zstd"):
    def _mk(v, ct=_ct):
        from_raw(v, SIZE, "compression_type=%s" % ct, compress=True, seed=len(ct), used=0.7)
        H.qemu_io(v.img, *scatter(v, SIZE))
    variant("compressed-%s" % _ct)(_mk)


# ---- extended L2 -------------------------------------------------------------------------------

for _cs, _size in ((64 * KiB, SIZE), (2 * MiB, 64 * MiB)):
    def _mk(v, cs=_cs, size=_size):
        from_raw(v, size, "extended_l2=on,cluster_size=%d" % cs, seed=cs + 5)
        sc = cs // 32
        H.qemu_io(v.img, *(scatter(v, size) + [
            "write -P 0x01 %d %d" % (20 * cs, sc),
            "write -P 0x02 %d %d" % (20 * cs + 3 * sc + 100, 2 * sc),
            "write -z %d %d" % (21 * cs + 5 * sc, sc),
            "write -z -u %d %d" % (20 * cs + 20 * sc, 3 * sc),
            "discard %d %d" % (20 * cs + 12 * sc, sc)]))
    variant("extl2-%s" % ("64k" if _cs == 64 * KiB else "2m"), cs=_cs, extl2=True)(_mk)


# ---- backing chains ----------------------------------------------------------------------------


@variant("chain-raw")
def _(v):
    # raw base (shorter than the overlays) <- qcow2 mid <- qcow2 top (written)
    base = varied_raw(v.path("base.bin"), 24 * MiB, seed=21, used=0.9)
    mid = v.path("mid.qcow2")
    H.create(mid, SIZE, backing="base.bin", backing_fmt="raw", cwd=v.src)
    H.qemu_io(mid, "write -P 0x31 1M 3M", "write -z 8M 1M", "write -c -P 0x32 12M 128k",
              "write -P 0x33 23M 2M")
    H.create(v.img, SIZE, backing="mid.qcow2", cwd=v.src)
    H.qemu_io(v.img, "write -P 0x41 2M 100k", "write -z 10M 64k", "write -P 0x42 30M 1M",
              "write -c -P 0x43 5M 64k")
    v.protected = [base, mid]


@variant("chain3-top-only", cs=4 * KiB)
def _(v):
    # qcow2 base (zstd-compressed, shorter) <- qcow2 mid <- empty qcow2 top with 4k clusters:
    # every write copies on write from two levels below
    base = v.path("base.qcow2")
    raw = varied_raw(os.path.join(v.dir, "b.bin"), 20 * MiB, seed=31, used=0.9)
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw,
               base)
    mid = v.path("mid.qcow2")
    H.create(mid, 28 * MiB, backing="base.qcow2", cwd=v.src)
    H.qemu_io(mid, "write -P 0x51 3M 2M", "write -z 6M 1M", "discard 9M 1M",
              "write -P 0x52 19M 3M")
    H.create(v.img, SIZE, "cluster_size=4k", backing="mid.qcow2", cwd=v.src)
    v.protected = [base, mid]


# ---- internal snapshots ------------------------------------------------------------------------


@variant("snapshots", snapshots=True)
def _(v):
    from_raw(v, SIZE, "compat=1.1", seed=41)
    H.qemu_io(v.img, *scatter(v, SIZE))
    H.qemu_img("snapshot", "-c", "s1", v.img)
    H.qemu_io(v.img, "write -P 0xa3 512k 3M", "write -z 8M 1M", "write -c -P 0xa4 30M 64k",
              "discard 20M 2M")
    H.qemu_img("snapshot", "-c", "s2", v.img)
    H.qemu_io(v.img, "write -P 0xa5 0 4k", "write -P 0xa6 1000000 12345")


# v2 snapshots may lack their disk size (QEMU refuses any resize of such an image): this
# variant only checks that shrinking fails, and grows nothing
@variant("snapshots-v2-4k", cs=4 * KiB, snapshots=True, grow=False)
def _(v):
    from_raw(v, 16 * MiB, "compat=0.10,cluster_size=4k", seed=42)
    H.qemu_img("snapshot", "-c", "first", v.img)
    H.qemu_io(v.img, "write -P 0xb1 100k 1M", "write -z 3M 64k")
    H.qemu_img("snapshot", "-c", "second", v.img)


# ---- lazy refcounts and a dirty image ----------------------------------------------------------


@variant("lazy-refcounts")
def _(v):
    from_raw(v, SIZE, "compat=1.1,lazy_refcounts=on", seed=51)
    H.qemu_io(v.img, *scatter(v, SIZE))


@variant("dirty")
def _(v):
    from_raw(v, SIZE, "compat=1.1,lazy_refcounts=on", seed=52)
    H.qemu_io(v.img, *scatter(v, SIZE))
    # allocate new clusters, then die without flushing: the refcounts on disk are stale
    H.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xd1 20M 3M", "-c", "write -P 0xd2 100k 8k",
           "-c", "abort", v.img], check=False)
    dirty, _c = H.header_bits(v.img)
    if not dirty:
        raise RuntimeError("qemu-io abort left the dirty bit clear")
    rc, out = H.check_clean(v.img)
    print("  (dirty image before mounting: qemu-img check exit %d)" % rc, flush=True)


# ---- external data files -----------------------------------------------------------------------


@variant("data-file", compress=False)
def _(v):
    H.create(v.img, SIZE, "data_file=%s" % v.path("disk.data"))
    H.qemu_io(v.img, "write -P 0x71 0 5M", "write -P 0x72 20000001 3333",
              *scatter(v, SIZE, compress=False))
    v.protected = []


@variant("data-file-raw", compress=False)
def _(v):
    H.create(v.img, SIZE, "data_file=%s,data_file_raw=on" % v.path("disk.data"))
    H.qemu_io(v.img, "write -P 0x73 64k 4M", "write -P 0x74 17M 4097",
              *scatter(v, SIZE, compress=False))
    v.raw_data_file = v.path("disk.data")


# ---- preallocation -----------------------------------------------------------------------------

for _mode in ("metadata", "falloc", "full"):
    def _mk(v, mode=_mode):
        H.create(v.img, 16 * MiB, "preallocation=%s" % mode)
        H.qemu_io(v.img, *scatter(v, 16 * MiB))
    variant("prealloc-%s" % _mode, compress=False)(_mk)


print("built %d variants" % len(variants), flush=True)


# ---- the random operations ---------------------------------------------------------------------


def rand_len(rnd):
    r = rnd.random()
    if r < 0.3:
        return rnd.randrange(1, 4097)
    if r < 0.65:
        return rnd.randrange(4097, 256 * KiB)
    if r < 0.9:
        return rnd.randrange(256 * KiB, 1 * MiB)
    return rnd.randrange(1 * MiB, 3 * MiB + 1)


def rand_data(rnd, n):
    r = rnd.random()
    if r < 0.7:
        return rnd.randbytes(n)
    if r < 0.8:
        return bytes(n)  # all zeros, written as data
    if r < 0.9:
        pat = rnd.randbytes(rnd.randrange(1, 600))
        return (pat * (n // len(pat) + 1))[:n]
    # random data with zero holes
    b = bytearray(rnd.randbytes(n))
    for _ in range(rnd.randrange(1, 6)):
        a = rnd.randrange(n)
        e = min(n, a + rnd.randrange(1, 70000))
        b[a:e] = bytes(e - a)
    return bytes(b)


def rand_range(rnd, v, size, ln):
    """An offset for a range of `ln` bytes inside [0, size): random, straddling a cluster or an
    L2-table boundary, sector-aligned, or at the end."""
    ln = min(ln, size)
    kind = rnd.randrange(6)
    if kind == 1:
        b = rnd.randrange(1, max(size // v.cs, 2)) * v.cs
        off = b - rnd.randrange(1, max(min(ln, v.cs), 2))
    elif kind == 2 and v.l2_span < size:
        b = rnd.randrange(1, size // v.l2_span + 1) * v.l2_span
        off = b - rnd.randrange(0, max(ln, 1))
    elif kind == 3:
        off = rnd.randrange(0, max(size - ln, 1)) // 512 * 512
        ln = max(512, ln // 512 * 512)
    elif kind == 4:
        off = size - ln
    else:
        off = rnd.randrange(0, max(size - ln + 1, 1))
    off = max(0, min(off, size - ln))
    return off, max(1, min(ln, size - off))


def check_point(f, rnd, v, size, deep):
    """Reads back through the mount and compares with the reference. `deep`: fsync, drop the
    page cache first so that the reads reach qcowfs."""
    probs = []
    if deep:
        f.fsync()
        H.drop_page_cache(f.fv)
    p = f.size_problem()
    if p:
        probs.append(p)
    for _ in range(4):
        ln = rand_len(rnd)
        off, ln = rand_range(rnd, v, size, ln)
        p = f.verify(off, ln)
        if p:
            probs.append(p)
    return probs


def huge_grow(f, rnd, v):
    """Grows the disk to up to 1 TiB (the L1 table grows and moves), writes near the new end
    and in the middle, reads back through qcowfs, and shrinks back."""
    old = f.size()
    # QEMU's L1 limit is 32 MiB (4 Mi entries): stay well inside it
    big = min(1 << 40, (1 << 21) * v.l2_span) // 512 * 512
    f.truncate(big, by_path=rnd.random() < 0.5)
    probs = []
    spots = [big - rnd.randrange(1, 200000), rnd.randrange(old, big - MiB),
             big // 2 // v.cs * v.cs - rnd.randrange(1, 4000)]
    for off in spots:
        ln = min(rnd.randrange(1, 150000), big - off)
        f.pwrite(off, rand_data(rnd, ln))
    f.fsync()
    H.drop_page_cache(f.fv)
    for off in spots:
        p = f.verify(max(0, off - 5000), 160000)
        if p:
            probs.append("at %d bytes: %s" % (big, p))
    p = f.verify(old - 1000, 300000)  # the old end: zeros beyond it
    if p:
        probs.append("at %d bytes: %s" % (big, p))
    p = f.size_problem()
    if p:
        probs.append(p)
    f.truncate(old, by_path=rnd.random() < 0.5)
    return probs


def rerun(v):
    return "repeat with QCOWFS_TEST_SEED=%d QCOWFS_VARIANTS=%s QCOWFS_WRITE_OPS=%d" % (
        SEED, v.name, NOPS)


def run_ops(v, m, rnd):
    """Applies NOPS random operations; returns True if every one worked and every read-back
    matched."""
    orig = os.path.getsize(v.ref)
    view = m.path(v.view)
    try:
        f = H.DualFile(view, v.ref)
    except OSError as e:
        T.check("%s: open %s read-write" % (v.name, v.view), False, H.errname(e.errno))
        return False
    counts = {}
    problems = []
    reopen_at = rnd.randrange(NOPS // 3, 2 * NOPS // 3 + 1)
    huge_at = rnd.randrange(NOPS // 4, 3 * NOPS // 4 + 1)

    def while_closed():
        # The last handle is closed. FUSE sends the release asynchronously (close(2) does not
        # wait for it), so give the daemon up to 15 s; then, still mounted, the image on disk
        # must be complete and clean: check exit 0, dirty/corrupt clear, content identical.
        last = {}

        def clean():
            last["check"] = H.check_clean(v.img, force_share=True)
            last["bits"] = H.header_bits(v.img)
            if last["check"][0] != 0 or last["bits"] != (False, False):
                return False
            last["compare"] = H.qemu_compare(v.img, v.ref, cwd=v.src, force_share=True)
            return last["compare"][0] == 0
        ok, secs = H.wait_for(clean, timeout=15, interval=0.2)
        rc, out = last.get("check", (None, ""))
        crc, cout = last.get("compare", (None, "not compared"))
        T.check("%s: within 15 s of the last close, while mounted: qemu-img check -U exit 0, "
                "dirty/corrupt bits clear, qemu-img compare with the reference identical" %
                v.name, ok, "after %.1fs: check exit %s, (dirty, corrupt) = %s, compare exit %s "
                "(%s): %s" % (secs, rc, last.get("bits"), crc, cout[-300:], H.clip_text(out)))
        if ok and secs > 0.1:
            print("  (%s: on disk complete %.1fs after the last close)" % (v.name, secs),
                  flush=True)

    try:
        for i in range(NOPS):
            if i == reopen_at:
                f.reopen(while_closed)
                counts["close+reopen"] = 1
            if i == huge_at and v.grow and not v.snapshots:
                problems += huge_grow(f, rnd, v)
                counts["huge grow and back"] = 1
                if problems:
                    break
            size = f.size()
            r = rnd.random()
            if r < 0.5:
                ln = rand_len(rnd)
                off, ln = rand_range(rnd, v, size, ln)
                f.pwrite(off, rand_data(rnd, ln))
                op = "write"
                p = f.verify(max(0, off - 700), ln + 1400)  # the write and around it
                if p:
                    problems.append("after %s: %s" % (f.history[-1], p))
            elif r < 0.54:
                # through a shared writable mapping (the kernel writes the pages back)
                ln = min(rand_len(rnd), 512 * KiB)
                off, ln = rand_range(rnd, v, size, ln)
                f.mmap_write(off, rand_data(rnd, ln))
                op = "mmap write"
            elif r < 0.6:
                off, ln = rand_range(rnd, v, size, rand_len(rnd))
                f.punch(off, ln)
                op = "punch"
            elif r < 0.7:
                off, ln = rand_range(rnd, v, size, rand_len(rnd))
                f.zero_range(off, ln)
                op = "zero_range"
            elif r < 0.73:
                off, ln = rand_range(rnd, v, size, rand_len(rnd))
                f.allocate(off, ln)
                op = "allocate"
            elif r < 0.75 and v.grow:
                # fallocate across the end without KEEP_SIZE: grows the disk (the end on a
                # sector boundary: qcow2 sizes are whole sectors)
                end = min(size + rand_len(rnd) % (2 * MiB) + 1, orig * 3 // 2)
                end = max((end + 511) // 512 * 512, size + 512)
                off = max(0, size - rnd.randrange(0, 3 * v.cs))
                if rnd.random() < 0.5:
                    f.allocate(off, end - off)
                    op = "fallocate past the end"
                else:
                    f.zero_range(off, end - off, keep_size=False)
                    op = "zero_range past the end"
            elif r < 0.77 and v.grow:
                # write across the end: the file grows (to a sector multiple: qcow2 sizes are)
                ln = rand_len(rnd) % (2 * MiB) + 1
                off = max(0, size - rnd.randrange(0, min(ln, 3 * v.cs) + 1))
                end = (off + ln + 511) // 512 * 512
                if end > orig * 3 // 2:
                    off = max(0, size - ln // 2)
                    end = max(size, (off + ln + 511) // 512 * 512)
                f.pwrite(off, rand_data(rnd, end - off))
                op = "write past the end"
            elif r < 0.85:
                grow = size < orig // 2 + 512 or (size < orig * 3 // 2 and rnd.random() < 0.5)
                grow = grow and v.grow
                by_path = rnd.random() < 0.5
                if grow:
                    new = rnd.randrange(size + 512, orig * 3 // 2 + 1024) // 512 * 512
                    f.truncate(new, by_path)
                    op = "truncate grow"
                elif v.snapshots:
                    new = rnd.randrange(orig // 2, size) // 512 * 512
                    op = "truncate shrink (must fail: snapshots)"
                    try:
                        f.truncate(new, by_path)
                        T.check("%s: shrinking from %d to %d fails (internal snapshots)" % (
                            v.name, size, new), False, "it succeeded; st_size now %d" %
                            os.stat(view).st_size)
                        return False
                    except H.OpError as e:
                        f.history[-1] += " -> failed as it must (%s)" % e.err
                    st = os.stat(view).st_size
                    if st != size:
                        problems.append("failed shrink changed st_size to %d (was %d)" % (st, size))
                    p = f.verify(max(0, new - 70000), size - new + 70000)
                    if p:
                        problems.append("after a failed shrink: %s" % p)
                else:
                    new = rnd.randrange(orig // 2, size) // 512 * 512
                    if rnd.random() < 0.3:
                        new = new // v.cs * v.cs + rnd.choice((0, 512, v.cs - 512 if v.cs > 512 else 0))
                    f.truncate(max(new, 512), by_path)
                    op = "truncate shrink"
            elif r < 0.9:
                f.fsync(data_only=rnd.random() < 0.3)
                op = "fsync"
            else:
                problems += ["after %s: %s" % (f.history[-1], p) for p in
                             check_point(f, rnd, v, size, deep=rnd.random() < 0.5)]
                op = "read back"
            counts[op] = counts.get(op, 0) + 1
            if problems:
                break
        if not problems:
            # the end state, read through qcowfs rather than the page cache
            f.fsync()
            H.drop_page_cache(f.fv)
            problems += H.compare(view, v.ref, nreads=24, seed=rnd.randrange(1 << 30),
                                  cluster_size=v.cs)
        if problems and f.size() < 1 << 30:
            problems.append(f.first_difference() or "(the whole file is equal now)")
    except H.OpError as e:
        T.check("%s: operation %d" % (v.name, len(f.history)), False,
                "%s; operations before it: %s; %s" % (e, "; ".join(f.history[-7:-1]), rerun(v)))
        return False
    finally:
        f.close()
    T.check("%s: %d operations (%s) read back like the reference" % (
        v.name, sum(counts.values()), ", ".join("%d %s" % (n, k) for k, n in sorted(counts.items()))),
        not problems, "%s; last operations: %s; %s" % (
            "; ".join(problems[:3] + (problems[-1:] if len(problems) > 3 else [])), f.recent(),
            rerun(v)))
    return not problems


def check_snapshot_views(v, m, when):
    for s, ref in v.snap_refs.items():
        T.check_compare("%s: snapshot view disk@%s.raw unchanged (%s)" % (v.name, s, when),
                        m.path("disk@%s.raw" % s), ref, nreads=10, cluster_size=v.cs)


def after_unmount(v, ops_ok):
    rc, out = H.check_clean(v.img)
    T.check("%s: qemu-img check exit 0 (no errors, no leaks)" % v.name, rc == 0,
            "exit %d: %s" % (rc, H.clip_text(out)))
    dirty, corrupt = H.header_bits(v.img)
    T.check("%s: dirty and corrupt bits clear after unmount" % v.name, not dirty and not corrupt,
            "dirty=%s corrupt=%s" % (dirty, corrupt))
    if ops_ok:
        vs, rs = H.virtual_size(v.img), os.path.getsize(v.ref)
        T.check("%s: virtual size %d == reference size" % (v.name, rs), vs == rs,
                "qemu-img info says %d" % vs)
        rc, out = H.qemu_compare(v.img, v.ref, cwd=v.src)
        detail = "exit %d: %s" % (rc, out[-600:])
        if rc != 0:
            conv = os.path.join(v.dir, "after.raw")
            try:
                H.to_raw(v.img, conv, cwd=v.src)
                detail += "; %s; differing ranges: %s" % (
                    H.first_diff_files(conv, v.ref), ", ".join(H.diff_ranges(conv, v.ref)))
            except Exception as e:
                detail += "; (convert failed: %s)" % e
        T.check("%s: qemu-img compare with the reference: identical" % v.name, rc == 0, detail)
    else:
        print("  %s: contents not compared (the operations did not all work)" % v.name, flush=True)
    names = H.snapshot_names(v.img)
    T.check("%s: snapshot list unchanged" % v.name, sorted(names) == sorted(v.snap_refs),
            "now %s, was %s" % (names, sorted(v.snap_refs)))
    for s, ref in v.snap_refs.items():
        if s not in names:
            continue
        out = os.path.join(v.dir, "snap-after-%s.raw" % s)
        H.to_raw(v.img, out, snapshot=s, cwd=v.src)
        d = H.snapshot_content_diff(out, ref)
        T.check("%s: snapshot %s holds its old content" % (v.name, s), d is None, d)
    if v.snap_table:
        now = [dict((k, e[k]) for k in ("id", "name", "l1_size", "disk_size"))
               for e in H.snapshot_table(v.img)]
        was = [dict((k, e[k]) for k in ("id", "name", "l1_size", "disk_size"))
               for e in v.snap_table]
        T.check("%s: snapshot table entries (id, name, L1 size, disk size) unchanged" % v.name,
                now == was, "now %s, was %s" % (now, was))
    for p, h in v.protected_hash.items():
        T.check("%s: %s unchanged" % (v.name, os.path.basename(p)), H.sha256_file(p) == h,
                "sha256 changed")
    if v.raw_data_file and ops_ok:
        # data_file_raw=on: the data file itself is the disk, byte for byte
        vs = os.path.getsize(v.ref)
        with open(v.raw_data_file, "rb") as a, open(v.ref, "rb") as b:
            pos, bad = 0, None
            while pos < vs and bad is None:
                x = a.read(1 * MiB)
                y = b.read(1 * MiB)
                x = x + bytes(len(y) - len(x)) if len(x) < len(y) else x[:len(y)]
                if x != y:
                    bad = pos + H._first_diff(x, y)
                pos += len(y)
                if not y:
                    break
        T.check("%s: the raw external data file equals the disk" % v.name, bad is None,
                "first difference at %s" % bad)


for v in variants:
    t0 = time.monotonic()
    rnd = random.Random(SEED ^ zlib.crc32(v.name.encode()))
    # About half the variants (which ones depends on the seed) without the data write-back
    # cache, so that each operation reaches the qcow2 write path on its own, not coalesced.
    args = ["-o", "write_cache=0"] if (zlib.crc32(v.name.encode()) + SEED) % 2 else []
    print("-- %s (cluster %d, %d bytes%s)" % (v.name, v.cs, os.path.getsize(v.ref),
                                              ", -o write_cache=0" if args else ""), flush=True)
    ops_ok = False
    try:
        with T.step("%s: mount, write, unmount" % v.name):
            with H.Mount(v.src, args=args) as m:
                if v.snap_refs:
                    check_snapshot_views(v, m, "before writing")
                ops_ok = run_ops(v, m, rnd)
                if v.snap_refs:
                    check_snapshot_views(v, m, "after writing")
                if not m.alive():
                    T.check("%s: qcowfs still running" % v.name, False,
                            "exit %s; log: %s" % (m.proc.returncode, m.log_text()[-1500:]))
            T.check("%s: unmounted, qcowfs exited 0" % v.name, True)
        with T.step("%s: after unmount" % v.name):
            after_unmount(v, ops_ok)
    finally:
        print("   (%s: %.1fs)" % (v.name, time.monotonic() - t0), flush=True)

# ---- space: punched ranges are released, zeroed ranges become zero clusters ---------------------


def qemu_map(img, cwd=None):
    import json
    return json.loads(H.run(["qemu-img", "map", "--output=json", img], cwd=cwd).out)


def map_problems(img, start, end, want_zero, cwd=None):
    """Ranges of [start, end) that qemu-img map shows with data (or, for want_zero, not as
    zero clusters of the image itself)."""
    bad = []
    for e in qemu_map(img, cwd):
        a, b = max(e["start"], start), min(e["start"] + e["length"], end)
        if a >= b:
            continue
        if e.get("data") or (want_zero and not (e.get("zero") and e.get("depth", 0) == 0)):
            bad.append("%d-%d %s" % (a, b, dict((k, e.get(k)) for k in ("data", "zero", "depth"))))
    return bad


def allocated_clusters(img):
    import json
    p = H.run(["qemu-img", "check", "--output=json", img], check=False)
    j = json.loads(p.out)
    # qemu-img leaves the field out when it is 0
    return j.get("allocated-clusters", 0) if "total-clusters" in j else None


if not ONLY or "space" in ONLY:
    with T.step("space: punch releases, ZERO_RANGE makes zero clusters"):
        sp = os.path.join(work, "space")
        ssrc = os.path.join(sp, "src")
        os.makedirs(ssrc)
        plain = os.path.join(ssrc, "plain.qcow2")
        H.create(plain, 16 * MiB, "cluster_size=64k")
        base = os.path.join(ssrc, "sbase.qcow2")
        H.create(base, 16 * MiB)
        H.qemu_io(base, "write -P 0x5b 0 16M")
        over = os.path.join(ssrc, "over.qcow2")
        H.create(over, 16 * MiB, backing="sbase.qcow2", cwd=ssrc)
        with H.Mount(ssrc) as m:
            fd = os.open(m.path("plain.raw"), os.O_RDWR)
            try:
                H.pwrite_full(fd, random.Random(SEED).randbytes(8 * MiB), 0)
                os.fsync(fd)
                H.fallocate(fd, H.FALLOC_FL_PUNCH_HOLE | H.FALLOC_FL_KEEP_SIZE, 1 * MiB, 2 * MiB)
                H.fallocate(fd, H.FALLOC_FL_ZERO_RANGE | H.FALLOC_FL_KEEP_SIZE, 4 * MiB, 2 * MiB)
                os.fsync(fd)
            finally:
                os.close(fd)
            fd = os.open(m.path("over.raw"), os.O_RDWR)
            try:
                H.fallocate(fd, H.FALLOC_FL_PUNCH_HOLE | H.FALLOC_FL_KEEP_SIZE, 1 * MiB, 2 * MiB)
                H.fallocate(fd, H.FALLOC_FL_ZERO_RANGE | H.FALLOC_FL_KEEP_SIZE, 4 * MiB, 2 * MiB)
                os.fsync(fd)
                got = H.pread_full(fd, 6 * MiB, 0)
            finally:
                os.close(fd)
            T.check("space: over a backing file, punched and zeroed ranges read as zeros",
                    got[1 * MiB:3 * MiB] == bytes(2 * MiB) and got[4 * MiB:6 * MiB] ==
                    bytes(2 * MiB) and got[:1 * MiB] == b"\x5b" * MiB,
                    "first bytes of each range: %r %r %r" % (got[:4], got[1 * MiB:1 * MiB + 4],
                                                            got[4 * MiB:4 * MiB + 4]))
        for img in (plain, over):
            rc, out = H.check_clean(img)
            T.check("space: %s: qemu-img check exit 0" % os.path.basename(img), rc == 0,
                    "exit %d: %s" % (rc, H.clip_text(out)))
        bad = map_problems(plain, 1 * MiB, 3 * MiB, False)
        T.check("space: plain: the punched 2 MiB hold no data (qemu-img map)", not bad,
                "; ".join(bad[:4]))
        bad = map_problems(plain, 4 * MiB, 6 * MiB, True)
        T.check("space: plain: the zeroed 2 MiB are zero clusters (qemu-img map)", not bad,
                "; ".join(bad[:4]))
        n = allocated_clusters(plain)
        T.check("space: plain: at most 96 of 128 written clusters still allocated after "
                "punching 32 (got %s)" % n, n is not None and n <= 96, "allocated-clusters %s" % n)
        for a, b, what in ((1 * MiB, 3 * MiB, "punched"), (4 * MiB, 6 * MiB, "zeroed")):
            bad = map_problems(over, a, b, True, cwd=ssrc)
            T.check("space: overlay: the %s 2 MiB are zero clusters of the overlay, no data, "
                    "backing hidden (qemu-img map)" % what, not bad, "; ".join(bad[:4]))
        n = allocated_clusters(over)
        T.check("space: overlay: no data clusters allocated for zeroing (got %s)" % n, n == 0,
                "allocated-clusters %s" % n)


print("seed was %d" % SEED, flush=True)
T.finish()
