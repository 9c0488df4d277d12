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
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_loop", deadline=600)


work = H.tempdir("wloop")
if not T.args.list:
    H.require_loop_devices(work, ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"))
L = H.LoopDevices()


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


@T.fixture
def trees_and_images():
    """The three trees, and in SRC: empty.qcow2, zstd.qcow2 (an ext4 holding TREE_A) and
    overlay.qcow2 over abase.qcow2 (the same file system)."""
    t0 = time.monotonic()
    make_tree(TREE_BIG, rnd, 0, 3000, 36 * MiB, [7 * MiB, 3 * MiB + 12345], 800)
    make_tree(TREE_A, rnd, 3000, 600, 6 * MiB, [2 * MiB + 1], 100)
    make_tree(TREE_B, rnd, 3600, 1200, 12 * MiB, [4 * MiB + 777], 200)

    # variant 1: an empty image; mkfs.ext4 and the big tree go through qcowfs
    H.create(os.path.join(SRC, "empty.qcow2"), 256 * MiB, "cluster_size=64k")

    # an ext4 file system holding tree A, made here on a plain raw file
    raw_a = os.path.join(work, "a.raw")
    dev, d = L.ext4_with(raw_a, 128 * MiB, TREE_A, os.path.join(work, "mk-a"))
    L.umount(d)
    L.detach(dev)

    # variant 2: that file system in a zstd-compressed image (every write to it is a
    # copy-on-write of a compressed cluster)
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
               raw_a, os.path.join(SRC, "zstd.qcow2"))

    # variant 3: an overlay over it (the backing file must not change)
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw_a, os.path.join(SRC, "abase.qcow2"))
    H.create(os.path.join(SRC, "overlay.qcow2"), 128 * MiB, backing="abase.qcow2", cwd=SRC)
    os.unlink(raw_a)
    print("  built in %.1fs" % (time.monotonic() - t0), flush=True)


def write_through_loop(m, name, start, exp_dir):
    """Attaches MNT/NAME.raw, writes to its ext4 (and the same to exp_dir), detaches."""
    dev = L.attach(m.path(name + ".raw"), direct=(name == "overlay"))
    with open("/sys/block/%s/ro" % os.path.basename(dev)) as f:
        ro = f.read().strip()
    T.check("%s: loop device attached read-write" % name, ro == "0",
            "losetup fell back to read-only (opening %s.raw for writing failed)" % name)
    d = os.path.join(work, "fs-" + name)
    if start is None:
        r = H.run(["mkfs.ext4", "-q", "-F", dev], check=False, timeout=300)
        T.check("%s: mkfs.ext4 on the loop device" % name, r.returncode == 0,
                "exit %d: %s" % (r.returncode, (r.out + r.err)[-500:]))
        L.mount(dev, d)
        H.run(["cp", "-a", TREE_BIG + "/.", d + "/"], timeout=300)
        shutil.copytree(TREE_BIG, exp_dir, symlinks=True)
    else:
        L.mount(dev, d)
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
    L.umount(d)
    L.detach(dev)


def write_variant(name, image, start, protected):
    trees_and_images()
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
                L.cleanup()  # before qcowfs unmounts, also when something failed
            T.check("%s: qcowfs still running" % name, m.alive())
        T.check("%s: unmounted; qcowfs exited 0" % name, True)
        ok = True
    print("  %s: written in %.1fs" % (name, time.monotonic() - t0), flush=True)
    L.cleanup()

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
            return
        conv = os.path.join(work, name + ".converted.raw")
        H.to_raw(image, conv, cwd=SRC)
        fsck = H.run(["e2fsck", "-fn", conv], check=False, timeout=300)
        T.check("%s: e2fsck -fn of the converted image is clean" % name,
                fsck.returncode == 0, "exit %d: %s" % (fsck.returncode,
                                                       H.clip_text(fsck.out + fsck.err)))
        dev = L.attach(conv, ro=True)
        d = L.mount(dev, os.path.join(work, "ro-" + name), ro=True)
        want = H.tree_manifest(exp_dir)
        got = H.tree_manifest(d)
        probs = H.manifest_diff(want, got)
        T.check("%s: the converted image holds the expected tree (%d entries: paths, modes, "
                "sizes, sha256)" % (name, len(want)), not probs, "; ".join(probs))
        L.umount(d)
        L.detach(dev)
        os.unlink(conv)
    print("  (%s: %.1fs)" % (name, time.monotonic() - t0), flush=True)


for variant in (("empty", os.path.join(SRC, "empty.qcow2"), None, []),
                ("zstd", os.path.join(SRC, "zstd.qcow2"), TREE_A, []),
                ("overlay", os.path.join(SRC, "overlay.qcow2"), TREE_A,
                 [os.path.join(SRC, "abase.qcow2")])):
    T.add_test("test_" + variant[0], write_variant, *variant)
T.at_end(L.cleanup)

T.run()
