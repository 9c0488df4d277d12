#!/usr/bin/env python3
"""A root mount with allow_other over a directory others can write (mode 1777) gives no user more
than the host does. An unprivileged user made for the test tries what an attacker would: swap an
image for a symlink after the scan and chmod/chown/touch/open it, plant images whose backing or
data file is a decoy outside the directory (absolute, ../, symlinked file and directory), an
overlay on an image the user cannot read, a symlink to an image in a directory the user cannot
enter, FIFOs, devices and the mount's own files as image, backing or data file. Every attempt
must fail quickly with the decoy unread and unchanged (content, mode, owner, atime), the daemon
alive, the good image fine and the unmount clean; -o allow_dir lets the intended files through."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import trusthelp as TH  # noqa: E402

MiB = H.MiB
T = H.TestRun("trust", deadline=420)

work = H.tempdir("trust")
os.chmod(work, 0o755)
SRC = os.path.join(work, "src")
OUT = os.path.join(work, "outside")
SCRATCH = os.path.join(work, "scratch")
PRIVATE = os.path.join(work, "private")
for d, mode in ((SRC, 0o1777), (OUT, 0o755), (SCRATCH, 0o755), (PRIVATE, 0o700)):
    os.makedirs(d)
    os.chmod(d, mode)
MNT_PARENT = H.tempdir("trustmnt")
os.chmod(MNT_PARENT, 0o755)
MNT = os.path.join(MNT_PARENT, "mnt")
os.makedirs(MNT)

SECRET = b"TOP-SECRET-" * 6000


def S(name):
    return os.path.join(SRC, name)


def give(path):
    os.lchown(path, UID, GID)


# ---- decoys and images --------------------------------------------------------------------------
decoys = {}


@T.fixture
def make_decoys():
    """The unprivileged user (UID, GID) and the files they must not reach."""
    global secret_img, UID, GID
    UID, GID = TH.make_user("trust")
    decoys["raw"] = TH.Decoy(os.path.join(OUT, "decoy.raw"), SECRET + b"\0" * (MiB - len(SECRET)))
    decoys["data"] = TH.Decoy(os.path.join(OUT, "dd.raw"), b"D" * MiB)
    # A root-only image elsewhere (what a swapped symlink would point at).
    secret_img = os.path.join(OUT, "secret.qcow2")
    H.create(secret_img, 1 * MiB)
    H.qemu_io(secret_img, "write -P 0x5e 0 1M")
    os.chmod(secret_img, 0o600)
    decoys["secret_img"] = TH.Decoy.__new__(TH.Decoy)
    decoys["secret_img"].path = secret_img
    decoys["secret_img"].before = decoys["secret_img"].state()


@T.fixture
def images():
    global planted_backing, rootimg
    make_decoys()
    good = S("good.qcow2")
    H.create(good, 2 * MiB)
    H.qemu_io(good, "write -P 0x11 0 1M")
    os.chmod(good, 0o644)
    H.to_raw(good, os.path.join(work, "good.ref"))

    # The user's own image, to be swapped after the scan.
    H.create(S("x.qcow2"), 1 * MiB)
    give(S("x.qcow2"))
    os.chmod(S("x.qcow2"), 0o644)
    H.create(S("y.qcow2"), 1 * MiB)
    give(S("y.qcow2"))
    os.chmod(S("y.qcow2"), 0o644)
    H.create(S("f.qcow2"), 1 * MiB)
    give(S("f.qcow2"))
    os.chmod(S("f.qcow2"), 0o644)

    # Planted backing files: absolute, ../, a symlinked file, a symlinked directory.
    os.symlink(decoys["raw"].path, S("link_decoy"))
    os.lchown(S("link_decoy"), UID, GID)
    os.symlink(OUT, S("linkdir"))
    os.lchown(S("linkdir"), UID, GID)
    planted_backing = {
        "p_abs": decoys["raw"].path,
        "p_dotdot": "../outside/decoy.raw",
        "p_linkfile": "link_decoy",
        "p_linkdir": "linkdir/decoy.raw",
    }
    for name, backing in planted_backing.items():
        H.qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", S(name + ".qcow2"), str(MiB))
        give(S(name + ".qcow2"))
        os.chmod(S(name + ".qcow2"), 0o644)

    # Planted external data files: made with a scratch data file (qemu-img create truncates the
    # data file!), then renamed in the header to the decoy.
    scratch = os.path.join(SCRATCH, "dd.raw")
    for name, target in (("d_abs", decoys["data"].path), ("d_linkdir", "linkdir/dd.raw")):
        H.create(S(name + ".qcow2"), MiB, "data_file=%s,data_file_raw=on" % scratch)
        TH.set_data_file_name(S(name + ".qcow2"), target)
        give(S(name + ".qcow2"))
        os.chmod(S(name + ".qcow2"), 0o644)

    # root's 0600 image in the shared directory, and the user's overlay on it.
    rootimg = S("rootimg.qcow2")
    H.create(rootimg, MiB)
    H.qemu_io(rootimg, "write -P 0x5e 0 1M")
    os.chmod(rootimg, 0o600)
    H.qemu_img("create", "-f", "qcow2", "-u", "-b", "rootimg.qcow2", "-F", "qcow2", S("ov.qcow2"), str(MiB))
    give(S("ov.qcow2"))
    os.chmod(S("ov.qcow2"), 0o644)
    H.to_raw(S("ov.qcow2"), os.path.join(work, "ov.ref"))
    # root's image inside the shared directory: the scan reads its header without touching its
    # access time, and no user's request may make qcowfs read it.
    decoys["rootimg"] = TH.Decoy.__new__(TH.Decoy)
    decoys["rootimg"].path = rootimg
    os.utime(rootimg, ns=(1_000_000_000 * 10**9, os.stat(rootimg).st_mtime_ns))
    decoys["rootimg"].before = decoys["rootimg"].state()

    # A 0644 image inside a 0700 directory, reached through the user's symlink.
    pub = os.path.join(PRIVATE, "pub.qcow2")
    H.create(pub, MiB)
    H.qemu_io(pub, "write -P 0x5e 0 1M")
    os.chmod(pub, 0o644)
    os.symlink(pub, S("lnk.qcow2"))
    os.lchown(S("lnk.qcow2"), UID, GID)
    os.symlink(pub, S("rootlnk.qcow2"))  # root's own symlink to the same image

    # Special files as backing and data file, inside the directory.
    os.mkfifo(S("fifo"))
    os.mknod(S("nulldev"), 0o666 | 0o020000, os.makedev(1, 3))
    for name, backing in (("b_fifo", "fifo"), ("b_dev", "nulldev")):
        H.qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", S(name + ".qcow2"), str(MiB))
        os.chmod(S(name + ".qcow2"), 0o644)
    for name, target in (("d_fifo", "fifo"), ("d_dev", "nulldev")):
        H.create(S(name + ".qcow2"), MiB, "data_file=%s,data_file_raw=on" % scratch)
        TH.set_data_file_name(S(name + ".qcow2"), target)
        os.chmod(S(name + ".qcow2"), 0o644)


def decoys_untouched(label):
    for key, d in decoys.items():
        ch = d.changes()
        T.check("%s: decoy %s unread and unchanged" % (label, key), not ch, ch)


def refused(res):
    return not res.get("ok") and res.get("errno") not in (None, "timeout") and \
        not str(res.get("errno")).startswith("child failed")


def good_still_fine(m, label):
    T.check("%s: daemon alive" % label, m.alive())
    T.check_compare("%s: good image reads correctly" % label, m.path("good.raw"), os.path.join(work, "good.ref"),
                    nreads=20)


def user_reads(m, name, byte, what, size=""):
    """Checks that the unprivileged user reads `name` and that it starts with 16 bytes `byte`."""
    res = TH.as_user(UID, GID, "read", m.path(name), str(size))
    T.check("%s (%s)" % (what, res.get("errno")), res.get("ok") and res.get("data_head") == "%02x" % byte * 16, res)


def user_refused(m, name, what):
    """Checks that the unprivileged user's read of `name` is refused with EACCES."""
    res = TH.as_user(UID, GID, "read", m.path(name))
    T.check("%s (%s)" % (what, res.get("errno")), refused(res) and res.get("errno") == "EACCES", res)


