#!/usr/bin/env python3
"""Every qcow2 variant qemu-img can make reads back exactly as `qemu-img convert -O raw` shows it:
versions, cluster sizes, refcount widths, zero/compressed (zlib, zstd) clusters, extended L2,
backing chains (qcow2, raw, relative, shorter), external data files, preallocation modes, odd
virtual sizes, internal snapshots, the dirty bit, and a 16 TiB sparse image."""

import errno
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB, TiB = H.KiB, H.MiB, H.TiB
T = H.TestRun("read_variants", deadline=400)

work = H.tempdir("variants")
SRC = os.path.join(work, "src")
REF = os.path.join(work, "ref")
os.makedirs(SRC)
os.makedirs(REF)

# (view path relative to MNT, image path, snapshot name or None, cluster size)
targets = []


def std_writes(cs):
    """Varied writes: patterns (aligned and unaligned), zeroes with and without unmap, a
    compressed cluster, a discard. Offsets fit a 4 MiB image (8 MiB for 2 MiB clusters)."""
    c = max(cs, 64 * KiB)
    return [
        "write -P 0x5a 4k 100k",
        "write -P 0xa5 %d %d" % (7 * c + 12345, c + 70003),  # unaligned, 3 clusters
        "write -P 0x11 %d %d" % (c, c),          # will be zeroed below
        "write -z %d 4k" % c,                    # partial zero inside an allocated cluster
        "write -z %d %d" % (2 * c, c),           # zero cluster on an unallocated cluster
        "write -P 0x22 %d %d" % (3 * c, c),
        "write -z -u %d %d" % (3 * c, c),        # zero with unmap
        "write -c -P 0x33 %d %d" % (4 * c, cs),  # one compressed cluster
        "write -P 0x44 %d %d" % (5 * c, 2 * c),
        "discard %d %d" % (5 * c, c),            # discard an allocated cluster
        "write -P 0x66 %d 1000" % (6 * c + 7),
    ]


def add(name, img, snapshot=None, cs=64 * KiB, view=None, cwd=None):
    rel = os.path.relpath(img, SRC)
    d, base = os.path.split(rel)
    for suf in (".qcow2", ".qcow"):
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    if view is None:
        view = base + ("@" + snapshot if snapshot else "") + ".raw"
        view = os.path.join(d, view)
    targets.append((name, view, img, snapshot, cs, cwd))


def build(name, fn):
    with T.step("build %s" % name):
        fn()


def img(name):
    return os.path.join(SRC, name)


# ---- versions, cluster sizes, refcount widths -----------------------------------------------

def v(name, opts, cs=64 * KiB, size=4 * MiB):
    def fn():
        p = img(name + ".qcow2")
        H.create(p, size, opts)
        H.qemu_io(p, *std_writes(cs))
        add(name, p, cs=cs)
    build(name, fn)


v("v2", "compat=0.10")
v("v3", "compat=1.1")
v("cs512", "cluster_size=512", cs=512)
v("cs4k", "cluster_size=4k", cs=4 * KiB)
v("cs64k", "cluster_size=64k")
v("cs2m", "cluster_size=2M", cs=2 * MiB, size=24 * MiB)
for bits in (1, 2, 4, 8, 16, 32, 64):
    v("refcount%d" % bits, "compat=1.1,refcount_bits=%d" % bits)


# ---- zero clusters --------------------------------------------------------------------------

def zeros():
    p = img("zeros.qcow2")
    H.create(p, 4 * MiB, "compat=1.1")
    H.qemu_io(p, "write -P 0x77 0 4M", "write -z 64k 64k", "write -z -u 256k 192k",
              "write -z 1000000 5000", "write -z -u 3M 1M")
    add("zero clusters", p)


build("zeros", zeros)


# ---- compression ----------------------------------------------------------------------------

varied = os.path.join(work, "varied.bin")
H.write_varied_raw(varied, 4 * MiB, seed=7)
varied_big = os.path.join(work, "varied-big.bin")
H.write_varied_raw(varied_big, 8 * MiB, seed=8)


