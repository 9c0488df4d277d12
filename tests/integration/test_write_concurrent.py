#!/usr/bin/env python3
"""Concurrent writes through the mount: 8 threads and 4 processes each write their own
interleaved 512-byte sectors of the same clusters at once (sector i belongs to writer i % 12),
in two rounds (the second overwrites half of each writer's sectors), over an image with a backing
file, one with an internal snapshot and compressed clusters, one with 4 KiB clusters and zero
clusters across an L2-table boundary, one with extended L2 over a backing file, and one with
512-byte clusters, while other threads read; once through the data cache, once without it. Afterwards every sector holds its
writer's last pattern, `qemu-img check` is clean and `qemu-img compare` with the expected content
is identical; the snapshot and the backing file are unchanged.

Then six threads apply random writes, punches, zero ranges and allocations to disjoint ranges of
one disk at once. Whole-file copies (dd, cp) onto exposed files are test_write_copies.py."""

import copy
import os
import random
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_concurrent", deadline=600)

SEED = T.seed()
THREADS = 8
PROCS = 4
NW = THREADS + PROCS

# Shared by the writer threads, the writer processes (passed as source) and the checker.
COMMON = r'''
import os, random, struct, time, mmap

def pattern(w, s, rnd_no):
    head = struct.pack("<4sIII", b"QWRT", w, s, rnd_no)
    body = (b"writer %d sector %d round %d|" % (w, s, rnd_no)) * 20
    return head + body[:512 - len(head)]

def plan(seed, w, nw, nsectors):
    """Writer w's sectors in round-1 order and the ones it overwrites in round 2."""
    mine = list(range(w, nsectors, nw))
    rnd = random.Random(seed * 1000 + w)
    if w % 2:
        rnd.shuffle(mine)          # odd writers: random order
    again = rnd.sample(mine, len(mine) // 2)
    return mine, again

def open_rw(path, direct):
    if direct:
        try:
            return os.open(path, os.O_RDWR | os.O_DIRECT), True
        except OSError:
            pass
    return os.open(path, os.O_RDWR), False

def write_sectors(path, w, nw, base, nsectors, seed, direct, start_at):
    mine, again = plan(seed, w, nw, nsectors)
    fd, direct = open_rw(path, direct)
    buf = mmap.mmap(-1, 512)   # aligned, for O_DIRECT
    time.sleep(max(0.0, start_at - time.time()))
    try:
        for rnd_no, seq in ((1, mine), (2, again)):
            for s in seq:
                buf[:] = pattern(w, s, rnd_no)
                n = os.pwrite(fd, buf, base + 512 * s)
                if n != 512:
                    raise OSError(5, "short write %d at sector %d" % (n, s))
        os.fsync(fd)
    finally:
        os.close(fd)
    return direct
'''
exec(COMMON)

WORKER = COMMON + r'''
import sys
path, w, nw, base, nsectors, seed, direct, start_at = sys.argv[1:9]
try:
    write_sectors(path, int(w), int(nw), int(base), int(nsectors), int(seed), direct == "1",
                  float(start_at))
except OSError as e:
    print("writer process %s: %s" % (w, e)); sys.exit(1)
'''

work = H.tempdir("wconc")
SRC = os.path.join(work, "src")
os.makedirs(SRC)
SRC_NC = os.path.join(work, "src-nocache")


def img(name):
    return os.path.join(SRC, name)


class Target:
    def __init__(self, name, base, nsectors, cs):
        self.name = name
        self.img = img(name + ".qcow2")
        self.view = name + ".raw"
        self.base = base
        self.nsectors = nsectors
        self.cs = cs
        self.ref = os.path.join(work, name + ".ref")      # content before mounting
        self.expect = os.path.join(work, name + ".expect")
        self.protected = []
        self.snaps = {}


targets = []


def build_backed():
    # an overlay over a backing file; the region starts in the middle of a cluster
    base = img("base.qcow2")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(work, "b.bin"), 16 * MiB, 5), base)
    t = Target("backed", 1 * MiB - 32 * KiB, 4096, 64 * KiB)
    H.create(t.img, 16 * MiB, backing="base.qcow2", cwd=SRC)
    H.qemu_io(t.img, "write -P 0x61 %d 64k" % (1 * MiB + 128 * KiB), "write -z %d 64k" % (2 * MiB))
    t.protected = [base]
    return t


