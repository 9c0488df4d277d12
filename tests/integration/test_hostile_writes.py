#!/usr/bin/env python3
"""Writes to images that break usual assumptions, through a mount (issue 8, points 1-4).

- v2 (compat=0.10) overlays have no zero flag: a shrink then a grow, a punched hole and a zeroed
  range read as zeros, also past the backing file's end (nothing stale comes back).
- Header rewrites keep what qcowfs does not own: a backing name placed away from the extensions,
  the pre-1.0 v2 layout (name at offset 72, no end marker), an extension area that fills cluster 0.
- A cluster the allocator would hand out over metadata (an L1 table with refcount 0) is refused:
  EIO, the corrupt bit, and nothing overwritten, also when the refcount check before the first
  write is skipped (scan limit) or the file has more than 16M host clusters.
- Work is bounded too: a 4M-entry L1 table naming 4M L2 tables gets its first write answered
  (EIO: the tables have refcount 0) within seconds, not after reading every table.
- Memory is bounded by options: a refcount rebuild of a dirty image whose clusters reach far into a
  large sparse file, and a backing chain of images with 32 MiB L1 tables, stay under a limit of the
  daemon's peak RSS (VmHWM).
Every written image ends with `qemu-img check` clean (or only its planted error).
"""

import errno
import os
import re
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB, GiB = H.KiB, H.MiB, 1 << 30
T = H.TestRun("hostile_writes", deadline=600)
work = H.tempdir("hostile")


def fresh_dir(name):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    return d


def vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def clean(img, what):
    rc, out = H.check_clean(img)
    T.check("%s: qemu-img check clean" % what, rc == 0, H.clip_text(out))


def same(img, ref, what):
    rc, out = H.qemu_compare(img, ref)
    T.check("%s: qemu-img compare identical" % what, rc == 0, out)


def reference(img, name):
    return H.to_raw(img, os.path.join(work, name + ".ref"))


def apply_ref(ref, fn):
    with open(ref, "r+b") as f:
        fn(f)


# ---- 1. v2 overlays: what reads as zeros is zeros ------------------------------------------


