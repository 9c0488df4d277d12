#!/usr/bin/env python3
"""SEEK_DATA / SEEK_HOLE beyond the read variants (which compare every variant with qemu-img
map): writes still in qcowfs's cache show as data, punched ranges as holes, and cp --sparse=always
of a large sparse disk reads only its data and makes a sparse, identical copy."""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB, GiB = H.KiB, H.MiB, H.GiB
T = H.TestRun("seek", deadline=300)

work = H.tempdir("seek")
SRC = os.path.join(work, "src")
os.makedirs(SRC)


def seek(fd, pos, whence):
    try:
        return os.lseek(fd, pos, whence)
    except OSError as e:
        return -e.errno


@T.fixture
def mounted():
    """fresh.qcow2 (empty, 64 MiB) and big.qcow2 (32 GiB, 2 MiB of data), mounted."""
    H.create(os.path.join(SRC, "fresh.qcow2"), 64 * MiB)
    big = os.path.join(SRC, "big.qcow2")
    H.create(big, 32 * GiB)
    H.qemu_io(big, "write -P 0x5a 1G 1M", "write -P 0x6b 20G 64k", "write -z 21G 1M")
    with H.Mount(SRC) as m:
        yield m


@T.test
def test_cached_and_punched():
    m = mounted()
    fd = os.open(m.path("fresh.raw"), os.O_RDWR)
    try:
        T.check("an empty disk is one hole", seek(fd, 0, os.SEEK_DATA) == -errno.ENXIO and
                seek(fd, 0, os.SEEK_HOLE) == 0)
        os.pwrite(fd, b"\x11" * 4096, 10 * MiB + 4096)  # cached, not written back yet
        T.check("a cached write is data", seek(fd, 0, os.SEEK_DATA) == 10 * MiB, seek(fd, 0, os.SEEK_DATA))
        T.check("its cluster ends the data", seek(fd, 10 * MiB, os.SEEK_HOLE) == 10 * MiB + 64 * KiB,
                seek(fd, 10 * MiB, os.SEEK_HOLE))
        H.fallocate(fd, H.FALLOC_FL_PUNCH_HOLE | H.FALLOC_FL_KEEP_SIZE, 10 * MiB, 64 * KiB)
        T.check("a punched cluster is a hole again", seek(fd, 0, os.SEEK_DATA) == -errno.ENXIO,
                seek(fd, 0, os.SEEK_DATA))
        T.check("SEEK_DATA past the end: ENXIO", seek(fd, 64 * MiB, os.SEEK_DATA) == -errno.ENXIO)
        T.check("SEEK_HOLE inside a hole: that offset", seek(fd, 64 * MiB - 1, os.SEEK_HOLE) == 64 * MiB - 1)
    finally:
        os.close(fd)


@T.test
def test_sparse_copy():
    m = mounted()
    copy = os.path.join(work, "big.copy")
    H.run(["cp", "--sparse=always", m.path("big.raw"), copy], timeout=120)
    st = os.stat(copy)
    T.check("the copy has the disk's size", st.st_size == 32 * GiB, st.st_size)
    T.check("the copy is sparse (about the data only)", st.st_blocks * 512 <= 8 * MiB, st.st_blocks * 512)
    c = H.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", os.path.join(SRC, "big.qcow2"), copy],
              check=False, timeout=300)
    T.check("the copy equals the image (qemu-img compare)", c.returncode == 0, c.out + c.err)


T.run()