def build_snap():
    # internal snapshot; compressed, zero and shared clusters under the region
    t = Target("snap", 4 * MiB, 4096, 64 * KiB)
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(work, "s.bin"), 16 * MiB, 6,
                                  holes=[(4 * MiB, 128 * KiB)]), t.img)
    H.qemu_io(t.img, "write -c -P 0x71 4M 128k", "write -z 4544k 64k", "discard 5M 64k")
    H.qemu_img("snapshot", "-c", "s1", t.img)
    H.qemu_io(t.img, "write -P 0x72 %d 64k" % (4 * MiB + 256 * KiB))
    return t


def build_small():
    # 4 KiB clusters: an L2 table maps 2 MiB; the region straddles that boundary
    t = Target("small", 2 * MiB - 256 * KiB, 2048, 4 * KiB)
    H.create(t.img, 8 * MiB, "cluster_size=4k")
    H.qemu_io(t.img, "write -P 0x81 1M 2M", "write -z 1900k 100k", "write -z -u 2100k 40k")
    return t


def build_extl2():
    # extended L2 over a backing file: 2 KiB subclusters, so four writers share each one and
    # every first write to a subcluster copies the rest of it from the backing file
    base = img("xbase.qcow2")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(work, "x.bin"), 8 * MiB, 7), base)
    t = Target("extl2", 3 * MiB - 4096, 4096, 64 * KiB)
    H.create(t.img, 8 * MiB, "extended_l2=on,cluster_size=64k", backing="xbase.qcow2", cwd=SRC)
    H.qemu_io(t.img, "write -P 0x91 3M 6k", "write -z 3200k 10k", "write -P 0x92 4M 64k")
    t.protected = [base]
    return t


def build_tiny():
    # 512-byte clusters: every sector is a cluster, an L2 table maps 32 KiB, so the writers
    # allocate clusters, L2 tables and refcount blocks all at once
    t = Target("tiny", 96 * KiB - 1024, 2048, 512)
    H.create(t.img, 4 * MiB, "cluster_size=512")
    H.qemu_io(t.img, "write -P 0xa1 100k 64k")
    return t


@T.fixture
def built():
    """The targets in SRC, and a copy of them in SRC_NC (for the round without the data cache);
    returns (targets, targets_nc)."""
    for fn in (build_backed, build_snap, build_small, build_extl2, build_tiny):
        with T.step("build %s" % fn.__name__[6:]):
            t = fn()
            H.to_raw(t.img, t.ref, cwd=SRC)
            for s in H.snapshot_names(t.img):
                out = os.path.join(work, "%s@%s.ref" % (t.name, s))
                H.to_raw(t.img, out, snapshot=s)
                t.snaps[s] = out
            t.protected_hash = H.hash_files(t.protected)
            # expected content: the old content with every writer's last pattern over its sectors
            with open(t.ref, "rb") as f:
                data = bytearray(f.read())
            for w in range(NW):
                mine, again = plan(SEED, w, NW, t.nsectors)
                last = dict((s, 1) for s in mine)
                last.update((s, 2) for s in again)
                for s, r in last.items():
                    data[t.base + 512 * s:t.base + 512 * (s + 1)] = pattern(w, s, r)
            with open(t.expect, "wb") as f:
                f.write(data)
            targets.append(t)
    # The same images twice: through the data write-back cache (default), and without it
    # (-o write_cache=0: every write goes to the qcow2 write path at once, concurrently).
    shutil.copytree(SRC, SRC_NC)
    targets_nc = []
    for t in targets:
        c = copy.copy(t)
        c.img = os.path.join(SRC_NC, os.path.basename(t.img))
        c.protected = [os.path.join(SRC_NC, os.path.basename(p)) for p in t.protected]
        c.protected_hash = dict((os.path.join(SRC_NC, os.path.basename(p)), h)
                                for p, h in t.protected_hash.items())
        targets_nc.append(c)
    return targets, targets_nc


def sector_ok(t, old, got, s):
    """Is sector s (bytes `got`) a state it may legally be in while the writers run?"""
    w = s % NW
    return got == old or got == pattern(w, s, 1) or got == pattern(w, s, 2)


