#!/usr/bin/env python3
"""End to end through a loop device: MNT/NAME.raw attached with losetup, `mkfs.ext4`, mounted, a
directory tree copied in (a few thousand files of /usr/share/doc plus some large random files),
`sync`, `umount`, `losetup -d`, qcowfs unmounted; then `qemu-img check` must be clean, and the
image converted by `qemu-img convert -O raw` and mounted read-only must hold the same tree
(every path, mode, size and sha256) and pass `e2fsck -fn`.

Two more variants start from an ext4 file system that already holds files: one whose image is
zstd-compressed (mounted with -o write_cache=0), one an overlay over a backing file (attached
with --direct-io=on). Through the
loop device some files are deleted, one is appended to, and a second tree is copied in; the
backing file must not change."""

import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_loop", deadline=600)


def skip(reason):
    print("SKIP: %s" % reason, flush=True)
    H._cleanup()
    sys.exit(H.SKIP)


for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
    if shutil.which(tool) is None:
        skip("%s missing" % tool)
if not os.path.exists("/dev/loop-control"):
    skip("no /dev/loop-control")

work = H.tempdir("wloop")
probe = os.path.join(work, "probe.img")
with open(probe, "wb") as f:
    f.truncate(1 * MiB)
p = subprocess.run(["losetup", "-f", "--show", probe], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
if p.returncode != 0:
    skip("losetup not possible: %s" % p.stderr.decode().strip())
subprocess.run(["losetup", "-d", p.stdout.decode().strip()])
os.unlink(probe)

loops = []    # attached loop devices
mounted = []  # block-device mounts


def cleanup_loops():
    for d in reversed(mounted):
        subprocess.run(["umount", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if H.is_mounted(d):
            subprocess.run(["umount", "-l", d], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    mounted.clear()
    for dev in reversed(loops):
        subprocess.run(["losetup", "-d", dev], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    loops.clear()


def attach(path, ro=False, direct=False):
    cmd = ["losetup", "-f", "--show"] + (["-r"] if ro else []) + (
        ["--direct-io=on"] if direct else []) + [path]
    dev = H.run(cmd).out.strip()
    loops.append(dev)
    return dev


def detach(dev):
    H.run(["losetup", "-d", dev])
    loops.remove(dev)


def mount_dev(dev, d, ro=False):
    os.makedirs(d, exist_ok=True)
    H.run(["mount"] + (["-o", "ro"] if ro else []) + [dev, d])
    mounted.append(d)
    return d


def umount(d):
    H.run(["umount", d], timeout=300)
    mounted.remove(d)


# ---- the trees -----------------------------------------------------------------------------


def doc_subset(dest, skip_files, max_files, max_bytes):
    """Copies the first files of /usr/share/doc (sorted walk, symlinks kept) into dest until
    max_files or max_bytes; returns (files, bytes)."""
    nfiles = nbytes = 0
    seen = 0
    for root, dirs, files in os.walk("/usr/share/doc"):
        dirs.sort()
        for f in sorted(files):
            sp = os.path.join(root, f)
            seen += 1
            if seen <= skip_files:
                continue
            if nfiles >= max_files or nbytes >= max_bytes:
                return nfiles, nbytes
            rel = os.path.relpath(sp, "/usr/share/doc")
            dp = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(dp), exist_ok=True)
            if os.path.islink(sp):
                os.symlink(os.readlink(sp), dp)
            elif os.path.isfile(sp):
                shutil.copy2(sp, dp)
                nbytes += os.path.getsize(dp)
            else:
                continue
            nfiles += 1
    return nfiles, nbytes


def random_files(dest, rnd, sizes):
    os.makedirs(dest, exist_ok=True)
    for i, n in enumerate(sizes):
        with open(os.path.join(dest, "r%02d.bin" % i), "wb") as f:
            f.write(rnd.randbytes(n))


def make_tree(dest, rnd, skip_files, max_files, max_bytes, big, small):
    os.makedirs(dest)
    n, b = doc_subset(os.path.join(dest, "doc"), skip_files, max_files, max_bytes)
    random_files(os.path.join(dest, "random"), rnd,
                 big + [rnd.randrange(1, 300 * KiB) for _ in range(20)] + [0, 1, 4095, 4097])
    for i in range(small):  # many small files in many directories
        sub = os.path.join(dest, "small", "d%02d" % (i // 40))
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "s%03d" % i), "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(0, 9000)))
    os.symlink("random/r00.bin", os.path.join(dest, "link"))
    print("  tree %s: %d doc files (%.1f MB) + %d random files" % (
        os.path.basename(dest), n, b / MiB, len(big) + 24 + small), flush=True)


rnd = random.Random(20261121)
TREE_BIG = os.path.join(work, "tree-big")
TREE_A = os.path.join(work, "tree-a")
TREE_B = os.path.join(work, "tree-b")
SRC = os.path.join(work, "src")
os.makedirs(SRC)
variants = []  # (name, image, expected-tree dir, protected files)

try:
    with T.step("build trees and images"):
        t0 = time.monotonic()
        make_tree(TREE_BIG, rnd, 0, 3000, 36 * MiB, [7 * MiB, 3 * MiB + 12345], 800)
        make_tree(TREE_A, rnd, 3000, 600, 6 * MiB, [2 * MiB + 1], 100)
        make_tree(TREE_B, rnd, 3600, 1200, 12 * MiB, [4 * MiB + 777], 200)

        # variant 1: an empty image; mkfs.ext4 and the big tree go through qcowfs
        H.create(os.path.join(SRC, "empty.qcow2"), 256 * MiB, "cluster_size=64k")
        variants.append(("empty", os.path.join(SRC, "empty.qcow2"), None, []))

        # an ext4 file system holding tree A, made here on a plain raw file
        raw_a = os.path.join(work, "a.raw")
        with open(raw_a, "wb") as f:
            f.truncate(128 * MiB)
        H.run(["mkfs.ext4", "-q", "-F", raw_a])
        dev = attach(raw_a)
        d = mount_dev(dev, os.path.join(work, "mk-a"))
        H.run(["cp", "-a", TREE_A + "/.", d + "/"])
        umount(d)
        detach(dev)

        # variant 2: that file system in a zstd-compressed image (every write to it is a
        # copy-on-write of a compressed cluster)
        H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
                   raw_a, os.path.join(SRC, "zstd.qcow2"))
        variants.append(("zstd", os.path.join(SRC, "zstd.qcow2"), TREE_A, []))

        # variant 3: an overlay over it (the backing file must not change)
        H.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw_a, os.path.join(SRC, "abase.qcow2"))
        H.create(os.path.join(SRC, "overlay.qcow2"), 128 * MiB, backing="abase.qcow2", cwd=SRC)
        variants.append(("overlay", os.path.join(SRC, "overlay.qcow2"), TREE_A,
                         [os.path.join(SRC, "abase.qcow2")]))
        os.unlink(raw_a)
        print("  built in %.1fs" % (time.monotonic() - t0), flush=True)

    def write_through_loop(m, name, start, exp_dir):
        """Attaches MNT/NAME.raw, writes to its ext4 (and the same to exp_dir), detaches."""
        dev = attach(m.path(name + ".raw"), direct=(name == "overlay"))
        with open("/sys/block/%s/ro" % os.path.basename(dev)) as f:
            ro = f.read().strip()
        T.check("%s: loop device attached read-write" % name, ro == "0",
                "losetup fell back to read-only (opening %s.raw for writing failed)" % name)
        d = os.path.join(work, "fs-" + name)
        if start is None:
            r = H.run(["mkfs.ext4", "-q", "-F", dev], check=False, timeout=300)
            T.check("%s: mkfs.ext4 on the loop device" % name, r.returncode == 0,
                    "exit %d: %s" % (r.returncode, (r.out + r.err)[-500:]))
            mount_dev(dev, d)
            H.run(["cp", "-a", TREE_BIG + "/.", d + "/"], timeout=300)
            shutil.copytree(TREE_BIG, exp_dir, symlinks=True)
        else:
            mount_dev(dev, d)
            shutil.copytree(start, exp_dir, symlinks=True)
            # delete some files, append to one, copy a second tree in
            victims = sorted(k for k, v in H.tree_manifest(start).items()
                             if v.startswith("file"))[::7]
            for k in victims:
                os.unlink(os.path.join(d, k))
                os.unlink(os.path.join(exp_dir, k))
            extra = rnd.randbytes(100 * KiB + 3)
            for root in (d, exp_dir):
                with open(os.path.join(root, "random", "r00.bin"), "ab") as f:
                    f.write(extra)
            H.run(["cp", "-a", TREE_B, os.path.join(d, "b")], timeout=300)
            shutil.copytree(TREE_B, os.path.join(exp_dir, "b"), symlinks=True)
        H.run(["sync", "-f", d], timeout=300)
        umount(d)
        detach(dev)

    for name, image, start, protected in variants:
        t0 = time.monotonic()
        hashes = H.hash_files(protected)
        exp_dir = os.path.join(work, "expect-" + name)
        ok = False
        with T.step("%s: write through the loop device" % name):
            # the zstd variant without the data write-back cache: ext4's writes reach the qcow2
            # write path one by one
            with H.Mount(SRC, args=["-o", "write_cache=0"] if name == "zstd" else []) as m:
                try:
                    write_through_loop(m, name, start, exp_dir)
                finally:
                    cleanup_loops()  # before qcowfs unmounts, also when something failed
                T.check("%s: qcowfs still running" % name, m.alive())
            T.check("%s: unmounted; qcowfs exited 0" % name, True)
            ok = True
        print("  %s: written in %.1fs" % (name, time.monotonic() - t0), flush=True)
        cleanup_loops()

        with T.step("%s: after unmount" % name):
            rc, out = H.check_clean(image)
            T.check("%s: qemu-img check exit 0 (no errors, no leaks)" % name, rc == 0,
                    "exit %d: %s" % (rc, H.clip_text(out)))
            dirty, corrupt = H.header_bits(image)
            T.check("%s: dirty and corrupt bits clear" % name, not dirty and not corrupt,
                    "dirty=%s corrupt=%s" % (dirty, corrupt))
            for p, h in hashes.items():
                T.check("%s: backing file %s unchanged" % (name, os.path.basename(p)),
                        H.sha256_file(p) == h)
            if not ok:
                print("  %s: tree not compared (writing failed)" % name, flush=True)
                continue
            conv = os.path.join(work, name + ".converted.raw")
            H.to_raw(image, conv, cwd=SRC)
            fsck = H.run(["e2fsck", "-fn", conv], check=False, timeout=300)
            T.check("%s: e2fsck -fn of the converted image is clean" % name,
                    fsck.returncode == 0, "exit %d: %s" % (fsck.returncode,
                                                           H.clip_text(fsck.out + fsck.err)))
            dev = attach(conv, ro=True)
            d = mount_dev(dev, os.path.join(work, "ro-" + name), ro=True)
            want = H.tree_manifest(exp_dir)
            got = H.tree_manifest(d)
            probs = H.manifest_diff(want, got)
            T.check("%s: the converted image holds the expected tree (%d entries: paths, modes, "
                    "sizes, sha256)" % (name, len(want)), not probs, "; ".join(probs))
            umount(d)
            detach(dev)
            os.unlink(conv)
        print("  (%s: %.1fs)" % (name, time.monotonic() - t0), flush=True)
except H.MountError as e:
    T.check("mount/unmount", False, str(e))
finally:
    cleanup_loops()

T.finish()