def compressed(name, opts, src=varied, cs=64 * KiB):
    def fn():
        p = img(name + ".qcow2")
        H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, p)
        add(name, p, cs=cs)
    build(name, fn)


compressed("cmp-zlib", "compression_type=zlib")
compressed("cmp-zstd", "compression_type=zstd")
compressed("cmp-zlib-4k", "compression_type=zlib,cluster_size=4k", cs=4 * KiB)
compressed("cmp-zstd-512", "compression_type=zstd,cluster_size=512", cs=512)
compressed("cmp-zstd-2m", "compression_type=zstd,cluster_size=2M", src=varied_big, cs=2 * MiB)


def plain_from_raw():
    p = img("plain.qcow2")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", varied, p)
    add("uncompressed copy of varied data", p)


build("plain", plain_from_raw)


def zstd_qemu_io():
    p = img("zstd-io.qcow2")
    H.create(p, 4 * MiB, "compression_type=zstd")
    H.qemu_io(p, "write -c -P 0x12 0 128k", "write -c -P 0x34 1M 64k", "write -P 0x56 1M 100",
              "write -c -P 0x78 3M 1M")
    add("zstd via qemu-io write -c", p)


build("zstd-io", zstd_qemu_io)


def compressed_mixed():
    # compressed clusters from real data, then partly overwritten (copy-on-write of compressed
    # clusters) and partly zeroed
    p = img("cmp-mixed.qcow2")
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", varied, p)
    H.qemu_io(p, "write -P 0x99 100000 3000", "write -z 1M 64k", "write -z -u 2M 100k",
              "discard 3M 64k")
    add("compressed then overwritten", p)


build("cmp-mixed", compressed_mixed)


# ---- extended L2 ----------------------------------------------------------------------------

def ext_l2_writes(cs):
    sc = cs // 32
    return [
        "write -P 0x01 0 %d" % sc,                          # subcluster 0 only
        "write -P 0x02 %d %d" % (3 * sc + 100, 2 * sc),     # unaligned, spans subclusters
        "write -z %d %d" % (cs + 5 * sc, sc),               # zero subcluster, unallocated cluster
        "write -P 0x03 %d %d" % (2 * cs, cs),               # full cluster
        "write -z %d %d" % (2 * cs + 7 * sc, 3 * sc),       # zero subclusters in allocated cluster
        "write -z -u %d %d" % (2 * cs + 20 * sc, sc),
        "write -P 0x04 %d %d" % (3 * cs + 31 * sc, 2 * sc),  # spans a cluster boundary
        "write -c -P 0x05 %d %d" % (5 * cs, cs),            # compressed cluster
        "discard %d %d" % (2 * cs + 12 * sc, sc),
    ]


def ext_l2(name, cs, size):
    def fn():
        p = img(name + ".qcow2")
        H.create(p, size, "extended_l2=on,cluster_size=%d" % cs)
        H.qemu_io(p, *ext_l2_writes(cs))
        add(name, p, cs=cs)
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
    add("extended L2 over a backing file", top)
    add("extended L2 base", base)


build("extl2-backed", ext_l2_backed)


# ---- backing files --------------------------------------------------------------------------

def chain():
    prev = None
    for i in range(4):
        p = img("chain%d.qcow2" % i)
        H.create(p, 4 * MiB, backing=os.path.basename(prev) if prev else None, cwd=SRC)
        H.qemu_io(p, "write -P 0x%02x %d 300k" % (0x10 + i, i * 700 * KiB + 1234),
                  "write -z %d 64k" % ((3 - i) * 900 * KiB),
                  "write -P 0x%02x 3M 4k" % (0x50 + i))
        prev = p
        add("chain depth %d" % i, p)


build("chain", chain)


