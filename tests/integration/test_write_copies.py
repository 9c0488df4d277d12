#!/usr/bin/env python3
"""Whole-file copies onto exposed files: `dd conv=notrunc` (odd block size, at an odd offset),
`cp` (O_TRUNC: the disk shrinks to 0 and grows back), `cp --sparse=always` of a sparse file onto
an image with a backing file (holes must read as zeros, not as the backing file), and `cp` onto an
image with an internal snapshot, which must fail and change nothing. Afterwards `qemu-img check`
is clean and `qemu-img compare` with the expected content identical; the snapshot and the
backing file are unchanged."""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_copies", deadline=400)

SEED = T.seed()

CP = H.tempdir("wcopies")
CPSRC = os.path.join(CP, "src")
os.makedirs(CPSRC)
DD_OFF = 777777


def cimg(name):
    return os.path.join(CPSRC, name)


@T.fixture
def images():
    """dd.qcow2, cp.qcow2, cpsparse.qcow2 (over cpbase.qcow2) and cpsnap.qcow2 (snapshot
    "keep"), the files to copy onto them, and the expected results."""
    global refs, snap_keep, base_hash, dense, piece, sparse, exp
    rnd = random.Random(SEED)
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(CP, "a.bin"), 16 * MiB, 11), cimg("dd.qcow2"))
    H.create(cimg("cp.qcow2"), 4 * MiB)
    H.qemu_io(cimg("cp.qcow2"), "write -P 0x11 0 4M")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(CP, "b.bin"), 16 * MiB, 12), cimg("cpbase.qcow2"))
    H.create(cimg("cpsparse.qcow2"), 16 * MiB, backing="cpbase.qcow2", cwd=CPSRC)
    H.qemu_io(cimg("cpsparse.qcow2"), "write -P 0x12 0 1M", "write -P 0x13 9M 2M")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(CP, "c.bin"), 8 * MiB, 13), cimg("cpsnap.qcow2"))
    H.qemu_img("snapshot", "-c", "keep", cimg("cpsnap.qcow2"))
    H.qemu_io(cimg("cpsnap.qcow2"), "write -P 0x14 1M 64k")
    refs = {}
    for n in ("dd", "cp", "cpsparse", "cpsnap"):
        refs[n] = H.to_raw(cimg(n + ".qcow2"), os.path.join(CP, n + ".ref"), cwd=CPSRC)
    snap_keep = H.to_raw(cimg("cpsnap.qcow2"), os.path.join(CP, "cpsnap@keep.ref"),
                         snapshot="keep")
    base_hash = H.sha256_file(cimg("cpbase.qcow2"))

    # what to copy: dense random data (size a sector multiple, not a cluster multiple)
    dense = os.path.join(CP, "dense.bin")
    with open(dense, "wb") as f:
        f.write(rnd.randbytes(5 * MiB + 1536))
    piece = os.path.join(CP, "piece.bin")
    with open(piece, "wb") as f:
        f.write(rnd.randbytes(3 * MiB + 1000))
    # a sparse file: data pieces with holes between them, a hole at the end
    sparse = os.path.join(CP, "sparse.bin")
    with open(sparse, "wb") as f:
        for off, ln in ((0, 100 * KiB), (1 * MiB, 64 * KiB), (3 * MiB + 4096, 1 * MiB),
                        (9 * MiB + 512, 300 * KiB)):
            f.seek(off)
            f.write(rnd.randbytes(ln))
        f.truncate(12 * MiB + 512)

    # expected results
    exp = {}
    with open(refs["dd"], "rb") as f:
        d = bytearray(f.read())
    with open(piece, "rb") as f:
        p = f.read()
    d[DD_OFF:DD_OFF + len(p)] = p
    exp["dd"] = os.path.join(CP, "dd.expect")
    with open(exp["dd"], "wb") as f:
        f.write(d)
    exp["cp"] = dense
    exp["cpsparse"] = sparse
    with open(refs["cpsnap"], "rb") as f:
        d = bytearray(f.read())
    d[DD_OFF:DD_OFF + len(p)] = p
    exp["cpsnap"] = os.path.join(CP, "cpsnap.expect")
    with open(exp["cpsnap"], "wb") as f:
        f.write(d)


broken = {}  # image -> why its expected content is unknown (an earlier step failed)


