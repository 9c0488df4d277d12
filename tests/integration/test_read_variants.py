#!/usr/bin/env python3
"""Every qcow2 variant qemu-img can make reads back exactly as `qemu-img convert -O raw` shows it:
versions, cluster sizes, refcount widths, zero/compressed (zlib, zstd) clusters, extended L2,
backing chains (qcow2, raw, relative, shorter), external data files, preallocation modes, odd
virtual sizes, internal snapshots, the dirty bit, and a 16 TiB sparse image.

One test per group of variants (readvariants.py makes them; `--list` names the tests): each
compares its views with qemu-img convert and their SEEK_DATA/SEEK_HOLE extents with qemu-img
map. Only the images of the selected tests are made; one mount serves them all."""

import errno
import json
import os
import random
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import readvariants as RVS  # noqa: E402

KiB, MiB, TiB = H.KiB, H.MiB, H.TiB
T = H.TestRun("read_variants", deadline=400)

work = H.tempdir("variants")
RV = RVS.ReadVariants(work)
SRC = RV.src
REF = os.path.join(work, "ref")
os.makedirs(REF)
refs = {}  # view -> qemu-img convert of it

# the concurrent readers' variants, and their groups
PICKS = ("cmp-zstd", "cmp-zlib", "extl2-64k", "chain depth 3", "cs512", "snap snapshot s1",
         "external data file, relative name", "cs2m")
PICK_GROUPS = ("cmp-zstd", "cmp-zlib", "extl2-64k", "chain", "cs512", "snapshots", "data-file",
               "cs2m")


def test_name(group):
    return "test_" + group.replace("-", "_")


# ---- the 16 TiB sparse image (not converted) ------------------------------------------------

BIG = 16 * TiB


def img(name):
    return os.path.join(SRC, name)


big_ok = False


def big():
    global big_ok
    p = img("sparse16t.qcow2")
    H.create(p, "16T")
    H.qemu_io(p, "write -P 0xaa 0 64k", "write -P 0xbb 8T 64k",
              "write -P 0xcc %d 64k" % (BIG - 64 * KiB))
    big_ok = True


@T.fixture
def built():
    """The images of the selected tests, and their references."""
    groups = [g for g in RVS.GROUPS if T.selected(test_name(g)) or
              (g in PICK_GROUPS and T.selected("test_concurrent_readers"))]
    for g in groups:
        with T.step("build %s" % g):
            RV.build(g)
    if T.selected("test_sparse_16t"):
        with T.step("build sparse16t"):
            big()
    for v in RV.variants:
        with T.step("oracle for %s" % v.name):
            out = os.path.join(REF, "%d.raw" % len(refs))
            H.to_raw(v.image, out, snapshot=v.snapshot, cwd=v.cwd)
            refs[v.view] = out
    print("built %d images/views to compare" % len(refs), flush=True)


# ---- mount and compare ----------------------------------------------------------------------

def map_data_extents(image, snap=None, cwd=None):
    """[(start, end)] of what qemu-img map calls data, adjacent ranges merged."""
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


@T.fixture
def mounted():
    """One mount for all images (built first), restarted if the daemon dies."""
    built()
    R = Remounting()
    try:
        with T.step("mount"):
            m = R.get()
            top = H.listdir_safe(m.mnt)
            print("  mount root: %s" % " ".join(top), flush=True)
        yield R
    finally:
        with T.step("unmount"):
            R.close()


def variant_group(group):
    """Each view of the group equals qemu-img convert; its data extents (SEEK_DATA /
    SEEK_HOLE) equal qemu-img map's "data" ranges (for a snapshot: of a copy with the snapshot
    applied)."""
    R = mounted()
    variants = [v for v in RV.build(group) if v.view in refs]
    for v in variants:
        with T.step("compare %s" % v.name):
            m = R.get()
            T.check_compare("%s: %s equals qemu-img convert" % (v.name, v.view), m.path(v.view),
                            refs[v.view], cluster_size=v.cs)
    for v in variants:
        with T.step("seek %s" % v.name):
            m = R.get()
            expected = map_data_extents(v.image, v.snapshot, v.cwd)
            got = seek_data_extents(m.path(v.view))
            T.check("%s: SEEK_DATA/SEEK_HOLE extents equal qemu-img map" % v.name, got == expected,
                    "got %s, qemu-img map %s" % (got[:6], expected[:6]))


for g in RVS.GROUPS:
    T.add_test(test_name(g), variant_group, g)


@T.test
def test_concurrent_readers():
    m = mounted().get()
    picks = [(v.name, v.view, v.image, v.snapshot, v.cs, v.cwd) for v in RV.variants
             if v.view in refs and v.name in PICKS]
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


@T.test
def test_sparse_16t():
    m = mounted().get()
    if not big_ok:
        raise RuntimeError("the 16 TiB image was not built")
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


T.run()