def no_backing_format():
    # the backing format extension replaced by an unknown (ignorable) extension type: the backing
    # file's format must be probed, and the unknown extension skipped
    base = img("nbf-base.qcow2")
    H.create(base, 4 * MiB)
    H.qemu_io(base, "write -P 0x17 0 4M")
    top = img("nbf-top.qcow2")
    H.create(top, 4 * MiB, backing="nbf-base.qcow2", cwd=SRC)
    H.qemu_io(top, "write -P 0x18 1M 64k")
    off, typ, ln = H.header_extensions(top)[0]
    if typ != 0xe2792aca:
        raise RuntimeError("first extension is 0x%x, not the backing format" % typ)
    H.patch(top, off, b"\x7e\x57\xe5\x75")
    add("backing format extension absent, unknown extension present", top)


build("no-backing-format", no_backing_format)


def raw_backing():
    base = os.path.join(SRC, "rawbase.bin")  # raw: not shown itself
    H.write_varied_raw(base, 4 * MiB, seed=3)
    p = img("rawbacked.qcow2")
    H.create(p, 4 * MiB, backing="rawbase.bin", backing_fmt="raw", cwd=SRC)
    H.qemu_io(p, "write -P 0x21 64k 64k", "write -z 1M 100k", "write -P 0x22 3000001 999")
    add("raw backing file", p)


build("raw-backing", raw_backing)


def relative_backing():
    d = os.path.join(SRC, "rel")
    os.makedirs(d)
    H.create("rbase.qcow2", 4 * MiB, cwd=d)
    H.qemu_io("rbase.qcow2", "write -P 0x31 0 4M", cwd=d)
    H.create("rtop.qcow2", 4 * MiB, backing="rbase.qcow2", cwd=d)
    H.qemu_io("rtop.qcow2", "write -P 0x32 1M 64k", cwd=d)
    add("relative backing name (same dir)", os.path.join(d, "rtop.qcow2"))
    # backing in a sibling directory, named relative to the image's directory
    bases = os.path.join(SRC, "bases")
    os.makedirs(bases)
    H.create("sib.qcow2", 4 * MiB, cwd=bases)
    H.qemu_io("sib.qcow2", "write -P 0x41 0 2M", cwd=bases)
    d2 = os.path.join(SRC, "rel2")
    os.makedirs(d2)
    H.create("stop.qcow2", 4 * MiB, backing="../bases/sib.qcow2", cwd=d2)
    H.qemu_io("stop.qcow2", "write -P 0x42 1536k 1M", cwd=d2)
    add("relative backing name (../bases)", os.path.join(d2, "stop.qcow2"))


build("relative-backing", relative_backing)


def short_backing():
    base = img("shortbase.qcow2")
    H.create(base, 1000000)  # qemu rounds to 1000448, not a cluster multiple
    H.qemu_io(base, "write -P 0x61 0 1000448")
    top = img("shorttop.qcow2")
    H.create(top, 4 * MiB, backing="shortbase.qcow2", cwd=SRC)
    H.qemu_io(top, "write -P 0x62 2M 64k", "write -P 0x63 500000 1000")
    add("backing file shorter than the overlay", top)
    # and a qcow2 base shorter than the overlay with a raw backing in turn
    rb = os.path.join(SRC, "shortraw.bin")
    with open(rb, "wb") as f:
        f.write(b"\x7e" * 100000)
    top2 = img("shortrawtop.qcow2")
    H.create(top2, 1 * MiB, backing="shortraw.bin", backing_fmt="raw", cwd=SRC)
    add("raw backing file shorter than the overlay", top2)


build("short-backing", short_backing)


# ---- external data file ---------------------------------------------------------------------

