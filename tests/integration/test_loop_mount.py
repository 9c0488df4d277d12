#!/usr/bin/env python3
"""End to end: an ext4 file system built on a loop device, converted to qcow2 (plain and
compressed), exposed by qcowfs, attached read-only to a loop device, mounted, and its files
compared with the originals; e2fsck -fn must find it clean."""

import filecmp
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("loop_mount", deadline=300)


def skip(reason):
    print("SKIP: %s" % reason, flush=True)
    H._cleanup()
    sys.exit(H.SKIP)


for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
    if shutil.which(tool) is None:
        skip("%s missing" % tool)
if not os.path.exists("/dev/loop-control"):
    skip("no /dev/loop-control")

work = H.tempdir("loop")
TREE = os.path.join(work, "tree")
SRC = os.path.join(work, "src")
os.makedirs(SRC)

# probe: can we attach a loop device at all?
probe = os.path.join(work, "probe.img")
with open(probe, "wb") as f:
    f.truncate(1 * MiB)
p = subprocess.run(["losetup", "-f", "--show", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
if p.returncode != 0:
    skip("losetup not possible: %s" % p.stderr.decode().strip())
subprocess.run(["losetup", "-d", p.stdout.decode().strip()])
os.unlink(probe)

loops = []       # attached loop devices, detached at the end
mounted = []     # block-device mounts, unmounted at the end


def cleanup_loops():
    for d in reversed(mounted):
        subprocess.run(["umount", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if H.is_mounted(d):
            subprocess.run(["umount", "-l", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mounted.clear()
    for l in reversed(loops):
        subprocess.run(["losetup", "-d", l], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loops.clear()


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


try:
    with T.step("build ext4 image"):
        make_tree()
        raw = os.path.join(work, "fs.img")
        with open(raw, "wb") as f:
            f.truncate(48 * MiB)
        H.run(["mkfs.ext4", "-q", "-F", raw])
        dev = H.run(["losetup", "-f", "--show", raw]).out.strip()
        loops.append(dev)
        fsdir = os.path.join(work, "fs")
        os.makedirs(fsdir)
        H.run(["mount", dev, fsdir])
        mounted.append(fsdir)
        H.run(["cp", "-a", TREE + "/.", fsdir + "/"])
        probs = tree_diff(TREE, fsdir)
        T.check("copy into the ext4 image is faithful (sanity)", not probs, probs[:3])
        cleanup_loops()
        H.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, os.path.join(SRC, "fs.qcow2"))
        H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, os.path.join(SRC, "fsc.qcow2"))
        H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                   "compression_type=zstd,cluster_size=4k", raw, os.path.join(SRC, "fsz.qcow2"))
        raw_sha = H.sha256_file(raw)

    with H.Mount(SRC) as m:
        for name in ("fs", "fsc", "fsz"):
            with T.step("loop mount %s.raw" % name):
                view = m.path(name + ".raw")
                T.check("%s.raw: same sha256 as the raw ext4 image" % name,
                        H.sha256_file(view) == raw_sha)
                dev = H.run(["losetup", "-r", "-f", "--show", view]).out.strip()
                loops.append(dev)
                fsck = H.run(["e2fsck", "-fn", dev], check=False)
                T.check("%s.raw: e2fsck -fn clean" % name, fsck.returncode == 0,
                        "exit %d: %s" % (fsck.returncode, (fsck.out + fsck.err)[-400:]))
                d = os.path.join(work, "ro-" + name)
                os.makedirs(d)
                H.run(["mount", "-o", "ro", dev, d])
                mounted.append(d)
                probs = tree_diff(TREE, d)
                T.check("%s.raw: tree read through the loop device equals the original" % name,
                        not probs, "; ".join(probs[:4]))
                H.run(["umount", d])
                mounted.remove(d)
                H.run(["losetup", "-d", dev])
                loops.remove(dev)
        # the loop devices may hold the file a moment after losetup -d (autoclear); Mount.__exit__
        # retries fusermount3 -u while busy
except H.MountError as e:
    T.check("mount/unmount", False, str(e))
finally:
    cleanup_loops()

T.finish()
