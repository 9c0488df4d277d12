#!/usr/bin/env python3
"""Host bytes per guest byte: a write into a fresh cluster with nothing to copy (no backing data,
unallocated or a zero cluster) writes only the guest's bytes, and the rest of the cluster still
reads as zeros, also when the cluster the image reuses held data before. Measured by the blocks
the host file system allocates for the image (st_blocks), not by time; every image is checked
with qemu-img check and compared with a raw file that got the same writes."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write-bytes", deadline=300)
work = H.tempdir("wbytes")

CLUSTER = 64 * KiB
WRITES = 200


def allocated(path):
    return os.stat(path).st_blocks * 512


def scattered_writes():
    """WRITES writes of 4 KiB, each into its own cluster, at varying offsets inside it."""
    return [(i * 3 * CLUSTER + (i % 16) * 4 * KiB, bytes([1 + i % 250]) * (4 * KiB)) for i in range(WRITES)]


def apply_writes(src, name, ref, writes, args=(), then=None):
    """Applies `writes` to NAME.raw through a mount of `src` and to the raw file `ref`, fsyncs,
    and calls then(fd, ref_fd) while still mounted."""
    with H.Mount(src, args=args) as m:
        fd = os.open(m.path(name + ".raw"), os.O_RDWR)
        rfd = os.open(ref, os.O_RDWR)
        try:
            for off, data in writes:
                H.pwrite_full(fd, data, off)
                H.pwrite_full(rfd, data, off)
            os.fsync(fd)
            if then:
                then(fd, rfd)
        finally:
            os.close(fd)
            os.close(rfd)


def check_image(img, ref, what):
    rc, out = H.check_clean(img)
    T.check("%s: qemu-img check is clean" % what, rc == 0, out)
    rc, out = H.qemu_compare(img, ref)
    T.check("%s: equals the raw reference" % what, rc == 0, out)


def fresh_case(name, opts):
    src = os.path.join(work, name)
    os.makedirs(src)
    img = os.path.join(src, name + ".qcow2")
    H.create(img, 256 * MiB, opts=opts)
    before = allocated(img)
    ref = os.path.join(work, name + ".ref")
    with open(ref, "wb") as f:
        f.truncate(256 * MiB)
    apply_writes(src, name, ref, scattered_writes())
    grown = allocated(img) - before
    guest = WRITES * 4 * KiB
    # Metadata: one L2 table (64 KiB) and a refcount block at most; zeros written for the rest of
    # each cluster would be WRITES * 60 KiB more.
    T.check("%s: the file grew by the guest's bytes plus metadata (%d KiB for %d KiB written)" %
            (name, grown // KiB, guest // KiB), grown <= guest + 512 * KiB, grown)
    check_image(img, ref, name)


@T.test
def test_fresh_clusters():
    fresh_case("plain", "cluster_size=65536")


@T.test
def test_fresh_clusters_extended_l2():
    fresh_case("xl2", "cluster_size=65536,extended_l2=on")


def overlay(name, base_name, size, pattern):
    """SRC/top.qcow2 over SRC/BASE_NAME (a qcow2 image full of `pattern`), and its raw copy."""
    src = os.path.join(work, name)
    os.makedirs(src)
    base = os.path.join(src, base_name)
    H.create(base, size)
    H.qemu_io(base, "write -P %d 0 %d" % (pattern, size))
    img = os.path.join(src, "top.qcow2")
    H.create(img, size, backing=base_name, cwd=src)
    return src, img, os.path.join(work, name + ".ref")


@T.test
def test_zero_clusters():
    """Zero clusters over a backing file have nothing to copy either (they hide the backing data)."""
    src, img, ref = overlay("zero", "base.img", 64 * MiB, 0x77)
    H.qemu_io(img, "write -z 0 32M")
    before = allocated(img)
    writes = [(i * CLUSTER + 8 * KiB, b"\x42" * (4 * KiB)) for i in range(0, 512, 4)]
    H.to_raw(img, ref)
    apply_writes(src, "top", ref, writes, args=["-o", "allow_dir=" + src])
    grown = allocated(img) - before
    T.check("zero clusters: the file grew by the guest's bytes plus metadata (%d KiB)" % (grown // KiB),
            grown <= len(writes) * 4 * KiB + 512 * KiB, grown)
    check_image(img, ref, "zero clusters")


@T.test
def test_backing_data_is_still_copied():
    """Into a cluster with backing data the rest of the cluster is the backing file's."""
    src, img, ref = overlay("cow", "base.qcow2", 16 * MiB, 0x33)
    H.to_raw(img, ref)
    writes = [(i * CLUSTER + 12 * KiB, b"\x44" * (4 * KiB)) for i in range(0, 256, 3)]
    apply_writes(src, "top", ref, writes)
    check_image(img, ref, "copy-on-write")


@T.test
def test_reused_cluster_reads_zeros():
    """A free cluster inside the file may still hold old bytes (a host file system without hole
    punching keeps them): when the image hands it out again for a small write, the rest of it
    must read as zeros, not as the old data."""
    src = os.path.join(work, "reuse")
    os.makedirs(src)
    img = os.path.join(src, "r.qcow2")
    H.create(img, 64 * MiB)
    H.qemu_io(img, "write -P 0xee 0 8M", "discard 0 4M")  # 64 free clusters inside the file
    free = [int(line.split()[2], 16) for line in H.run(["qemu-img", "map", img]).out.splitlines()[1:]]
    first_used = min(free)
    # Fill the free clusters' host bytes with 0xee again (qemu punched them).
    header_end = first_used - 4 * MiB
    with open(img, "r+b") as f:
        f.seek(header_end)
        f.write(b"\xee" * (4 * MiB))
    rc, out = H.check_clean(img)
    T.check("the doctored image is consistent (the clusters are free)", rc == 0, out)
    ref = os.path.join(work, "reuse.ref")
    H.to_raw(img, ref)
    before = os.path.getsize(img)
    writes = [(32 * MiB + i * CLUSTER + 20 * KiB, b"\x21" * 4096) for i in range(64)]

    def read_back(fd, rfd):
        back = H.pread_full(fd, 4 * MiB, 32 * MiB)
        want = H.pread_full(rfd, 4 * MiB, 32 * MiB)
        T.check("reused clusters read back as written, zeros around", back == want)

    apply_writes(src, "r", ref, writes, then=read_back)
    T.check("the free clusters were reused (the file did not grow by 4 MiB)",
            os.path.getsize(img) < before + 4 * MiB, os.path.getsize(img) - before)
    check_image(img, ref, "reused clusters")


T.run()
