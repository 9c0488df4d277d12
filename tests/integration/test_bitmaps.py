#!/usr/bin/env python3
"""Persistent dirty bitmaps: qcowfs keeps the enabled ones up to date and shows each as a
read-only NAME@bitmap-BITMAP.raw. Random writes, zeroing, punching, a grow and a shrink through
the mount; the bitmap files' SEEK_DATA extents are the written chunks (plus what QEMU had set
before), their data the disk's, zeros elsewhere; after the unmount QEMU (qemu-nbd -B + nbdinfo)
sees exactly those chunks, the bitmaps are consistent, the disabled one is unchanged, and
qemu-img check is clean. A SIGKILL leaves them in use and the image with leaks at most."""

import errno
import json
import os
import random
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

T = H.TestRun("bitmaps", deadline=240)
KiB, MiB = H.KiB, H.MiB
work = H.tempdir("bitmaps")  # src/ is mounted; the copies and the kill case go beside it
SRC = os.path.join(work, "src")
os.makedirs(SRC)

# name -> granularity bits; "frozen" is disabled.
ENABLED = {"daily": 16, "weekly": 20, "odd name: x y": 16}


def have_nbd():
    return all(subprocess.run(["sh", "-c", "command -v " + t], stdout=subprocess.DEVNULL).returncode == 0
               for t in ("qemu-nbd", "nbdinfo"))


def make_image(path, size=8 * MiB):
    """An image with three enabled bitmaps and a disabled one, 128 KiB written by QEMU after."""
    H.create(path, size)
    for name, bits in ENABLED.items():
        H.qemu_img("bitmap", "--add", "-g", str(1 << bits), path, name)
    H.qemu_img("bitmap", "--add", path, "frozen")
    H.qemu_img("bitmap", "--disable", path, "frozen")
    H.qemu_io(path, "write -P 0x11 1M 128k")


def qemu_dirty(img, name):
    """Dirty extents [(start, end)] of bitmap `name` as QEMU serves them."""
    p = H.run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
               "-B", name, img, "]"], timeout=60)
    runs = []
    for line in p.out.splitlines():
        f = line.split()
        if len(f) < 4 or f[3] != "dirty":
            continue
        start, length = int(f[0]), int(f[1])
        if runs and runs[-1][1] == start:
            runs[-1][1] += length
        else:
            runs.append([start, start + length])
    return [tuple(r) for r in runs]


def bitmap_flags(img):
    """{name: [flags]} from qemu-img info."""
    info = json.loads(H.qemu_img("info", "-U", "--output=json", img).out)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def extents(chunks, bits, size):
    runs = []
    for c in sorted(chunks):
        s, e = c << bits, min(size, (c + 1) << bits)
        if runs and runs[-1][1] == s:
            runs[-1][1] = e
        else:
            runs.append([s, e])
    return [tuple(r) for r in runs]


