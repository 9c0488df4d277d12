"""Writes through the mount over image variants, for test_write_variants.py and
test_write_layered.py: the same seeded random
operations go to MNT/NAME.raw and to a reference raw file (made by `qemu-img convert -O raw`
before mounting): pwrite of 1 byte to 3 MiB at random and unaligned offsets (straddling cluster
and L2-table boundaries too), fallocate PUNCH_HOLE and ZERO_RANGE, fallocate to allocate,
truncate to grow and shrink (with internal snapshots, shrinking must fail and change nothing),
writes past the end, fsync. The mounted file is read back during the run; after unmounting,
`qemu-img check` must be clean, `qemu-img compare` against the reference identical, the dirty
and corrupt bits clear, internal snapshots, backing files and external data files as before.

VariantRun registers one test per variant (a directory with disk.qcow2 and its reference);
Variant, scatter() and from_raw() make the variants.

Environment: QCOWFS_TEST_SEED=N repeats a run (the seed is printed), QCOWFS_WRITE_OPS=N sets the
number of operations per variant, QCOWFS_VARIANTS=a,b runs only those variants."""

import os
import random
import time
import zlib

import harness as H

KiB, MiB = H.KiB, H.MiB
SIZE = 32 * MiB


class Variant:
    def __init__(self, work, name, cs=64 * KiB, extl2=False, snapshots=False, compress=True,
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


def from_raw(v, size, opts, compress=False, seed=1, used=0.5):
    raw = varied_raw(os.path.join(v.dir, "base.bin"), size, seed=seed, used=used)
    H.qemu_img("convert", *(["-c"] if compress else []), "-f", "raw", "-O", "qcow2",
               "-o", opts, raw, v.img)
    os.unlink(raw)


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


class VariantRun:
    """One test per variant: `@R.variant(name, **Variant options)` on a function that makes
    v.img registers test_NAME, which builds the variant, mounts it, runs the operations and
    checks the image after the unmount."""

    def __init__(self, T, tag):
        self.T = T
        self.seed = T.seed()
        self.nops = int(os.environ.get("QCOWFS_WRITE_OPS") or 150)
        self.only = [v for v in os.environ.get("QCOWFS_VARIANTS", "").split(",") if v]
        self.work = H.tempdir(tag)

    def wanted(self, name):
        return not self.only or name in self.only

    def variant(self, name, **kw):
        def deco(fn):
            if self.wanted(name):
                self.T.add_test("test_" + name.replace("-", "_"), self.run_variant, name, kw, fn)
            return fn
        return deco

    def build(self, name, kw, fn):
        v = Variant(self.work, name, **kw)
        fn(v)
        H.to_raw(v.img, v.ref, cwd=v.src)
        for s in H.snapshot_names(v.img):
            out = os.path.join(v.dir, "snap-%s.raw" % s)
            H.to_raw(v.img, out, snapshot=s, cwd=v.src)
            v.snap_refs[s] = out
        v.protected_hash = H.hash_files(v.protected)
        v.snap_table = H.snapshot_table(v.img)
        return v

    def run_variant(self, name, kw, fn):
        T = self.T
        v = self.build(name, kw, fn)
        t0 = time.monotonic()
        rnd = random.Random(self.seed ^ zlib.crc32(v.name.encode()))
        # About half the variants (which ones depends on the seed) without the data write-back
        # cache, so that each operation reaches the qcow2 write path on its own, not coalesced.
        args = ["-o", "write_cache=0"] if (zlib.crc32(v.name.encode()) + self.seed) % 2 else []
        print("-- %s (cluster %d, %d bytes%s)" % (v.name, v.cs, os.path.getsize(v.ref),
                                                  ", -o write_cache=0" if args else ""), flush=True)
        ops_ok = False
        try:
            with T.step("%s: mount, write, unmount" % v.name):
                with H.Mount(v.src, args=args) as m:
                    if v.snap_refs:
                        self.check_snapshot_views(v, m, "before writing")
                    ops_ok = self.run_ops(v, m, rnd)
                    if v.snap_refs:
                        self.check_snapshot_views(v, m, "after writing")
                    if not m.alive():
                        T.check("%s: qcowfs still running" % v.name, False,
                                "exit %s; log: %s" % (m.proc.returncode, m.log_text()[-1500:]))
                T.check("%s: unmounted, qcowfs exited 0" % v.name, True)
            with T.step("%s: after unmount" % v.name):
                self.after_unmount(v, ops_ok)
        finally:
            print("   (%s: %.1fs)" % (v.name, time.monotonic() - t0), flush=True)

    def rerun(self, v):
        return "repeat with QCOWFS_TEST_SEED=%d QCOWFS_VARIANTS=%s QCOWFS_WRITE_OPS=%d" % (
            self.seed, v.name, self.nops)


    def run_ops(self, v, m, rnd):
        """Applies self.nops random operations; returns True if every one worked and every read-back
        matched."""
        orig = os.path.getsize(v.ref)
        view = m.path(v.view)
        try:
            f = H.DualFile(view, v.ref)
        except OSError as e:
            self.T.check("%s: open %s read-write" % (v.name, v.view), False, H.errname(e.errno))
            return False
        counts = {}
        problems = []
        reopen_at = rnd.randrange(self.nops // 3, 2 * self.nops // 3 + 1)
        huge_at = rnd.randrange(self.nops // 4, 3 * self.nops // 4 + 1)

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
            self.T.check("%s: within 15 s of the last close, while mounted: qemu-img check -U exit 0, "
                    "dirty/corrupt bits clear, qemu-img compare with the reference identical" %
                    v.name, ok, "after %.1fs: check exit %s, (dirty, corrupt) = %s, compare exit %s "
                    "(%s): %s" % (secs, rc, last.get("bits"), crc, cout[-300:], H.clip_text(out)))
            if ok and secs > 0.1:
                print("  (%s: on disk complete %.1fs after the last close)" % (v.name, secs),
                      flush=True)

        try:
            for i in range(self.nops):
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
                            self.T.check("%s: shrinking from %d to %d fails (internal snapshots)" % (
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
            self.T.check("%s: operation %d" % (v.name, len(f.history)), False,
                    "%s; operations before it: %s; %s" % (e, "; ".join(f.history[-7:-1]), self.rerun(v)))
            return False
        finally:
            f.close()
        self.T.check("%s: %d operations (%s) read back like the reference" % (
            v.name, sum(counts.values()), ", ".join("%d %s" % (n, k) for k, n in sorted(counts.items()))),
            not problems, "%s; last operations: %s; %s" % (
                "; ".join(problems[:3] + (problems[-1:] if len(problems) > 3 else [])), f.recent(),
                self.rerun(v)))
        return not problems


    def check_snapshot_views(self, v, m, when):
        for s, ref in v.snap_refs.items():
            self.T.check_compare("%s: snapshot view disk@%s.raw unchanged (%s)" % (v.name, s, when),
                            m.path("disk@%s.raw" % s), ref, nreads=10, cluster_size=v.cs)


    def after_unmount(self, v, ops_ok):
        rc, out = H.check_clean(v.img)
        self.T.check("%s: qemu-img check exit 0 (no errors, no leaks)" % v.name, rc == 0,
                "exit %d: %s" % (rc, H.clip_text(out)))
        dirty, corrupt = H.header_bits(v.img)
        self.T.check("%s: dirty and corrupt bits clear after unmount" % v.name, not dirty and not corrupt,
                "dirty=%s corrupt=%s" % (dirty, corrupt))
        if ops_ok:
            vs, rs = H.virtual_size(v.img), os.path.getsize(v.ref)
            self.T.check("%s: virtual size %d == reference size" % (v.name, rs), vs == rs,
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
            self.T.check("%s: qemu-img compare with the reference: identical" % v.name, rc == 0, detail)
        else:
            print("  %s: contents not compared (the operations did not all work)" % v.name, flush=True)
        names = H.snapshot_names(v.img)
        self.T.check("%s: snapshot list unchanged" % v.name, sorted(names) == sorted(v.snap_refs),
                "now %s, was %s" % (names, sorted(v.snap_refs)))
        for s, ref in v.snap_refs.items():
            if s not in names:
                continue
            out = os.path.join(v.dir, "snap-after-%s.raw" % s)
            H.to_raw(v.img, out, snapshot=s, cwd=v.src)
            d = H.snapshot_content_diff(out, ref)
            self.T.check("%s: snapshot %s holds its old content" % (v.name, s), d is None, d)
        if v.snap_table:
            now = [dict((k, e[k]) for k in ("id", "name", "l1_size", "disk_size"))
                   for e in H.snapshot_table(v.img)]
            was = [dict((k, e[k]) for k in ("id", "name", "l1_size", "disk_size"))
                   for e in v.snap_table]
            self.T.check("%s: snapshot table entries (id, name, L1 size, disk size) unchanged" % v.name,
                    now == was, "now %s, was %s" % (now, was))
        for p, h in v.protected_hash.items():
            self.T.check("%s: %s unchanged" % (v.name, os.path.basename(p)), H.sha256_file(p) == h,
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
                        bad = pos + H.first_diff(x, y)
                    pos += len(y)
                    if not y:
                        break
            self.T.check("%s: the raw external data file equals the disk" % v.name, bad is None,
                    "first difference at %s" % bad)