def wait_visible(m, name):
    ok, _ = H.wait_for(lambda: os.path.exists(m.path(name)), timeout=5)
    return ok


# ---- the default mount: allow_other, nothing allowed outside SRC --------------------------------


@T.test
def test_default_mount():
    images()
    with H.Mount(SRC, mnt=MNT, args=["-o", "allow_other"]) as m:
        T.check("user sees the listing", "good.raw" in TH.as_user(UID, GID, "list", MNT).get("names", []))

        # Symlink swapped after the scan, then chmod / chgrp / touch / open on the exposed file.
        for name, op, arg, target in (("x", "chmod", "666", decoys["raw"].path),
                                      ("y", "touch", "", decoys["raw"].path),
                                      ("f", "read", "", secret_img)):
            T.check("%s.raw visible to the user" % name, wait_visible(m, name + ".raw"))
            # The kernel knows the file as the user's own (its scanned attributes): the request
            # reaches qcowfs, which must notice the swap.
            st = TH.as_user(UID, GID, "stat", m.path(name + ".raw"))
            T.check("%s.raw stat works" % name, st.get("ok"), st)
            sw = TH.as_user(UID, GID, "symlink_swap", S(name + ".qcow2"), target)
            T.check("%s.qcow2 swapped for a symlink" % name, sw.get("ok"), sw)
            res = TH.as_user(UID, GID, op, m.path(name + ".raw"), arg)
            T.check("swap then %s is refused" % op, refused(res), res)
            if op == "read":
                T.check("swap then read returns no secret", "sha" not in res, res)
        res = TH.as_user(UID, GID, "chgrp", m.path("good.raw"), str(GID))
        T.check("chgrp of root's image by the user is refused", refused(res), res)
        decoys_untouched("after symlink swaps")

        # Planted backing and data files: refused for the user, and for root too (policy).
        for name in list(planted_backing) + ["d_abs", "d_linkdir"]:
            res = TH.as_user(UID, GID, "read", m.path(name + ".raw"))
            T.check("user read of %s refused (%s)" % (name, res.get("errno")), refused(res), res)
            res = TH.as_root("read", m.path(name + ".raw"))
            T.check("root read of %s refused: outside SRC (%s)" % (name, res.get("errno")),
                    refused(res) and res.get("errno") == "EACCES", res)
        for name in ("d_abs", "d_linkdir", "p_abs"):
            res = TH.as_user(UID, GID, "write", m.path(name + ".raw"), "ee")
            T.check("user write of %s refused" % name, refused(res), res)
        decoys_untouched("after planted files")
        log = m.log_text()
        T.check("log names the planted path", "decoy.raw" in log and "allow_dir" in log, log[-1500:])

        # An overlay on an image the user cannot read; a symlink into a directory they cannot enter.
        res = TH.as_user(UID, GID, "read", m.path("ov.raw"))
        T.check("user read of an overlay on root's 0600 image refused", refused(res), res)
        decoys_untouched("after the overlay attempt")
        fd = os.open(m.path("ov.raw"), os.O_RDONLY)  # root has it open: the chain is open
        try:
            T.check_compare("root reads the overlay", m.path("ov.raw"), os.path.join(work, "ov.ref"), nreads=10)
            res = TH.as_user(UID, GID, "read", m.path("ov.raw"))
            T.check("user still refused while root has the overlay open", refused(res), res)
        finally:
            os.close(fd)
        os.utime(rootimg, ns=(decoys["rootimg"].before["atime"], decoys["rootimg"].before["mtime"]))
        decoys["rootimg"].before = decoys["rootimg"].state()
        # The user's symlink is followed with the user's rights: it shows nothing.
        T.check("rootlnk.raw is listed", wait_visible(m, "rootlnk.raw"))
        T.check("the user's symlink into a 0700 directory is not listed", not os.path.exists(m.path("lnk.raw")))
        res = TH.as_user(UID, GID, "read", m.path("lnk.raw"))
        T.check("user read through their symlink into a 0700 directory refused", refused(res), res)
        res = TH.as_user(UID, GID, "read", m.path("rootlnk.raw"))
        T.check("user read through root's symlink into a 0700 directory refused", refused(res), res)
        res = TH.as_root("read", m.path("rootlnk.raw"))
        T.check("root reads through root's symlink", res.get("ok"), res)

        # FIFOs and devices as backing and data file, and an image swapped for a FIFO.
        for name in ("b_fifo", "b_dev", "d_fifo", "d_dev"):
            t0 = time.monotonic()
            res = TH.as_root("read", m.path(name + ".raw"))
            took = time.monotonic() - t0
            T.check("%s: refused without blocking (%s in %.1fs)" % (name, res.get("errno"), took),
                    refused(res) and res.get("errno") == "EACCES" and took < 5, res)
        H.create(S("q.qcow2"), MiB)
        give(S("q.qcow2"))
        os.chmod(S("q.qcow2"), 0o644)
        T.check("q.raw visible", wait_visible(m, "q.raw"))
        TH.as_user(UID, GID, "stat", m.path("q.raw"))
        sw = TH.as_user(UID, GID, "fifo_swap", S("q.qcow2"))
        T.check("q.qcow2 swapped for a FIFO", sw.get("ok"), sw)
        res = TH.as_user(UID, GID, "read", m.path("q.raw"))
        T.check("open of an image swapped for a FIFO fails fast (%s)" % res.get("errno"), refused(res), res)
        # An image renamed on the host while root holds it open: the user's access is checked
        # where the image is now, not where it was opened (that path is gone).
        H.create(S("mv1.qcow2"), MiB)
        H.qemu_io(S("mv1.qcow2"), "write -P 0x4d 0 64k")
        os.chmod(S("mv1.qcow2"), 0o644)
        T.check("mv1.raw visible", wait_visible(m, "mv1.raw"))
        fd = os.open(m.path("mv1.raw"), os.O_RDONLY)
        try:
            os.rename(S("mv1.qcow2"), S("mv2.qcow2"))
            user_reads(m, "mv2.raw", 0x4d, "user reads an open image renamed on the host")
            os.rename(S("mv2.qcow2"), S("mv3.qcow2"))
            user_reads(m, "mv2.raw", 0x4d, "user reads it by the name the view had a moment ago")
            os.chmod(S("mv3.qcow2"), 0o600)
            user_refused(m, "mv3.raw", "and is refused once its mode says so")
        finally:
            os.close(fd)
        # The same with a directory holding an overlay and its backing file: renamed while root
        # holds the overlay open, the backing file went along.
        os.makedirs(S("chain"))
        H.create(S("chain/cbase.qcow2"), MiB)
        H.qemu_io(S("chain/cbase.qcow2"), "write -P 0x4e 0 64k")
        H.qemu_img("create", "-f", "qcow2", "-b", "cbase.qcow2", "-F", "qcow2", S("chain/cov.qcow2"))
        H.qemu_io(S("chain/cov.qcow2"), "write -P 0x4f 64k 64k")
        for name in ("cbase.qcow2", "cov.qcow2"):
            os.chmod(S("chain/" + name), 0o644)
        T.check("chain/cov.raw visible", wait_visible(m, "chain/cov.raw"))
        fd = os.open(m.path("chain/cov.raw"), os.O_RDONLY)
        try:
            os.rename(S("chain"), S("chain2"))
            user_reads(m, "chain2/cov.raw", 0x4e, "user reads an open overlay whose directory was renamed",
                       size=128 * 1024)
            os.chmod(S("chain2/cbase.qcow2"), 0o600)
            user_refused(m, "chain2/cov.raw", "and is refused once the backing file's mode says so")
        finally:
            os.close(fd)
        good_still_fine(m, "default mount")
    T.check("default mount: unmounted cleanly", True)