@T.fixture
def copied():
    """One mount: dd and cp onto the exposed files; then the unmount (exit 0)."""
    images()
    try:
        with H.Mount(CPSRC) as m:
            with T.step("dd conv=notrunc"):
                for n in ("dd", "cpsnap"):
                    r = H.run(["dd", "if=" + piece, "of=" + m.path(n + ".raw"), "bs=3000",
                               "seek=%d" % DD_OFF, "oflag=seek_bytes", "conv=notrunc",
                               "status=none"], check=False)
                    if not T.check("%s: dd bs=3000 seek=%d conv=notrunc exits 0" % (n, DD_OFF),
                                   r.returncode == 0, r.err.strip()):
                        broken[n] = "dd failed"
                        continue
                    if not T.check_compare("%s: after dd, the disk is the old one with the piece at "
                                           "%d" % (n, DD_OFF), m.path(n + ".raw"), exp[n], nreads=20):
                        broken[n] = "wrong content after dd"
            with T.step("cp (O_TRUNC)"):
                r = H.run(["cp", dense, m.path("cp.raw")], check=False)
                if not T.check("cp.raw: cp of a %d-byte file exits 0" % os.path.getsize(dense),
                               r.returncode == 0, r.err.strip()):
                    broken["cp"] = "cp failed"
                else:
                    T.check_compare("cp.raw: exactly the copied file (content and size)",
                                    m.path("cp.raw"), dense, nreads=20)
            with T.step("cp --sparse=always onto a disk with a backing file"):
                r = H.run(["cp", "--sparse=always", sparse, m.path("cpsparse.raw")], check=False)
                if not T.check("cpsparse.raw: cp --sparse=always exits 0", r.returncode == 0,
                               r.err.strip()):
                    broken["cpsparse"] = "cp failed"
                else:
                    T.check_compare("cpsparse.raw: exactly the sparse file (holes read as zeros, "
                                    "not as the backing file)", m.path("cpsparse.raw"), sparse,
                                    nreads=20)
            with T.step("cp onto a disk with a snapshot"):
                view = m.path("cpsnap.raw")
                before = os.path.getsize(view)
                before_hash = H.sha256_file(view)
                r = H.run(["cp", dense, view], check=False)
                T.check("cpsnap.raw: cp fails (truncating would shrink a disk with snapshots)",
                        r.returncode != 0, "cp exited 0")
                print("  cp said: %s" % r.err.strip(), flush=True)
                T.check("cpsnap.raw: size unchanged (%d)" % before, os.path.getsize(view) == before,
                        "now %d" % os.path.getsize(view))
                T.check("cpsnap.raw: content unchanged by the failed cp",
                        H.sha256_file(view) == before_hash)
    except H.MountError as e:
        T.check("dd/cp mount/unmount", False, str(e))


@T.test
def test_copies_through_the_mount():
    copied()


def after_unmount(n):
    im = cimg(n + ".qcow2")
    rc, out = H.check_clean(im)
    T.check("%s: qemu-img check exit 0" % n, rc == 0, "exit %d: %s" % (rc, H.clip_text(out)))
    dirty, corrupt = H.header_bits(im)
    T.check("%s: dirty and corrupt bits clear" % n, not dirty and not corrupt,
            "dirty=%s corrupt=%s" % (dirty, corrupt))
    if n in broken:
        print("  %s: content not compared (%s)" % (n, broken[n]), flush=True)
        return
    vs, es = H.virtual_size(im), os.path.getsize(exp[n])
    T.check("%s: virtual size %d as expected" % (n, es), vs == es, "virtual size %d" % vs)
    rc, out = H.qemu_compare(im, exp[n], cwd=CPSRC)
    T.check("%s: qemu-img compare with the expected content: identical" % n, rc == 0,
            "exit %d: %s" % (rc, out[-500:]))


@T.test
def test_images_after_unmount():
    copied()
    for n in ("dd", "cp", "cpsparse", "cpsnap"):
        with T.step("%s: after unmount" % n):
            after_unmount(n)


@T.test
def test_snapshot_and_backing_after_unmount():
    copied()
    out = H.to_raw(cimg("cpsnap.qcow2"), os.path.join(CP, "after-keep.raw"), snapshot="keep")
    d = H.snapshot_content_diff(out, snap_keep)
    T.check("cpsnap: snapshot 'keep' unchanged", d is None, d)
    T.check("cpbase.qcow2 (backing file) unchanged", H.sha256_file(cimg("cpbase.qcow2")) == base_hash)


T.run()
