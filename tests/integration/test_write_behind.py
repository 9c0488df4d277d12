#!/usr/bin/env python3
"""Streaming writes are written behind: a write of 1 MiB or more (dd bs=1M, with or without
oflag=direct on the exposed file) goes to the image file's page cache and to the disk at once,
and leaves the cache once it is on the disk, so a stream holds a few MiB of the image file's page
cache, not a second copy of everything written, and none after an fsync (measured with fincore,
not by time). Smaller writes stay in the page cache until the kernel writes them back. Either way
the image is what qemu-img expects: checked, compared with a raw file that got the same writes,
and read back through the mount while small and streaming writes of the same clusters follow each
other. A copy-on-write reads the backing file's old cluster around the page cache when none of it
is cached there (the image keeps the copy): small writes into an overlay leave the backing file's
page cache without the clusters they copied."""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write-behind", deadline=300)
work = H.tempdir("wbehind")


def resident(path):
    """Bytes of `path` in the page cache (fincore), or None when fincore is missing."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True).stdout
    return int(out.split()[0])


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache_visible(path):
    """Whether the page cache of `path`'s file system can be told from the file: not on tmpfs,
    whose pages are the file itself."""
    out = subprocess.run(["stat", "-f", "-c", "%T", os.path.dirname(path)], stdout=subprocess.PIPE,
                         text=True, check=True).stdout.strip()
    return out != "tmpfs"


def image(name, size=64 * MiB, opts=None):
    src = os.path.join(work, name)
    os.makedirs(src)
    img = os.path.join(src, name + ".qcow2")
    H.create(img, size, opts=opts)
    ref = os.path.join(work, name + ".ref")
    with open(ref, "wb") as f:
        f.truncate(size)
    return src, img, ref


def check_image(img, ref, what):
    rc, out = H.check_clean(img)
    T.check("%s: qemu-img check is clean" % what, rc == 0, out)
    rc, out = H.qemu_compare(img, ref)
    T.check("%s: equals the raw reference" % what, rc == 0, out)


def streaming_case(name, oflag_direct, opts=None):
    src, img, ref = image(name, opts=opts)
    if not page_cache_visible(img):
        T.skip("%s is on tmpfs: its page cache is the file, nothing to measure" % work)
        return
    data = os.urandom(16 * MiB)
    with open(ref, "r+b") as f:
        f.seek(8 * MiB)
        f.write(data)
    drop_cache(img)
    with H.Mount(src) as m:
        flags = os.O_WRONLY | (os.O_DIRECT if oflag_direct else 0)
        fd = os.open(m.path(name + ".raw"), flags)
        try:
            import mmap
            buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT on the exposed file needs
            for i in range(16):
                buf[:] = data[i * MiB:(i + 1) * MiB]
                H.pwrite_full(fd, buf, 8 * MiB + i * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        cached = resident(img)
        if cached is None:
            T.skip("fincore (util-linux) is missing: cannot see the image file's page cache")
        else:
            # Metadata (header, L1, refcounts, one L2 table) is cached; 16 MiB of data would be too
            # if it had gone through the page cache.
            T.check("%s: after the fsync, the data left the image file's page cache (%d KiB cached)" %
                    (name, cached // KiB), cached < 2 * MiB, cached)
        fd = os.open(m.path(name + ".raw"), os.O_RDONLY)
        try:
            back = H.pread_full(fd, 16 * MiB, 8 * MiB)
        finally:
            os.close(fd)
        T.check("%s: reads back through the mount" % name, back == data)
    check_image(img, ref, name)


@T.test
def test_streaming_writes_direct_on_exposed_file():
    streaming_case("odirect", True)


@T.test
def test_streaming_writes_buffered_on_exposed_file():
    streaming_case("buffered", False)


@T.test
def test_streaming_writes_extended_l2():
    streaming_case("xl2", True, opts="cluster_size=65536,extended_l2=on")


@T.test
def test_long_stream_holds_little_page_cache():
    """Before any fsync, a 64 MiB stream of 1 MiB writes leaves at most a window of it (8 MiB)
    and the metadata in the image file's page cache: the rest went to the disk and was dropped."""
    src, img, ref = image("long", size=128 * MiB)
    if not page_cache_visible(img):
        T.skip("%s is on tmpfs: its page cache is the file, nothing to measure" % work)
        return
    data = os.urandom(64 * MiB)
    with open(ref, "r+b") as f:
        f.write(data)
    drop_cache(img)
    with H.Mount(src) as m:
        fd = os.open(m.path("long.raw"), os.O_WRONLY)
        try:
            for i in range(64):
                H.pwrite_full(fd, data[i * MiB:(i + 1) * MiB], i * MiB)
            cached = resident(img)
            if cached is None:
                T.skip("fincore (util-linux) is missing: cannot see the image file's page cache")
            else:
                T.check("64 MiB written, no fsync yet: %d KiB of the image file cached" % (cached // KiB),
                        cached < 16 * MiB, cached)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(m.path("long.raw"), os.O_RDONLY)
        try:
            T.check("the stream reads back through the mount", H.pread_full(fd, 64 * MiB, 0) == data)
        finally:
            os.close(fd)
    check_image(img, ref, "a long stream")


@T.test
def test_small_writes():
    """128 KiB writes (O_DIRECT on the exposed file, so that qcowfs gets them as they are
    written) leave a clean image equal to the reference. Whether they stay in the image file's
    page cache is io_file_test.cpp's to check: qcowfs's data cache may merge them into one
    streaming write at the fsync, which is then written behind like any other."""
    src, img, ref = image("small")
    with H.Mount(src) as m:
        fd = os.open(m.path("small.raw"), os.O_WRONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 128 * KiB)  # page-aligned, as O_DIRECT needs
            for i in range(64):
                buf[:] = bytes([i + 1]) * (128 * KiB)
                H.pwrite_full(fd, buf, i * 128 * KiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(ref, "r+b") as f:
        for i in range(64):
            f.seek(i * 128 * KiB)
            f.write(bytes([i + 1]) * (128 * KiB))
    check_image(img, ref, "small writes")


@T.test
def test_small_and_streaming_writes_of_the_same_clusters():
    """Small writes leave dirty cached pages of a cluster; a streaming write then overwrites the
    cluster in place and is written behind, and small writes follow again: every read through the mount
    and the image on disk hold the last bytes written, never stale cached ones."""
    src, img, ref = image("mixed")
    rfd = os.open(ref, os.O_RDWR)
    with H.Mount(src) as m:
        path = m.path("mixed.raw")
        fd = os.open(path, os.O_RDWR)
        try:
            def both(data, off):
                H.pwrite_full(fd, data, off)
                H.pwrite_full(rfd, data, off)

            def same(what, off, n):
                T.check(what, H.pread_full(fd, n, off) == H.pread_full(rfd, n, off))

            for round_ in range(3):
                for i in range(0, 32, 3):  # small writes: clusters allocated, pages dirty in the cache
                    both(bytes([0x10 + round_]) * (8 * KiB), 4 * MiB + i * 64 * KiB + 4 * KiB)
                same("round %d: small writes read back" % round_, 4 * MiB, 2 * MiB)
                both(os.urandom(2 * MiB), 4 * MiB)  # streaming, in place over those clusters
                same("round %d: the streaming write reads back over the cached one" % round_, 4 * MiB, 2 * MiB)
                both(bytes([0x60 + round_]) * (12 * KiB), 4 * MiB + 100 * KiB)
                same("round %d: a small write after it reads back" % round_, 4 * MiB, 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.close(rfd)
    check_image(img, ref, "mixed small and streaming writes")


def kernel_has_cachestat():
    """cachestat (Linux 6.5) tells qcowfs that a range is not cached without reading it."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 5)


@T.test
def test_copy_on_write_leaves_backing_cache_alone():
    """4 KiB writes into 48 clusters of an overlay whose backing file is not in the page cache:
    each copies its 64 KiB cluster from the backing file, and the backing file's page cache
    afterwards holds its metadata only, not the 3 MiB copied (a buffered read would hold those
    and the readahead after each). The image is checked and compared, and the bytes read back."""
    src = os.path.join(work, "cow")
    os.makedirs(src)
    base, top = os.path.join(src, "base.qcow2"), os.path.join(src, "top.qcow2")
    ref = os.path.join(work, "cow.ref")
    base_raw = H.write_varied_raw(os.path.join(work, "cow-base.bin"), 64 * MiB, 7)
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", base_raw, base)
    H.create(top, 64 * MiB, opts="cluster_size=64k", backing="base.qcow2", cwd=src)
    shutil.copyfile(base_raw, ref)
    watch = page_cache_visible(base) and resident(base) is not None and kernel_has_cachestat()
    drop_cache(base)
    rfd = os.open(ref, os.O_RDWR)
    with H.Mount(src) as m:
        fd = os.open(m.path("top.raw"), os.O_RDWR | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4 * KiB)
            for i in range(48):
                buf[:] = bytes([0x40 + i]) * (4 * KiB)
                off = i * 1280 * KiB + 8 * KiB  # every 20th cluster, 8 KiB into it
                H.pwrite_full(fd, buf, off)
                H.pwrite_full(rfd, bytes(buf), off)
            os.fsync(fd)
            cached = resident(base) if watch else None
            for i in range(0, 48, 7):
                off = i * 1280 * KiB
                T.check("cluster %d reads back through the mount" % i,
                        H.pread_full(fd, 64 * KiB, off) == H.pread_full(rfd, 64 * KiB, off))
        finally:
            os.close(fd)
    os.close(rfd)
    check_image(top, ref, "copy-on-write over a backing file")
    if not watch:
        T.skip("backing page cache not measured: needs fincore, a file system other than tmpfs "
               "and Linux 6.5 (cachestat)")
        return
    T.check("the backing file's page cache holds under 1 MiB after 48 copied clusters (%d bytes)" % cached,
            cached < 1 * MiB, "resident %d bytes" % cached)


T.run()
