#!/usr/bin/env python3
"""End to end: an ext4 file system built on a loop device, converted to qcow2 (plain and
compressed), exposed by qcowfs, attached read-only to a loop device, mounted, and its files
compared with the originals; e2fsck -fn must find it clean."""

import filecmp
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("loop_mount", deadline=300)

work = H.tempdir("loop")
TREE = os.path.join(work, "tree")
SRC = os.path.join(work, "src")
os.makedirs(SRC)
if not T.args.list:
    H.require_loop_devices(work)
L = H.LoopDevices()


# ---- the tree to copy ---------------------------------------------------------------------------
def make_tree():
    rnd = random.Random(4)
    os.makedirs(TREE)
    if os.path.isdir("/usr/share/doc/bash"):
        shutil.copytree("/usr/share/doc/bash", os.path.join(TREE, "bash-doc"), symlinks=True)
    for d in range(4):
        sub = os.path.join(TREE, "dir%d" % d, "nested%d" % (d * 7))
        os.makedirs(sub)
        for i in range(12):
            n = rnd.choice((0, 1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537,
                            rnd.randrange(1, 900 * KiB)))
            with open(os.path.join(sub, "f%02d.bin" % i), "wb") as f:
                f.write(rnd.randbytes(n) if i % 3 else (b"text line %d\n" % i) * (n // 13 + 1))
    with open(os.path.join(TREE, "big.bin"), "wb") as f:
        f.write(rnd.randbytes(3 * MiB))
    os.symlink("dir0/nested0/f01.bin", os.path.join(TREE, "link"))


def tree_diff(a, b):
    """Differences between two trees (files byte for byte, symlinks, directories)."""
    problems = []
    for root, dirs, files in os.walk(a):
        rel = os.path.relpath(root, a)
        other = os.path.join(b, rel)
        if not os.path.isdir(other):
            problems.append("missing dir %s" % rel)
            continue
        theirs = set(os.listdir(other)) - {"lost+found"}
        mine = set(dirs) | set(files)
        if mine != theirs:
            problems.append("%s: entries differ: only here %s, only there %s" % (
                rel, sorted(mine - theirs)[:5], sorted(theirs - mine)[:5]))
        for f in files:
            pa, pb = os.path.join(root, f), os.path.join(other, f)
            if os.path.islink(pa):
                if not os.path.islink(pb) or os.readlink(pa) != os.readlink(pb):
                    problems.append("symlink %s differs" % os.path.join(rel, f))
            elif not os.path.isfile(pb) or not filecmp.cmp(pa, pb, shallow=False):
                problems.append("file %s differs" % os.path.join(rel, f))
    return problems


@T.fixture
def images():
    """An ext4 file system holding TREE, as fs.qcow2, fsc.qcow2 (zlib) and fsz.qcow2 (zstd, 4k
    clusters) in SRC; returns the sha256 of the raw file system."""
    make_tree()
    raw = os.path.join(work, "fs.img")
    _dev, fsdir = L.ext4_with(raw, 48 * MiB, TREE, os.path.join(work, "fs"))
    probs = tree_diff(TREE, fsdir)
    T.check("copy into the ext4 image is faithful (sanity)", not probs, probs[:3])
    L.cleanup()
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, os.path.join(SRC, "fs.qcow2"))
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, os.path.join(SRC, "fsc.qcow2"))
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
               "compression_type=zstd,cluster_size=4k", raw, os.path.join(SRC, "fsz.qcow2"))
    return H.sha256_file(raw)


@T.fixture
def qcowfs_mount():
    images()
    # the loop devices may hold the file a moment after losetup -d (autoclear); Mount.__exit__
    # retries fusermount3 -u while busy
    with H.Mount(SRC) as m:
        yield m


def loop_mount(name):
    raw_sha = images()
    m = qcowfs_mount()
    view = m.path(name + ".raw")
    T.check("%s.raw: same sha256 as the raw ext4 image" % name,
            H.sha256_file(view) == raw_sha)
    dev = L.attach(view, ro=True)
    fsck = H.run(["e2fsck", "-fn", dev], check=False)
    T.check("%s.raw: e2fsck -fn clean" % name, fsck.returncode == 0,
            "exit %d: %s" % (fsck.returncode, (fsck.out + fsck.err)[-400:]))
    d = L.mount(dev, os.path.join(work, "ro-" + name), ro=True)
    probs = tree_diff(TREE, d)
    T.check("%s.raw: tree read through the loop device equals the original" % name,
            not probs, "; ".join(probs[:4]))
    L.umount(d)
    L.detach(dev)


for name in ("fs", "fsc", "fsz"):
    T.add_test("test_loop_mount_%s" % name, loop_mount, name)
T.at_end(L.cleanup)

T.run()
