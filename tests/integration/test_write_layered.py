#!/usr/bin/env python3
"""Random writes through the mount over images with more than one layer or file (varianthelp.py:
seeded operations on the mounted disk and on a reference raw file, compared while mounted and
with qemu-img check and compare after the unmount): backing chains, internal snapshots, lazy
refcounts and a dirty image, external data files. And space: punched ranges are released,
zeroed ranges become zero clusters. The other variants are test_write_variants.py.

One test per variant (`-k NAME`, `--list`); the environment variables that repeat a run are in
varianthelp.py."""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import varianthelp as V  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_layered", deadline=840)
R = V.VariantRun(T, "wlayered")


# ---- backing chains ----------------------------------------------------------------------------


@R.variant("chain-raw")
def _(v):
    # raw base (shorter than the overlays) <- qcow2 mid <- qcow2 top (written)
    base = V.varied_raw(v.path("base.bin"), 24 * MiB, seed=21, used=0.9)
    mid = v.path("mid.qcow2")
    H.create(mid, V.SIZE, backing="base.bin", backing_fmt="raw", cwd=v.src)
    H.qemu_io(mid, "write -P 0x31 1M 3M", "write -z 8M 1M", "write -c -P 0x32 12M 128k",
              "write -P 0x33 23M 2M")
    H.create(v.img, V.SIZE, backing="mid.qcow2", cwd=v.src)
    H.qemu_io(v.img, "write -P 0x41 2M 100k", "write -z 10M 64k", "write -P 0x42 30M 1M",
              "write -c -P 0x43 5M 64k")
    v.protected = [base, mid]


@R.variant("chain3-top-only", cs=4 * KiB)
def _(v):
    # qcow2 base (zstd-compressed, shorter) <- qcow2 mid <- empty qcow2 top with 4k clusters:
    # every write copies on write from two levels below
    base = v.path("base.qcow2")
    raw = V.varied_raw(os.path.join(v.dir, "b.bin"), 20 * MiB, seed=31, used=0.9)
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw,
               base)
    mid = v.path("mid.qcow2")
    H.create(mid, 28 * MiB, backing="base.qcow2", cwd=v.src)
    H.qemu_io(mid, "write -P 0x51 3M 2M", "write -z 6M 1M", "discard 9M 1M",
              "write -P 0x52 19M 3M")
    H.create(v.img, V.SIZE, "cluster_size=4k", backing="mid.qcow2", cwd=v.src)
    v.protected = [base, mid]


# ---- internal snapshots ------------------------------------------------------------------------


@R.variant("snapshots", snapshots=True)
def _(v):
    V.from_raw(v, V.SIZE, "compat=1.1", seed=41)
    H.qemu_io(v.img, *V.scatter(v, V.SIZE))
    H.qemu_img("snapshot", "-c", "s1", v.img)
    H.qemu_io(v.img, "write -P 0xa3 512k 3M", "write -z 8M 1M", "write -c -P 0xa4 30M 64k",
              "discard 20M 2M")
    H.qemu_img("snapshot", "-c", "s2", v.img)
    H.qemu_io(v.img, "write -P 0xa5 0 4k", "write -P 0xa6 1000000 12345")


# v2 snapshots may lack their disk size (QEMU refuses any resize of such an image): this
# variant only checks that shrinking fails, and grows nothing
@R.variant("snapshots-v2-4k", cs=4 * KiB, snapshots=True, grow=False)
def _(v):
    V.from_raw(v, 16 * MiB, "compat=0.10,cluster_size=4k", seed=42)
    H.qemu_img("snapshot", "-c", "first", v.img)
    H.qemu_io(v.img, "write -P 0xb1 100k 1M", "write -z 3M 64k")
    H.qemu_img("snapshot", "-c", "second", v.img)


# ---- lazy refcounts and a dirty image ----------------------------------------------------------


@R.variant("lazy-refcounts")
def _(v):
    V.from_raw(v, V.SIZE, "compat=1.1,lazy_refcounts=on", seed=51)
    H.qemu_io(v.img, *V.scatter(v, V.SIZE))


@R.variant("dirty")
def _(v):
    V.from_raw(v, V.SIZE, "compat=1.1,lazy_refcounts=on", seed=52)
    H.qemu_io(v.img, *V.scatter(v, V.SIZE))
    # allocate new clusters, then die without flushing: the refcounts on disk are stale
    H.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xd1 20M 3M", "-c", "write -P 0xd2 100k 8k",
           "-c", "abort", v.img], check=False)
    dirty, _c = H.header_bits(v.img)
    if not dirty:
        raise RuntimeError("qemu-io abort left the dirty bit clear")
    rc, out = H.check_clean(v.img)
    print("  (dirty image before mounting: qemu-img check exit %d)" % rc, flush=True)


# ---- external data files -----------------------------------------------------------------------


@R.variant("data-file", compress=False)
def _(v):
    H.create(v.img, V.SIZE, "data_file=%s" % v.path("disk.data"))
    H.qemu_io(v.img, "write -P 0x71 0 5M", "write -P 0x72 20000001 3333",
              *V.scatter(v, V.SIZE, compress=False))
    v.protected = []


@R.variant("data-file-raw", compress=False)
def _(v):
    H.create(v.img, V.SIZE, "data_file=%s,data_file_raw=on" % v.path("disk.data"))
    H.qemu_io(v.img, "write -P 0x73 64k 4M", "write -P 0x74 17M 4097",
              *V.scatter(v, V.SIZE, compress=False))
    v.raw_data_file = v.path("disk.data")


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


def test_space():
    """Punch releases, ZERO_RANGE makes zero clusters."""
    sp = os.path.join(R.work, "space")
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
            H.pwrite_full(fd, random.Random(R.seed).randbytes(8 * MiB), 0)
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


if R.wanted("space"):
    T.add_test("test_space", test_space)

T.run()
