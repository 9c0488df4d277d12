#!/usr/bin/env python3
"""Random writes through the mount over image variants (varianthelp.py: seeded operations on the
mounted disk and on a reference raw file, compared while mounted and with qemu-img check and
compare after the unmount): qcow2 versions, cluster sizes, refcount widths, compressed clusters,
extended L2 and preallocation. Backing chains, snapshots, dirty images and data files are
test_write_layered.py.

One test per variant (`-k NAME`, `--list`); the environment variables that repeat a run are in
varianthelp.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import varianthelp as V  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_variants", deadline=840)
R = V.VariantRun(T, "wvariants")


# ---- versions, cluster sizes, refcount widths --------------------------------------------------


@R.variant("v2")
def _(v):
    V.from_raw(v, V.SIZE, "compat=0.10", seed=2)
    H.qemu_io(v.img, *V.scatter(v, V.SIZE))


@R.variant("v3")
def _(v):
    V.from_raw(v, V.SIZE, "compat=1.1", seed=3)
    H.qemu_io(v.img, *V.scatter(v, V.SIZE))


for _name, _cs, _size in (("cs512", 512, 16 * MiB), ("cs4k", 4 * KiB, V.SIZE),
                         ("cs64k", 64 * KiB, V.SIZE), ("cs2m", 2 * MiB, 64 * MiB)):
    def _mk(v, cs=_cs, size=_size):
        V.from_raw(v, size, "cluster_size=%d" % cs, seed=cs)
        H.qemu_io(v.img, *V.scatter(v, size))
    R.variant(_name, cs=_cs)(_mk)

for _bits in (1, 2, 8, 16, 64):
    def _mk(v, bits=_bits):
        V.from_raw(v, V.SIZE, "compat=1.1,refcount_bits=%d" % bits, seed=bits)
        # one-bit refcounts cannot count the clusters compressed data shares
        H.qemu_io(v.img, *V.scatter(v, V.SIZE, compress=bits > 1))
    R.variant("refcount%d" % _bits, compress=_bits > 1)(_mk)


# ---- compression -------------------------------------------------------------------------------

for _ct in ("zlib", "zstd"):
    def _mk(v, ct=_ct):
        V.from_raw(v, V.SIZE, "compression_type=%s" % ct, compress=True, seed=len(ct), used=0.7)
        H.qemu_io(v.img, *V.scatter(v, V.SIZE))
    R.variant("compressed-%s" % _ct)(_mk)


# ---- extended L2 -------------------------------------------------------------------------------

for _cs, _size in ((64 * KiB, V.SIZE), (2 * MiB, 64 * MiB)):
    def _mk(v, cs=_cs, size=_size):
        V.from_raw(v, size, "extended_l2=on,cluster_size=%d" % cs, seed=cs + 5)
        sc = cs // 32
        H.qemu_io(v.img, *(V.scatter(v, size) + [
            "write -P 0x01 %d %d" % (20 * cs, sc),
            "write -P 0x02 %d %d" % (20 * cs + 3 * sc + 100, 2 * sc),
            "write -z %d %d" % (21 * cs + 5 * sc, sc),
            "write -z -u %d %d" % (20 * cs + 20 * sc, 3 * sc),
            "discard %d %d" % (20 * cs + 12 * sc, sc)]))
    R.variant("extl2-%s" % ("64k" if _cs == 64 * KiB else "2m"), cs=_cs, extl2=True)(_mk)


# ---- preallocation -----------------------------------------------------------------------------

for _mode in ("metadata", "falloc", "full"):
    def _mk(v, mode=_mode):
        H.create(v.img, 16 * MiB, "preallocation=%s" % mode)
        H.qemu_io(v.img, *V.scatter(v, 16 * MiB))
    R.variant("prealloc-%s" % _mode, compress=False)(_mk)


T.run()