def hammer(m, t):
    """All writers on one image at once, with two readers; returns problem strings."""
    path = m.path(t.view)
    problems = []
    start_at = time.time() + 1.0
    procs = []
    for i in range(PROCS):
        w = THREADS + i
        procs.append((w, subprocess.Popen(
            [sys.executable, "-c", WORKER, path, str(w), str(NW), str(t.base), str(t.nsectors),
             str(SEED), "1" if i % 2 else "0", repr(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    directs = []

    def writer(w):
        try:
            directs.append(write_sectors(path, w, NW, t.base, t.nsectors, SEED, w % 2 == 0,
                                         start_at))
        except OSError as e:
            problems.append("writer thread %d: %s" % (w, e))

    stop = threading.Event()
    with open(t.ref, "rb") as f:
        f.seek(t.base)
        old = f.read(512 * t.nsectors)
    reads = [0]
    direct_readers = []

    def reader(i):
        rnd = random.Random(SEED + i)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            direct = True
            direct_readers.append(i)
        except OSError:
            fd = os.open(path, os.O_RDONLY)
            direct = False
        buf = __import__("mmap").mmap(-1, 64 * KiB)
        try:
            while not stop.is_set():
                s0 = rnd.randrange(t.nsectors)
                n = min(rnd.randrange(1, 129), t.nsectors - s0)
                got = os.preadv(fd, [memoryview(buf)[:512 * n]], t.base + 512 * s0)
                reads[0] += 1
                if got != 512 * n:
                    problems.append("reader: short read %d of %d" % (got, 512 * n))
                    return
                if not direct:
                    continue  # the page cache does not promise whole sectors
                for k in range(n):
                    s = s0 + k
                    sec = bytes(buf[512 * k:512 * (k + 1)])
                    if not sector_ok(t, old[512 * s:512 * (s + 1)], sec, s):
                        problems.append("reader: sector %d (offset %d) reads %r..., neither "
                                        "its old content nor a pattern of writer %d" % (
                                            s, t.base + 512 * s, sec[:24], s % NW))
                        return
        except OSError as e:
            problems.append("reader: %s" % e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(THREADS)]
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    t0 = time.monotonic()
    for th in threads + readers:
        th.start()
    for th in threads:
        th.join(timeout=240)
    for w, p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            problems.append("writer process %d timed out" % w)
        if p.returncode != 0:
            problems.append("writer process %d exit %d: %s" % (w, p.returncode,
                                                               out.decode(errors="replace")[-300:]))
    stop.set()
    for th in readers:
        th.join(timeout=60)
    if any(th.is_alive() for th in threads + readers):
        problems.append("a writer or reader thread hangs")
    print("  %s: %d writers (%d threads with O_DIRECT), %d reads (%d readers with O_DIRECT), "
          "%.1fs" % (t.name, NW, sum(directs), reads[0], len(direct_readers),
                     time.monotonic() - t0), flush=True)
    return problems


def region_diff(path, t):
    """Sectors of the region that do not hold their expected pattern (read through qcowfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        H.drop_page_cache(fd)
        got = H.pread_full(fd, 512 * t.nsectors, t.base)
    finally:
        os.close(fd)
    with open(t.expect, "rb") as f:
        f.seek(t.base)
        exp = f.read(512 * t.nsectors)
    bad = [s for s in range(t.nsectors) if got[512 * s:512 * (s + 1)] != exp[512 * s:512 * (s + 1)]]
    desc = []
    for s in bad[:4]:
        sec = got[512 * s:512 * (s + 1)]
        desc.append("sector %d (offset %d, writer %d) holds %r" % (
            s, t.base + 512 * s, s % NW, sec[:28]))
    return bad, desc


def run_round(src, targets, args, label):
    """Mounts `src` (with `args`), hammers every target, unmounts and checks the images."""
    try:
        with H.Mount(src, args=args) as m:
            for t in targets:
                with T.step("%s%s: concurrent writers" % (t.name, label)):
                    probs = hammer(m, t)
                    T.check("%s%s: %d writers and 2 readers, no errors" % (t.name, label, NW),
                            not probs, "; ".join(probs[:4]))
                    bad, desc = region_diff(m.path(t.view), t)
                    T.check("%s%s: all %d sectors hold their writer's last pattern (read through "
                            "the mount)" % (t.name, label, t.nsectors), not bad,
                            "%d sectors wrong: %s" % (len(bad), "; ".join(desc)))
                    T.check_compare("%s%s: whole disk equals the expected content" % (
                        t.name, label), m.path(t.view), t.expect, nreads=20, cluster_size=t.cs)
                    for s, ref in t.snaps.items():
                        T.check_compare("%s%s: snapshot view %s@%s.raw unchanged" % (
                            t.name, label, t.name, s), m.path("%s@%s.raw" % (t.name, s)), ref,
                            nreads=10)
            T.check("qcowfs%s still running after the concurrent writes" % label, m.alive())
    except H.MountError as e:
        T.check("mount/unmount%s" % label, False, str(e))

    for t in targets:
        with T.step("%s%s: after unmount" % (t.name, label)):
            rc, out = H.check_clean(t.img)
            T.check("%s%s: qemu-img check exit 0" % (t.name, label), rc == 0,
                    "exit %d: %s" % (rc, H.clip_text(out)))
            dirty, corrupt = H.header_bits(t.img)
            T.check("%s%s: dirty and corrupt bits clear" % (t.name, label),
                    not dirty and not corrupt, "dirty=%s corrupt=%s" % (dirty, corrupt))
            rc, out = H.qemu_compare(t.img, t.expect)
            T.check("%s%s: qemu-img compare with the expected content: identical" % (
                t.name, label), rc == 0, "exit %d: %s" % (rc, out[-500:]))
            for s, ref in t.snaps.items():
                out = os.path.join(work, "after-%s%s@%s" % (t.name, label, s))
                H.to_raw(t.img, out, snapshot=s)
                d = H.snapshot_content_diff(out, ref)
                T.check("%s%s: snapshot %s unchanged" % (t.name, label, s), d is None, d)
            for p, h in t.protected_hash.items():
                T.check("%s%s: backing file %s unchanged" % (t.name, label, os.path.basename(p)),
                        H.sha256_file(p) == h)


@T.test
def test_interleaved_sectors():
    run_round(SRC, built()[0], [], "")


@T.test
def test_interleaved_sectors_no_cache():
    run_round(SRC_NC, built()[1], ["-o", "write_cache=0"], " (write_cache=0)")


# ---- parallel random operations on disjoint ranges -----------------------------------------------
# Six threads, each with its own handle, apply random writes, punches, zero ranges and
# allocations to its own byte range (the boundaries fall inside clusters, so neighbours share
# clusters, L2 tables and refcount blocks), mirrored to a reference: freeing and allocating
# clusters race with each other.

PR = os.path.join(work, "par")
PRSRC = os.path.join(PR, "src")
os.makedirs(PRSRC)


@T.fixture
def par_images():
    """p4k.qcow2 (4k clusters) and pover.qcow2 over pbase.qcow2, with their references; yields
    [(name, image, reference, cluster size)], and checks after the last test that the backing
    file is unchanged."""
    par = []
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k",
               H.write_varied_raw(os.path.join(PR, "p.bin"), 24 * MiB, 21),
               os.path.join(PRSRC, "p4k.qcow2"))
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(PR, "q.bin"), 24 * MiB, 22),
               os.path.join(PRSRC, "pbase.qcow2"))
    H.create(os.path.join(PRSRC, "pover.qcow2"), 24 * MiB, backing="pbase.qcow2", cwd=PRSRC)
    H.qemu_io(os.path.join(PRSRC, "pover.qcow2"), "write -P 0x31 3M 5M", "write -z 12M 1M")
    for n, cs in (("p4k", 4 * KiB), ("pover", 64 * KiB)):
        im = os.path.join(PRSRC, n + ".qcow2")
        ref = H.to_raw(im, os.path.join(PR, n + ".ref"), cwd=PRSRC)
        par.append((n, im, ref, cs))
    pbase_hash = H.sha256_file(os.path.join(PRSRC, "pbase.qcow2"))
    yield par
    T.check("pbase.qcow2 (backing file) unchanged",
            H.sha256_file(os.path.join(PRSRC, "pbase.qcow2")) == pbase_hash)


NPAR = 6


def par_worker(view, ref, lo, hi, seed, out):
    rnd = random.Random(seed)
    f = H.DualFile(view, ref)
    try:
        for _ in range(120):
            ln = min(rnd.choice((rnd.randrange(1, 5000), rnd.randrange(1, 300000))), hi - lo)
            off = rnd.randrange(lo, hi - ln + 1)
            r = rnd.random()
            if r < 0.55:
                f.pwrite(off, rnd.randbytes(ln))
            elif r < 0.7:
                f.punch(off, ln)
            elif r < 0.85:
                f.zero_range(off, ln)
            elif r < 0.92:
                f.allocate(off, ln)
            else:
                f.fsync()
        out.append(None)
    except H.OpError as e:
        out.append("%s (after: %s)" % (e, "; ".join(f.history[-5:-1])))
    except OSError as e:
        out.append("%s" % e)
    finally:
        f.close()


def parallel_round(label, args):
    """A mount of PRSRC; NPAR threads on each image at once; the unmount and the checks. A second
    round starts from the result of the first (and its reference)."""
    par = par_images()
    try:
        with H.Mount(PRSRC, args=args) as m:
            for n, im, ref, cs in par:
                with T.step("%s%s: parallel operations" % (n, label)):
                    size = os.path.getsize(ref)
                    rnd = random.Random(SEED + len(label))
                    cuts = sorted(rnd.randrange(1, size) for _ in range(NPAR - 1))
                    bounds = [0] + cuts + [size]
                    out = []
                    ths = [threading.Thread(target=par_worker, args=(
                        m.path(n + ".raw"), ref, bounds[i], bounds[i + 1], SEED * 10 + i, out))
                        for i in range(NPAR) if bounds[i + 1] > bounds[i]]
                    t0 = time.monotonic()
                    for th in ths:
                        th.start()
                    for th in ths:
                        th.join(timeout=240)
                    errs = [e for e in out if e]
                    T.check("%s%s: %d threads x 120 random operations on disjoint ranges, no "
                            "errors (%.1fs)" % (n, label, len(ths), time.monotonic() - t0),
                            not errs and len(out) == len(ths), "; ".join(errs[:3]))
                    fd = os.open(m.path(n + ".raw"), os.O_RDONLY)
                    os.fsync(fd)
                    H.drop_page_cache(fd)
                    os.close(fd)
                    d = H.first_diff_files(m.path(n + ".raw"), ref)
                    T.check("%s%s: the disk equals the reference (read through the mount)" % (
                        n, label), d is None, "%s; differing ranges: %s; ranges per thread: %s" % (
                            d, ", ".join(H.diff_ranges(m.path(n + ".raw"), ref)), bounds))
    except H.MountError as e:
        T.check("parallel operations%s: mount/unmount" % label, False, str(e))
    for n, im, ref, cs in par:
        with T.step("%s%s: after unmount" % (n, label)):
            rc, out = H.check_clean(im)
            T.check("%s%s: qemu-img check exit 0" % (n, label), rc == 0,
                    "exit %d: %s" % (rc, H.clip_text(out)))
            rc, out = H.qemu_compare(im, ref, cwd=PRSRC)
            T.check("%s%s: qemu-img compare with the reference: identical" % (n, label),
                    rc == 0, "exit %d: %s" % (rc, out[-400:]))


@T.test
def test_parallel_ops():
    parallel_round("", [])


@T.test
def test_parallel_ops_no_cache():
    parallel_round(" (write_cache=0)", ["-o", "write_cache=0"])



BIG = os.path.join(work, "big")
BIGSRC = os.path.join(BIG, "src")


@T.test
def test_large_direct_writes_in_flight():
    """fio keeps 16 writes of 64 KiB to 1 MiB in flight with O_DIRECT (libaio), over an empty
    image and an overlay, then reads every block back and checks it (--verify). Large writes
    keep the request buffer they arrived in instead of copying it, so a buffer handed on while
    its write is in flight would show as another block's bytes. After the unmount the image is
    clean and its raw conversion passes fio's verification again."""
    if not shutil.which("fio"):
        print("  fio missing (scripts/install-deps.sh installs it): skipped", flush=True)
        return
    os.makedirs(BIGSRC, exist_ok=True)
    size = 64 * MiB
    H.create(os.path.join(BIGSRC, "empty.qcow2"), size)
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2",
               H.write_varied_raw(os.path.join(BIG, "base.bin"), size, 31),
               os.path.join(BIGSRC, "base.qcow2"))
    H.create(os.path.join(BIGSRC, "over.qcow2"), size, backing="base.qcow2", cwd=BIGSRC)
    job = ["--name=inflight", "--rw=randwrite", "--bsrange=64k-1m", "--ioengine=libaio",
           "--iodepth=16", "--size=%d" % size, "--verify=crc32c", "--randseed=%d" % (SEED % 100000)]

    def fio(path, *extra):
        # In the test's directory: fio leaves its verify state file where it runs.
        p = subprocess.run(["fio", "--filename=" + path] + job + list(extra), cwd=BIG,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        return p.returncode, p.stdout

    for n in ("empty", "over"):
        im = os.path.join(BIGSRC, n + ".qcow2")
        try:
            with H.Mount(BIGSRC) as m:
                rc, out = fio(m.path(n + ".raw"), "--direct=1", "--do_verify=1")
                T.check("%s: fio, 16 writes of 64 KiB-1 MiB in flight, every block read back intact" % n,
                        rc == 0 and "verify: bad" not in out, H.clip_text(out))
        except H.MountError as e:
            T.check("%s: mount/unmount" % n, False, str(e))
            continue
        rc, out = H.check_clean(im)
        T.check("%s: qemu-img check exit 0" % n, rc == 0, "exit %d: %s" % (rc, H.clip_text(out)))
        raw = H.to_raw(im, os.path.join(BIG, n + ".raw"), cwd=BIGSRC)
        rc, out = fio(raw, "--verify_only")
        T.check("%s: the image, converted to raw, passes fio's verification" % n,
                rc == 0 and "verify: bad" not in out, H.clip_text(out))


T.run()