@T.test
def test_v2_overlay_zeros():
    base_dir = fresh_dir("v2base")
    src = fresh_dir("v2src")
    base = H.create(os.path.join(base_dir, "b.qcow2"), 10 * MiB)
    H.qemu_io(base, "write -P 0x11 0 10M")
    img = H.create(os.path.join(src, "v2.qcow2"), 14 * MiB, "compat=0.10", backing=base)
    ref = reference(img, "v2")
    with H.Mount(src, args=["-o", "allow_dir=%s" % base_dir]) as m:
        p = m.path("v2.raw")
        fd = os.open(p, os.O_RDWR)
        try:
            H.pwrite_full(fd, b"\xab" * 65536, 199 * 65536)   # past the backing file's end
            H.pwrite_full(fd, b"\xcd" * 65536, 40 * 65536)    # over the backing file
            os.fsync(fd)
            os.ftruncate(fd, 1 * MiB)
            os.ftruncate(fd, 16 * MiB)
            os.fsync(fd)
            got = os.pread(fd, 8, 13041664)
            T.check("v2: bytes past the backing end read zero after shrink+grow", got == b"\0" * 8, got.hex())
            got = os.pread(fd, 8, 40 * 65536)
            T.check("v2: bytes over the backing file read zero after shrink+grow", got == b"\0" * 8, got.hex())
            # Punch and zero ranges inside and past the backing file.
            H.pwrite_full(fd, b"\xee" * (3 * 65536), 150 * 65536)
            H.fallocate(fd, H.FALLOC_FL_PUNCH_HOLE | H.FALLOC_FL_KEEP_SIZE, 100 * 65536, 100 * 65536)
            H.fallocate(fd, H.FALLOC_FL_ZERO_RANGE, 2 * 65536, 3 * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
    # The reference: the old disk cut at 1 MiB, grown with zeros, then the same punches.
    with open(ref, "r+b") as f:
        f.truncate(1 * MiB)
        f.truncate(16 * MiB)
        f.seek(150 * 65536)
        f.write(b"\xee" * (3 * 65536))
        f.seek(100 * 65536)
        f.write(b"\0" * (100 * 65536))
        f.seek(2 * 65536)
        f.write(b"\0" * (3 * 65536))
    clean(img, "v2")
    same(img, ref, "v2")


# ---- 2. header layouts qcowfs does not own ---------------------------------------------------


def name_moved(src, base):
    """A v3 overlay whose backing name sits at 1024, away from the end of the extensions."""
    img = H.create(os.path.join(src, "moved.qcow2"), 4 * MiB, backing=base)
    off, size = H.read_field(img, "backing_file_offset"), H.read_field(img, "backing_file_size")
    with open(img, "rb") as f:
        f.seek(off)
        name = f.read(size)
    H.patch(img, off, b"\0" * size)
    H.patch(img, 1024, name)
    H.write_field(img, "backing_file_offset", 1024)
    return img


def pre10_v2(src, base):
    """A v2 overlay in the pre-1.0 layout: the backing name at offset 72, no extensions at all."""
    img = H.create(os.path.join(src, "old.qcow2"), 4 * MiB, "compat=0.10", backing=base)
    name = base.encode()
    H.patch(img, 72, name + b"\0" * (4096 - 72 - len(name)))
    H.write_field(img, "backing_file_offset", 72)
    H.write_field(img, "backing_file_size", len(name))
    return img


def full_cluster0(src):
    """512-byte clusters; an unknown extension fills cluster 0 to its last byte (no end marker)."""
    img = H.create(os.path.join(src, "full.qcow2"), 4 * MiB, "cluster_size=512")
    hl = H.read_field(img, "header_length")
    length = 512 - hl - 8
    H.patch(img, hl, struct.pack(">II", 0x7e57da7a, length) + b"\x5a" * length)
    return img


@T.test
def test_header_rewrites_keep_names():
    base_dir = fresh_dir("hdrbase")
    src = fresh_dir("hdrsrc")
    base = H.create(os.path.join(base_dir, "b.qcow2"), 4 * MiB)
    H.qemu_io(base, "write -P 0x22 0 4M")
    imgs = {"moved": name_moved(src, base), "old": pre10_v2(src, base), "full": full_cluster0(src)}
    for what, img in imgs.items():
        clean(img, what + " before")
    refs = {what: reference(img, what) for what, img in imgs.items()}
    with H.Mount(src, args=["-o", "allow_dir=%s" % base_dir]) as m:
        for what in imgs:
            fd = os.open(m.path(what + ".raw"), os.O_RDWR)
            try:
                H.pwrite_full(fd, b"\x77" * 1000, 65536 + 100)
                os.ftruncate(fd, 6 * MiB)  # grow: rewrites the header
                H.pwrite_full(fd, b"\x78" * 512, 5 * MiB)
                os.fsync(fd)
                T.check("%s: fsync after a header rewrite succeeds" % what, True)
                got = os.pread(fd, 16, 2 * MiB)
                want = b"\0" * 16 if what == "full" else b"\x22" * 16
                T.check("%s: unallocated clusters still read the backing file" % what, got == want, got.hex())
            except OSError as e:
                T.check("%s: writes and fsync succeed" % what, False, H.errname(e))
            finally:
                os.close(fd)
    for what, img in imgs.items():
        with open(refs[what], "r+b") as f:
            f.seek(65536 + 100)
            f.write(b"\x77" * 1000)
            f.truncate(6 * MiB)
            f.seek(5 * MiB)
            f.write(b"\x78" * 512)
        clean(img, what)
        same(img, refs[what], what)
        inf = H.info(img)
        if what != "full":
            T.check("%s: the backing file is still named" % what, inf.get("backing-filename") == base,
                    inf.get("backing-filename"))
    with open(imgs["full"], "rb") as f:
        f.seek(H.read_field(imgs["full"], "header_length"))
        head = f.read(16)
    T.check("full: the extension filling cluster 0 is untouched", head[:4] == b"\x7e\x57\xda\x7a" and head[8:] == b"\x5a" * 8,
            head.hex())


# ---- 3. no cluster handed out over metadata ------------------------------------------------


def l1_refcount_zero(img):
    """Sets the refcount of the L1 table's cluster to 0 (16-bit refcounts)."""
    cb = H.read_field(img, "cluster_bits")
    l1 = H.read_field(img, "l1_table_offset")
    rt = H.read_field(img, "refcount_table_offset")
    block = H.read_u64(img, rt) & ~((1 << cb) - 1)
    H.patch(img, block + 2 * (l1 >> cb), b"\0\0")


def overlap_case(name, size_of_file, mount_args):
    src = fresh_dir(name)
    img = H.create(os.path.join(src, "img.qcow2"), 1 * GiB, "cluster_size=512")
    H.qemu_io(img, "write -P 0x33 0 64k")
    l1_refcount_zero(img)
    if size_of_file:
        os.truncate(img, size_of_file)  # sparse: many host clusters, nothing in them
    l1 = H.read_field(img, "l1_table_offset")
    with open(img, "rb") as f:
        f.seek(l1)
        l1_before = f.read(512)
    rc, before = H.check_clean(img)
    with H.Mount(src, args=mount_args) as m:
        fd = os.open(m.path("img.raw"), os.O_RDWR)
        err = None
        try:
            H.pwrite_full(fd, b"\x44" * 4096, 512 * MiB)  # needs a new L2 table
            os.fsync(fd)
        except OSError as e:
            err = e.errno
        try:
            os.close(fd)  # the image is read-only by now: what close writes back fails too
        except OSError:
            pass
        T.check("%s: the write fails with EIO" % name, err == errno.EIO, err)
        T.check("%s: one log line names the problem" % name,
                "refcount" in m.log_text() and "img.qcow2" in m.log_text(), m.log_text()[-600:])
    with open(img, "rb") as f:
        f.seek(l1)
        T.check("%s: the L1 table is not overwritten" % name, f.read(512) == l1_before)
    T.check("%s: the corrupt bit is set" % name, H.header_bits(img)[1])
    rc2, after = H.check_clean(img)
    found = re.search(r"(\d+) errors? (were|was) found", after)
    T.check("%s: qemu-img check finds only the planted error" % name,
            found is not None and int(found.group(1)) == 1 and after.count("ERROR") == 1, H.clip_text(after))
    qin = os.path.join(work, name + ".raw")
    H.to_raw(img, qin)
    with open(qin, "rb") as f:
        T.check("%s: guest data still reads" % name, f.read(8) == b"\x33" * 8)


@T.test
def test_l1_refcount_zero_unchecked():
    overlap_case("overlap_nocheck", 0, ["-o", "scan_limit=4k"])


@T.test
def test_l1_refcount_zero_16m_clusters():
    overlap_case("overlap_big", 9 * GiB, [])


# ---- 4. memory bounded by options ----------------------------------------------------------


@T.test
def test_rebuild_in_bounded_memory():
    src = fresh_dir("rebuild")
    img = H.create(os.path.join(src, "dirty.qcow2"), 64 * MiB, "cluster_size=512,lazy_refcounts=on")
    H.qemu_io(img, "write -P 0x55 0 4k", "write -P 0x56 1M 4k")
    # Move the data cluster of guest offset 1M to the far end of a 32 GiB sparse file and leave
    # the image dirty: only a rebuild makes its refcounts right.
    far = 32 * GiB - 512
    e = H.l2_entry_offset(img, 1 * MiB)
    entry = H.read_u64(img, e)
    old = entry & 0x00fffffffffffe00
    with open(img, "rb") as f:
        f.seek(old)
        data = f.read(512)
    os.truncate(img, 32 * GiB)
    H.patch(img, far, data)
    H.patch(img, e, struct.pack(">Q", (entry & ~0x00fffffffffffe00) | far))
    H.write_field(img, "incompatible_features", H.read_field(img, "incompatible_features") | 1)
    ref = reference(img, "dirty")
    with H.Mount(src, args=["-o", "refcount_memory=1M"]) as m:
        fd = os.open(m.path("dirty.raw"), os.O_RDWR)
        try:
            H.pwrite_full(fd, b"\x66" * 4096, 8 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        hwm = vm_hwm_kib(m.proc.pid)
        print("  rebuild: daemon VmHWM %d KiB" % hwm, flush=True)
        # Counting 64M host clusters at once would take 512 MiB.
        T.check("rebuild: daemon peak RSS under 96 MiB", 0 < hwm < 96 * 1024, "%d KiB" % hwm)
    with open(ref, "r+b") as f:
        f.seek(8 * MiB)
        f.write(b"\x66" * 4096)
    T.check("rebuild: the dirty bit is clear after unmount", not H.header_bits(img)[0])
    clean(img, "rebuild")
    same(img, ref, "rebuild")


@T.test
def test_backing_chain_bounded_memory():
    src = fresh_dir("chain")
    prev = None
    for i in range(4):
        p = os.path.join(src, "c%d.qcow2" % i)
        H.create(p, 128 * GiB, "cluster_size=512", backing=prev)
        H.qemu_io(p, "write -P 0x%02x %d 4k" % (0x70 + i, i * 64 * MiB))
        prev = p
    top = os.path.join(src, "top.qcow2")
    H.create(top, 1 * GiB, "cluster_size=512", backing=prev)
    reference(top, "chain")
    with H.Mount(src, args=["-o", "l2_cache=1M"]) as m:
        with open(m.path("top.raw"), "rb") as f:
            for i in range(4):
                f.seek(i * 64 * MiB)
                got = f.read(4096)
                T.check("chain: layer %d reads through" % i, got == bytes([0x70 + i]) * 4096, got[:8].hex())
        hwm = vm_hwm_kib(m.proc.pid)
        print("  chain: daemon VmHWM %d KiB" % hwm, flush=True)
        # Whole L1 tables would take 4 x 32 MiB.
        T.check("chain: daemon peak RSS under 96 MiB", 0 < hwm < 96 * 1024, "%d KiB" % hwm)


@T.test
def test_huge_l1_first_write_early():
    src = fresh_dir("bigl1")
    img = H.create(os.path.join(src, "h.qcow2"), 1 * MiB, "cluster_size=512")
    n = 4 * MiB
    l2base = 1 * MiB
    l1off = l2base + n * 512
    with open(img, "r+b") as f:
        f.seek(l1off)
        for i in range(0, n, 65536):
            f.write(b"".join(struct.pack(">Q", l2base + (i + k) * 512) for k in range(65536)))
    H.write_field(img, "l1_size", n)
    H.write_field(img, "l1_table_offset", l1off)
    with H.Mount(src, args=["-o", "scan_limit=64M"]) as m:
        t0 = time.monotonic()
        fd = os.open(m.path("h.raw"), os.O_RDWR)
        err = None
        try:
            H.pwrite_full(fd, b"\x01" * 4096, 0)
            os.fsync(fd)
        except OSError as e:
            err = e.errno
        try:
            os.close(fd)
        except OSError:
            pass
        dt = time.monotonic() - t0
        print("  big L1: first write answered after %.1f s" % dt, flush=True)
        # The L2 tables have refcount 0: the write must fail, early (61 s before the scan limit).
        T.check("big L1: the write fails with EIO", err == errno.EIO, err)
        T.check("big L1: answered within 30 s", dt < 30, "%.1f s" % dt)
        T.check("big L1: the daemon is alive", m.alive())


T.run()