# ---- allow_dir=/: only the regular-file and own-mount rules remain --------------------------------


@T.fixture
def own_mount_backings():
    """Images whose backing file is the mount's own file, /dev/zero, or a loop of them."""
    own = S("own.qcow2")
    H.qemu_img("create", "-f", "qcow2", "-u", "-b", os.path.join(MNT, "good.raw"), "-F", "raw", own, str(MiB))
    inner = S("inner.qcow2")  # the mount point lies inside SRC here
    H.qemu_img("create", "-f", "qcow2", "-u", "-b", "mnt_in/good.raw", "-F", "raw", inner, str(MiB))
    H.qemu_img("create", "-f", "qcow2", "-u", "-b", "/dev/zero", "-F", "raw", S("zero.qcow2"), str(MiB))
    H.qemu_img("create", "-f", "qcow2", "-u", "-b", "own.qcow2", "-F", "qcow2", S("self.qcow2"), str(MiB))


@T.test
def test_allow_dir_root():
    images()
    own_mount_backings()
    with H.Mount(SRC, mnt=MNT, args=["-o", "allow_other,allow_dir=/"]) as m:
        for name in ("own", "zero"):
            t0 = time.monotonic()
            res = TH.as_root("read", m.path(name + ".raw"))
            took = time.monotonic() - t0
            T.check("%s.raw refused without blocking (%s, %.1fs)" % (name, res.get("errno"), took),
                    refused(res) and took < 5, res)
        good_still_fine(m, "allow_dir=/")
        # The planted raw backing file is now allowed for root, still not for the user.
        res = TH.as_root("read", m.path("p_abs.raw"))
        T.check("allow_dir=/: root reads p_abs", res.get("ok") and res.get("data_head", "").startswith(SECRET[:8].hex()), res)
        res = TH.as_user(UID, GID, "read", m.path("p_abs.raw"))
        T.check("allow_dir=/: the user still may not read root's 0600 backing file", refused(res), res)
    T.check("allow_dir=/ mount: unmounted cleanly", True)
    os.utime(decoys["raw"].path, ns=(decoys["raw"].before["atime"], decoys["raw"].before["mtime"]))
    decoys["raw"].before = decoys["raw"].state()