def data_files():
    # absolute data file names (qemu resolves a relative one against its cwd)
    p = img("ext.qcow2")
    H.create(p, 4 * MiB, "data_file=%s" % img("ext.data"))
    H.qemu_io(p, "write -P 0x71 0 1M", "write -P 0x72 2000000 3333", "write -z 512k 64k")
    add("external data file", p)
    p = img("extraw.qcow2")
    H.create(p, 4 * MiB, "data_file=%s,data_file_raw=on" % img("extraw.data"))
    H.qemu_io(p, "write -P 0x73 64k 1M", "write -P 0x74 3M 4097")
    add("external data file, data_file_raw=on", p)
    # a relative data file name, the image and the data file in the same directory: qemu (run
    # from that directory) and qcowfs (resolving against the image's directory) agree
    p = img("extrel.qcow2")
    H.create("extrel.qcow2", 4 * MiB, "data_file=extrel.data", cwd=SRC)
    H.qemu_io("extrel.qcow2", "write -P 0x75 1M 1M", "write -z 1536k 4k", cwd=SRC)
    add("external data file, relative name", p, cwd=SRC)


build("data-file", data_files)


# ---- preallocation --------------------------------------------------------------------------

for mode in ("off", "metadata", "falloc", "full"):
    def fn(mode=mode):
        p = img("prealloc-%s.qcow2" % mode)
        H.create(p, 4 * MiB, "preallocation=%s" % mode)
        H.qemu_io(p, "write -P 0x81 100k 200k", "write -z 2M 64k")
        add("preallocation=%s" % mode, p)
    build("prealloc-" + mode, fn)


# ---- odd virtual sizes ----------------------------------------------------------------------

def odd_sizes():
    for name, size in (("odd1000000", 1000000), ("odd12345", 12345)):
        p = img(name + ".qcow2")
        H.create(p, size, "cluster_size=64k")
        vsize = H.info(p)["virtual-size"]
        H.qemu_io(p, "write -P 0x91 0 %d" % min(vsize, 5000),
                  "write -P 0x92 %d %d" % (vsize - 1000, 1000))
        add("virtual size %d (%d)" % (size, vsize), p)
    p = img("odd-cs4k.qcow2")
    H.create(p, 1000000, "cluster_size=4k")
    H.qemu_io(p, "write -P 0x93 0 1000448")
    add("virtual size 1000000, 4k clusters, full", p, cs=4 * KiB)


build("odd-sizes", odd_sizes)


# ---- internal snapshots ---------------------------------------------------------------------

def snapshots():
    for name, opts in (("snap", "compat=1.1"), ("snapv2", "compat=0.10")):
        p = img(name + ".qcow2")
        H.create(p, 4 * MiB, opts)
        H.qemu_io(p, "write -P 0xa1 0 1M", "write -P 0xa2 2M 64k")
        H.qemu_img("snapshot", "-c", "s1", p)
        H.qemu_io(p, "write -P 0xa3 512k 1M", "write -z 2M 64k", "write -c -P 0xa4 3M 64k")
        H.qemu_img("snapshot", "-c", "s2", p)
        H.qemu_io(p, "write -P 0xa5 0 4k", "discard 3M 64k", "write -P 0xa6 1000000 12345")
        add("%s current" % name, p)
        add("%s snapshot s1" % name, p, snapshot="s1")
        add("%s snapshot s2" % name, p, snapshot="s2")


build("snapshots", snapshots)


# ---- dirty bit ------------------------------------------------------------------------------

def dirty():
    p = img("dirty.qcow2")
    H.create(p, 4 * MiB, "compat=1.1,lazy_refcounts=on")
    H.qemu_io(p, "write -P 0xd1 0 1M", "write -P 0xd2 3M 12345")
    feats = H.read_field(p, "incompatible_features")
    H.write_field(p, "incompatible_features", feats | 1)
    add("dirty bit set", p)


build("dirty", dirty)


# ---- the 16 TiB sparse image (not converted) ------------------------------------------------

BIG = 16 * TiB
big_ok = False


def big():
    global big_ok
    p = img("sparse16t.qcow2")
    H.create(p, "16T")
    H.qemu_io(p, "write -P 0xaa 0 64k", "write -P 0xbb 8T 64k",
              "write -P 0xcc %d 64k" % (BIG - 64 * KiB))
    big_ok = True


build("sparse16t", big)

# ---- references -----------------------------------------------------------------------------