def seek_extents(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        runs, pos = [], 0
        while True:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return runs
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            runs.append((d, h))
            pos = h
    finally:
        os.close(fd)


class Model:
    """The chunks each enabled bitmap must have set, and the disk's size."""

    def __init__(self, img):
        self.size = H.virtual_size(img)
        self.chunks = {n: set() for n in ENABLED}
        for n, bits in ENABLED.items():
            for s, e in qemu_dirty(img, n):
                self.chunks[n].update(range(s >> bits, ((e - 1) >> bits) + 1))

    def touch(self, off, length):
        end = min(off + length, self.size)
        for n, bits in ENABLED.items():
            if end > off:
                self.chunks[n].update(range(off >> bits, ((end - 1) >> bits) + 1))

    def resize(self, size):
        for n, bits in ENABLED.items():
            keep = (size + (1 << bits) - 1) >> bits
            self.chunks[n] = {c for c in self.chunks[n] if c < keep}
        self.size = size

    def expected(self, name):
        return extents(self.chunks[name], ENABLED[name], self.size)


@T.test
def test_random_writes():
    if not have_nbd():
        print("  qemu-nbd/nbdinfo missing: skipped", flush=True)
        return
    img = os.path.join(SRC, "vm.qcow2")
    make_image(img)
    frozen_before = qemu_dirty(img, "frozen")
    model = Model(img)
    rng = random.Random(T.seed())
    with H.Mount(SRC) as m:
        names = sorted(os.listdir(m.mnt))
        T.check("one file per enabled bitmap, none for the disabled one",
                names == sorted(["vm.raw"] + ["vm@bitmap-%s.raw" % n for n in ENABLED]), names)
        bm = {n: m.path("vm@bitmap-%s.raw" % n) for n in ENABLED}
        st = os.stat(bm["daily"])
        T.check("a bitmap file is read-only with the disk's size",
                st.st_mode & 0o222 == 0 and st.st_size == 8 * MiB, (oct(st.st_mode), st.st_size))
        e = H.open_errno(bm["daily"], os.O_WRONLY)
        T.check("opening it for writing is refused", e in (errno.EROFS, errno.EACCES), e)
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        try:
            for i in range(48):
                op = rng.choice(["write"] * 5 + ["zero", "punch"])
                off = rng.randrange(0, model.size - 1)
                length = min(rng.randrange(1, 300 * KiB), model.size - off)
                if i == 20:
                    op, new = "grow", 12 * MiB
                elif i == 34:
                    op, new = "shrink", 10 * MiB + 64 * KiB
                if op == "write":
                    os.pwrite(fd, bytes([rng.randrange(1, 256)]) * length, off)
                elif op in ("zero", "punch"):
                    mode = H.FALLOC_FL_ZERO_RANGE if op == "zero" else H.FALLOC_FL_PUNCH_HOLE
                    H.fallocate(fd, mode | H.FALLOC_FL_KEEP_SIZE, off, length)
                else:
                    os.ftruncate(fd, new)
                    model.resize(new)
                    continue
                model.touch(off, length)
            # A write that grows the disk: the grown part is not dirty, the written bytes are.
            at = model.size + 100 * KiB
            os.pwrite(fd, b"\x5a" * 1000, at)
            model.resize((at + 1000 + 511) // 512 * 512)  # sizes are whole sectors
            model.touch(at, 1000)
        finally:
            os.close(fd)
        # The kernel keeps a file's attributes for under a second: the bitmap files' sizes follow
        # the disk's size within that.
        ok, _ = H.wait_for(lambda: all(os.stat(p).st_size == model.size for p in bm.values()), timeout=3)
        T.check("the bitmap files' size follows the disk", ok, (os.stat(bm["daily"]).st_size, model.size))
        for n in ENABLED:
            got = seek_extents(bm[n])
            T.check("%s: SEEK_DATA extents are the dirty chunks" % n, got == model.expected(n),
                    "got %s, want %s" % (got[:8], model.expected(n)[:8]))
        with open(m.path("vm.raw"), "rb") as f:
            disk = f.read()
        with open(bm["daily"], "rb") as f:
            data = f.read()
        want = bytearray(len(disk))
        for s, e in model.expected("daily"):
            want[s:e] = disk[s:e]
        T.check("the bitmap file reads the disk's data where dirty, zeros elsewhere", data == bytes(want),
                "%d bytes read, %d expected" % (len(data), len(want)))
        copy = os.path.join(work, "incr.raw")
        H.run(["cp", "--sparse=always", bm["daily"], copy])
        with open(copy, "rb") as f:
            T.check("cp --sparse=always makes the same bytes", f.read() == bytes(want))
    rc, out = H.check_clean(img)
    T.check("qemu-img check is clean", rc == 0, out)
    flags = bitmap_flags(img)
    T.check("enabled bitmaps are consistent again, the disabled one untouched",
            all(flags[n] == ["auto"] for n in ENABLED) and flags["frozen"] == [], flags)
    for n in ENABLED:
        got = qemu_dirty(img, n)
        T.check("%s: QEMU sees exactly the written chunks" % n, got == model.expected(n),
                "got %s, want %s" % (got[:8], model.expected(n)[:8]))
    T.check("the disabled bitmap is unchanged", qemu_dirty(img, "frozen") == frozen_before)


@T.test
def test_sigkill_leaves_bitmaps_in_use():
    d = os.path.join(work, "kill")
    os.makedirs(d)
    img = os.path.join(d, "vm.qcow2")
    make_image(img, 4 * MiB)
    m = H.Mount(d).start()
    try:
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        os.pwrite(fd, b"\x42" * (200 * KiB), 3 * MiB)
        os.fsync(fd)
        os.close(fd)
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(timeout=10)
    finally:
        m.force_cleanup()
    flags = bitmap_flags(img)
    T.check("after SIGKILL the enabled bitmaps stay in use, the disabled one not",
            all("in-use" in flags[n] for n in ENABLED) and "in-use" not in flags["frozen"], flags)
    rc, out = H.check_clean(img)
    T.check("qemu-img check: leaks at most", rc in (0, 3) and "ERROR" not in out, out)
    with H.Mount(d) as m:
        e = H.open_errno(m.path("vm@bitmap-daily.raw"), os.O_RDONLY)
        T.check("an inconsistent bitmap's file answers EIO", e == errno.EIO, e)


T.run()