@T.test
def test_mount_point_inside_src():
    images()
    own_mount_backings()
    mnt_in = S("mnt_in")
    os.makedirs(mnt_in)
    with H.Mount(SRC, mnt=mnt_in, args=["-o", "allow_other"]) as m:
        t0 = time.monotonic()
        res = TH.as_root("read", m.path("inner.raw"))
        took = time.monotonic() - t0
        T.check("backing file on the own mount refused without blocking (%s, %.1fs)" % (res.get("errno"), took),
                refused(res) and took < 5, res)
        for name in ("b_fifo", "d_fifo"):
            TH.as_root("read", m.path(name + ".raw"))
        good_still_fine(m, "mount point inside SRC")
        # After all that, SIGTERM still ends the daemon: unmounted, exit 0.
        m.proc.send_signal(15)
        try:
            code = m.proc.wait(timeout=20)
        except Exception:
            code = None
        T.check("SIGTERM ends the daemon (exit 0) and unmounts", code == 0 and not H.is_mounted(mnt_in),
                "exit %s, mounted %s" % (code, H.is_mounted(mnt_in)))


# ---- allow_dir lets the intended files through --------------------------------------------------


@T.test
def test_allow_dir_out():
    images()
    shared = TH.Decoy(os.path.join(OUT, "shared.raw"), b"S" * MiB, mode=0o644)
    H.qemu_img("create", "-f", "qcow2", "-u", "-b", shared.path, "-F", "raw", S("sh.qcow2"), str(MiB))
    give(S("sh.qcow2"))
    os.chmod(S("sh.qcow2"), 0o644)
    with H.Mount(SRC, mnt=MNT, args=["-o", "allow_other,allow_dir=%s" % OUT]) as m:
        res = TH.as_user(UID, GID, "read", m.path("sh.raw"))
        T.check("allowed 0644 backing file reads for the user", res.get("ok") and
                res.get("data_head") == (b"S" * 16).hex(), res)
        res = TH.as_user(UID, GID, "read", m.path("p_abs.raw"))
        T.check("allowed dir, but the user cannot read the 0600 decoy: refused", refused(res), res)
        res = TH.as_root("read", m.path("p_linkdir.raw"))
        T.check("allowed dir through a symlinked directory: root reads", res.get("ok"), res)
        good_still_fine(m, "allow_dir=OUT")
    os.utime(decoys["raw"].path, ns=(decoys["raw"].before["atime"], decoys["raw"].before["mtime"]))
    decoys["raw"].before = decoys["raw"].state()
    decoys_untouched("after all mounts")


T.run()