refs = {}
for name, view, image, snap, cs, cwd in targets:
    with T.step("oracle for %s" % name):
        out = os.path.join(REF, "%d.raw" % len(refs))
        H.to_raw(image, out, snapshot=snap, cwd=cwd)
        refs[view] = out
print("built %d images/views to compare" % len(refs), flush=True)


# ---- mount and compare ----------------------------------------------------------------------

def map_data_extents(image, snap=None, cwd=None):
    """[(start, end)] of what qemu-img map calls data, adjacent ranges merged."""
    import json
    target = image
    if snap:
        target = os.path.join(work, "snapcopy-%s.qcow2" % os.getpid())
        shutil.copyfile(image, target)
        H.qemu_img("snapshot", "-a", snap, target)
    out = H.run(["qemu-img", "map", "--output=json", "-f", "qcow2", target], cwd=cwd).out
    res = []
    for e in json.loads(out):
        if not e.get("data"):
            continue
        start, end = e["start"], e["start"] + e["length"]
        if res and res[-1][1] == start:
            res[-1] = (res[-1][0], end)
        else:
            res.append((start, end))
    return res


def seek_data_extents(path):
    """[(start, end)] of data found with SEEK_DATA / SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        res, pos = [], 0
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            if h <= d:
                raise RuntimeError("SEEK_HOLE at %d returned %d" % (d, h))
            res.append((d, h))
            pos = h
        return res
    finally:
        os.close(fd)


class Remounting:
    """One mount for all images; if the daemon dies, the death is a failure and it is restarted
    so the remaining variants still say something."""

    def __init__(self):
        self.m = None
        self.start_failed = None

    def get(self):
        if self.start_failed:
            raise H.MountError("no mount (%s)" % self.start_failed)
        if self.m is not None and not self.m.alive():
            T.check("qcowfs still running", False, "daemon died (exit %s); log tail: %s" % (
                self.m.proc.returncode, self.m.log_text()[-1500:]))
            self.m.force_cleanup()
            self.m = None
        if self.m is None:
            try:
                self.m = H.Mount(SRC).start()
            except H.MountError as e:
                self.start_failed = str(e)[:300]
                raise
        return self.m

    def close(self):
        if self.m is not None and self.m.proc is not None:
            alive = self.m.alive()
            code = self.m.unmount() if alive else self.m.proc.returncode
            T.check("unmount: qcowfs exits 0", alive and code == 0, "exit code %s" % code)


R = Remounting()
try:
    with T.step("mount"):
        m = R.get()
        top = H.listdir_safe(m.mnt)
        print("  mount root: %s" % " ".join(top), flush=True)
    for name, view, image, snap, cs, cwd in targets:
        if view not in refs:
            continue
        with T.step("compare %s" % name):
            m = R.get()
            T.check_compare("%s: %s equals qemu-img convert" % (name, view), m.path(view),
                            refs[view], cluster_size=cs)

    # SEEK_DATA / SEEK_HOLE: the data extents of every view equal qemu-img map's "data" ranges
    # (for a snapshot: of a copy with the snapshot applied).
    for name, view, image, snap, cs, cwd in targets:
        if view not in refs:
            continue
        with T.step("seek %s" % name):
            m = R.get()
            expected = map_data_extents(image, snap, cwd)
            got = seek_data_extents(m.path(view))
            T.check("%s: SEEK_DATA/SEEK_HOLE extents equal qemu-img map" % name, got == expected,
                    "got %s, qemu-img map %s" % (got[:6], expected[:6]))

    with T.step("concurrent readers"):
        m = R.get()
        import random
        import threading
        picks = [t for t in targets if t[1] in refs and t[0] in (
            "cmp-zstd", "cmp-zlib", "extl2-64k", "chain depth 3", "cs512", "snap snapshot s1",
            "external data file, relative name", "cs2m")]
        errors = []

        def reader(idx):
            rnd = random.Random(idx)
            fds = {}
            try:
                for i in range(150):
                    name, view, image, snap, cs, cwd = picks[rnd.randrange(len(picks))]
                    if view not in fds:
                        fds[view] = (os.open(m.path(view), os.O_RDONLY), os.open(refs[view], os.O_RDONLY))
                    fv, fr = fds[view]
                    size = os.fstat(fr).st_size
                    off = rnd.randrange(size)
                    ln = rnd.randrange(1, 200000)
                    got = H.pread_full(fv, ln, off)
                    if got != H.pread_full(fr, ln, off):
                        errors.append("%s: pread(%d, %d) differs" % (view, ln, off))
            except OSError as e:
                errors.append("thread %d: %s" % (idx, e))
            finally:
                for fv, fr in fds.values():
                    os.close(fv)
                    os.close(fr)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        T.check("8 threads x 150 random preads over %d images at once" % len(picks),
                not errors and not any(t.is_alive() for t in threads), "; ".join(errors[:4]))

    if big_ok:
        with T.step("16 TiB sparse image"):
            m = R.get()
            vp = m.path("sparse16t.raw")
            st = os.stat(vp)
            T.check("16T: st_size == 16 TiB", st.st_size == BIG, "st_size %d" % st.st_size)
            host = os.stat(img("sparse16t.qcow2"))
            T.check("16T: st_blocks follows the image file", st.st_blocks == host.st_blocks,
                    "view %d, image %d" % (st.st_blocks, host.st_blocks))
            fd = os.open(vp, os.O_RDONLY)
            slow = []
            problems = []

            def rd(off, ln, expect):
                t0 = time.monotonic()
                try:
                    got = H.pread_full(fd, ln, off)
                except OSError as e:
                    problems.append("pread(%d, %d): %s" % (ln, off, e))
                    return
                dt = time.monotonic() - t0
                if dt > 3:
                    slow.append("pread(%d, off=%d) took %.1fs" % (ln, off, dt))
                if got != expect:
                    problems.append("pread(%d, off=%d): got %d bytes %r..., expected %d bytes "
                                    "%r..." % (ln, off, len(got), got[:8], len(expect),
                                               expect[:8]))

            rd(0, 64 * KiB, b"\xaa" * 65536)
            rd(1000, 70000, b"\xaa" * 64536 + bytes(5464))
            rd(8 * TiB - 100, 300, bytes(100) + b"\xbb" * 200)
            rd(8 * TiB + 65536 - 7, 17, b"\xbb" * 7 + bytes(10))
            rd(BIG - 64 * KiB - 3, 64 * KiB + 3, bytes(3) + b"\xcc" * 65536)
            rd(BIG - 1, 100, b"\xcc")
            rd(BIG, 100, b"")
            rd(BIG + 12345, 1, b"")
            import random
            rnd = random.Random(16)
            for _ in range(40):
                off = rnd.randrange(64 * KiB, BIG - 128 * KiB)
                if 8 * TiB - 300000 < off < 8 * TiB + 65536:
                    continue
                ln = rnd.randrange(1, 300000)
                rd(off, ln, bytes(ln))
            os.close(fd)
            T.check("16T: patterns at 0, 8T, end; zeros elsewhere; EOF", not problems,
                    "; ".join(problems[:4]))
            T.check("16T: every read answered within 3 s", not slow, "; ".join(slow[:4]))
            t0 = time.monotonic()
            got = seek_data_extents(vp)
            took = time.monotonic() - t0
            expected = map_data_extents(img("sparse16t.qcow2"))
            T.check("16T: SEEK_DATA/SEEK_HOLE extents equal qemu-img map (%.2fs)" % took, got == expected,
                    "got %s, qemu-img map %s" % (got[:6], expected[:6]))
            try:
                fd = os.open(vp, os.O_RDONLY)
                try:
                    os.lseek(fd, BIG, os.SEEK_DATA)
                finally:
                    os.close(fd)
                enxio = None
            except OSError as e:
                enxio = e.errno
            T.check("16T: SEEK_DATA at the end is ENXIO", enxio == errno.ENXIO, H.errname(enxio))
finally:
    with T.step("unmount"):
        R.close()

T.finish()
