#!/usr/bin/env python3
"""Copy-on-read through the mount: with -o copy_on_read, reading an overlay whole fills it from
its backing chain (2 and 3 levels, an extended-L2 overlay read in odd pieces): after the unmount
`qemu-img map` shows every range with data allocated in the overlay, `qemu-img check` is clean,
and with the base detached (`qemu-img rebase -u -b ''`) `qemu-img compare` against the old chain
is identical. The per-image xattr user.qcowfs.copy_on_read turns it on without a remount (and an
image without it is not copied); snapshot files and an -o ro mount never copy; fallocate mode 0
populates a chosen range; a kill -9 in the middle of copies leaves nothing but leaked clusters
and the data intact."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
XATTR = "user.qcowfs.copy_on_read"
SIZE = 8 * MiB
CRASH_SIZE = 48 * MiB
T = H.TestRun("copy_on_read", deadline=300)

D = H.tempdir("cor")
SRC = os.path.join(D, "src")  # made by the fixture


def data_below(name):
    """[(start, length)] of the ranges qemu-img map calls data that lie below the image."""
    p = H.run(["qemu-img", "map", "--output=json", img(name + ".qcow2")], check=False, cwd=SRC)
    if p.returncode != 0:
        return [(-1, p.err.strip())]
    return [(e["start"], e["length"]) for e in json.loads(p.out) if e.get("data") and e["depth"] != 0]


def setxattr(path, value, name=XATTR):
    """os.setxattr: 0, or the errno it failed with."""
    try:
        os.setxattr(path, name, value)
        return 0
    except OSError as e:
        return e.errno


def sha(name):
    return H.sha256_file(img(name))


def img(name):
    return os.path.join(SRC, name)


def read_whole(path, piece):
    with open(path, "rb") as f:
        while f.read(piece):
            pass


@T.fixture
def images():
    """base.qcow2 (data, a zero cluster, holes) and overlays on it; mid.qcow2 for a third level;
    chain.raw: what every overlay reads as."""
    os.makedirs(SRC)
    H.create(img("base.qcow2"), SIZE, opts="cluster_size=64k")
    H.qemu_io(img("base.qcow2"), "write -P 0x5a 0 3M", "write -z 1M 64k", "write -P 0x3c 5M 100k",
              "write -P 0x77 %d 200k" % (SIZE - 200 * KiB))
    # a base with data everywhere, so that the kill finds copies running
    H.create(img("crashbase.qcow2"), CRASH_SIZE, opts="cluster_size=64k")
    H.qemu_io(img("crashbase.qcow2"), "write -P 0x66 0 %d" % CRASH_SIZE)
    H.create(img("mid.qcow2"), SIZE, opts="cluster_size=32k", backing="base.qcow2", cwd=SRC)
    H.qemu_io(img("mid.qcow2"), "write -P 0x11 512k 100k", "write -P 0x12 6M 64k")
    refs = {}
    for name, below, opts in (("cor", "base.qcow2", "cluster_size=64k"),
                              ("three", "mid.qcow2", "cluster_size=64k"),
                              ("xl", "base.qcow2", "cluster_size=64k,extended_l2=on"),
                              ("xattr", "base.qcow2", "cluster_size=64k"),
                              ("plain", "base.qcow2", "cluster_size=64k"),
                              ("snap", "base.qcow2", "cluster_size=64k"),
                              ("fal", "base.qcow2", "cluster_size=64k"),
                              ("crash", "crashbase.qcow2", "cluster_size=64k"),
                              ("bm", "base.qcow2", "cluster_size=64k")):
        H.create(img(name + ".qcow2"), CRASH_SIZE if name == "crash" else SIZE, opts=opts, backing=below,
                 cwd=SRC)
        H.qemu_io(img(name + ".qcow2"), "write -P 0xee 128k 8k")  # a cluster of its own
        refs[name] = H.to_raw(img(name + ".qcow2"), os.path.join(D, name + ".ref"), cwd=SRC)
    H.qemu_img("snapshot", "-c", "s1", img("snap.qcow2"))
    H.qemu_img("bitmap", "--add", "-g", str(64 * KiB), img("bm.qcow2"), "b")  # after its own write
    return refs


def expect_populated(name, refs):
    below = data_below(name)
    T.check("%s: qemu-img map: every range with data is allocated in the overlay" % name, not below,
            "below it: %s" % below[:4])
    rc, out = H.check_clean(img(name + ".qcow2"))
    T.check("%s: qemu-img check clean" % name, rc == 0, H.clip_text(out))
    H.qemu_img("rebase", "-u", "-b", "", img(name + ".qcow2"))
    rc, out = H.qemu_compare(img(name + ".qcow2"), refs[name], cwd=SRC)
    T.check("%s: base detached: qemu-img compare with the old chain identical" % name, rc == 0,
            out[-500:])


@T.test
def test_mount_option_fills_overlays():
    refs = images()
    before = sha("base.qcow2")
    with H.Mount(SRC, args=["-o", "copy_on_read"]) as m:
        for name, piece in (("cor", 1 * MiB), ("three", 128 * KiB), ("xl", 3 * KiB + 512)):
            with T.step("%s: read whole" % name):
                T.check_compare("%s: reads as the chain" % name, m.path(name + ".raw"), refs[name],
                                nreads=4)
                read_whole(m.path(name + ".raw"), piece)
    T.check("base.qcow2 unchanged", sha("base.qcow2") == before)
    for name in ("cor", "three", "xl"):
        with T.step("%s: after unmount" % name):
            expect_populated(name, refs)


@T.test
def test_xattr_turns_it_on_without_remount():
    refs = images()
    plain_before = sha("plain.qcow2")
    with H.Mount(SRC) as m:
        path = m.path("xattr.raw")
        with open(path, "rb") as f:  # open before the setting: it applies to the open image
            err = setxattr(path, b"1")
            T.check("setxattr %s=1 succeeds" % XATTR, err == 0, os.strerror(err))
            while f.read(1 * MiB):
                pass
        read_whole(m.path("plain.raw"), 1 * MiB)
        err = setxattr(path, b"yes")
        T.check("a value other than 1 or 0 is refused (EINVAL)", err == errno.EINVAL, os.strerror(err))
        err = setxattr(m.path("snap@s1.raw"), b"1")
        T.check("a snapshot file refuses the setting (EROFS)", err == errno.EROFS, os.strerror(err))
        err = setxattr(m.path("base.raw"), b"1")
        T.check("the backing file of other images refuses the setting (EROFS)", err == errno.EROFS,
                os.strerror(err))
        err = setxattr(path, b"1", name="user.other")
        T.check("another attribute name is refused (EOPNOTSUPP)", err == errno.EOPNOTSUPP, os.strerror(err))
        try:
            os.getxattr(path, XATTR)
            err = 0
        except OSError as e:
            err = e.errno
        T.check("the setting cannot be read back (EOPNOTSUPP)", err == errno.EOPNOTSUPP, os.strerror(err))
        T.check("the log says the setting changed", "copy-on-read on" in m.log_text(),
                m.log_text()[-500:])
    below = data_below("xattr")
    T.check("xattr: every range with data is allocated in the overlay", not below,
            "below it: %s" % below[:4])
    rc, out = H.check_clean(img("xattr.qcow2"))
    T.check("xattr: qemu-img check clean", rc == 0, H.clip_text(out))
    T.check("plain (no setting, no option): not written", sha("plain.qcow2") == plain_before)


@T.test
def test_snapshots_and_ro_mount_never_copy():
    refs = images()
    before = {n: sha(n + ".qcow2") for n in ("snap", "cor", "plain")}
    with H.Mount(SRC, args=["-o", "copy_on_read"]) as m:
        read_whole(m.path("snap@s1.raw"), 1 * MiB)
    T.check("snap: reading its snapshot file writes nothing", sha("snap.qcow2") == before["snap"])
    with H.Mount(SRC, args=["-o", "ro,copy_on_read"]) as m:
        T.check_compare("plain: reads as the chain on an -o ro mount", m.path("plain.raw"),
                        refs["plain"], nreads=4)
        read_whole(m.path("plain.raw"), 1 * MiB)
        err = setxattr(m.path("plain.raw"), b"1")
        T.check("setxattr on an -o ro mount fails (EROFS)", err == errno.EROFS, os.strerror(err))
    T.check("plain: an -o ro mount writes nothing", sha("plain.qcow2") == before["plain"])


@T.test
def test_fallocate_populates_a_range():
    refs = images()
    with H.Mount(SRC) as m:
        r = H.run(["fallocate", "-o", str(2 * MiB), "-l", str(4 * MiB), m.path("fal.raw")], check=False)
        T.check("fallocate -o 2M -l 4M exits 0", r.returncode == 0, r.err.strip())
        T.check_compare("fal: still reads as the chain", m.path("fal.raw"), refs["fal"], nreads=4)
    below = data_below("fal")
    T.check("fal: no data below the overlay in [2M, 6M)",
            all(s + ln <= 2 * MiB or s >= 6 * MiB for s, ln in below), "below: %s" % below[:6])
    T.check("fal: data below the overlay outside the range is left there", bool(below))
    rc, out = H.check_clean(img("fal.qcow2"))
    T.check("fal: qemu-img check clean", rc == 0, H.clip_text(out))
    rc, out = H.qemu_compare(img("fal.qcow2"), refs["fal"], cwd=SRC)
    T.check("fal: qemu-img compare with the chain identical", rc == 0, out[-500:])


def qemu_dirty(name, bitmap):
    """Dirty extents [(start, end)] of `bitmap` of image `name`, as qemu-nbd -B serves them."""
    p = H.run(["nbdinfo", "--map=qemu:dirty-bitmap:" + bitmap, "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
               "-B", bitmap, img(name), "]"], timeout=60, cwd=SRC)
    runs = []
    for f in (line.split() for line in p.out.splitlines()):
        if len(f) >= 4 and f[3] == "dirty":
            start, end = int(f[0]), int(f[0]) + int(f[1])
            if runs and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end])
    return [tuple(r) for r in runs]


@T.test
def test_copies_mark_bitmaps():
    """A copy changes what the image holds, so an incremental backup must include it: copies by
    reads and by fallocate set the bits of the overlay's enabled bitmaps, and nothing else does."""
    if not all(shutil.which(t) for t in ("qemu-nbd", "nbdinfo")):
        print("  qemu-nbd/nbdinfo missing: skipped", flush=True)
        return
    refs = images()
    with H.Mount(SRC, args=["-o", "copy_on_read"]) as m:
        # O_DIRECT: no readahead, so the read copies exactly its own range.
        r = H.run(["dd", "if=" + m.path("bm.raw"), "of=/dev/null", "bs=1M", "count=1", "iflag=direct",
                   "status=none"], check=False)
        T.check("bm: direct read of the first MiB", r.returncode == 0, r.err.strip())
        r = H.run(["fallocate", "-o", str(5 * MiB), "-l", str(128 * KiB), m.path("bm.raw")], check=False)
        T.check("bm: fallocate -o 5M -l 128k exits 0", r.returncode == 0, r.err.strip())
    # [0, 1M) from the base except the overlay's own cluster at 128k; [5M, 5M + 128k) from
    # fallocate (the base's 100 KiB there fill two clusters).
    want = [(0, 128 * KiB), (192 * KiB, 1 * MiB), (5 * MiB, 5 * MiB + 128 * KiB)]
    got = qemu_dirty("bm.qcow2", "b")
    T.check("bm: the bitmap's dirty extents are exactly the copied clusters", got == want,
            "got %s, want %s" % (got, want))
    rc, out = H.check_clean(img("bm.qcow2"))
    T.check("bm: qemu-img check clean", rc == 0, H.clip_text(out))
    rc, out = H.qemu_compare(img("bm.qcow2"), refs["bm"], cwd=SRC)
    T.check("bm: qemu-img compare with the chain identical", rc == 0, out[-500:])


@T.test
def test_kill_during_copies():
    refs = images()
    m = H.Mount(SRC, args=["-o", "copy_on_read"]).start()
    try:
        # Many readers at once keep copies running when the daemon is killed.
        readers = [subprocess.Popen(["dd", "if=" + m.path("crash.raw"), "of=/dev/null", "bs=64k",
                                     "skip=%d" % k, "iflag=direct", "status=none"],
                                    stderr=subprocess.DEVNULL) for k in range(0, 768, 96)]
        time.sleep(0.2)
        alive = m.alive()
        os.kill(m.proc.pid, signal.SIGKILL)
        for p in readers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        T.check("crash: daemon alive until the kill", alive)
    finally:
        m.force_cleanup()
    c = H.qcheck(img("crash.qcow2"))
    T.check("crash: qemu-img check: nothing but leaked clusters", c.leaks_only(), c.summary())
    print("  after the kill: %s leaked clusters, %d ranges with data still below the overlay" % (
        c.leaks, len(data_below("crash"))), flush=True)
    rc, out = H.qemu_compare(img("crash.qcow2"), refs["crash"], cwd=SRC)
    T.check("crash: qemu-img compare with the chain identical", rc == 0, out[-500:])


T.run()
