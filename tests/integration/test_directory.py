#!/usr/bin/env python3
"""The directory view: names, subdirectories, attributes, snapshot names, images appearing and
disappearing while mounted, open files surviving renames, du/ls, no namespace changes."""

import errno
import os
import shutil
import stat
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("directory", deadline=300)

work = H.tempdir("dir")
SRC = os.path.join(work, "src")
REF = os.path.join(work, "ref")
STAGE = os.path.join(work, "stage")  # outside SRC: images are built here and renamed in
for d in (SRC, REF, STAGE):
    os.makedirs(d)


def S(*p):
    return os.path.join(SRC, *p)


def make(path, size=2 * MiB, pattern=0x42, opts=None):
    H.create(path, size, opts)
    H.qemu_io(path, "write -P 0x%02x 0 64k" % pattern, "write -P 0x%02x 1M 100k" % (pattern ^ 0xff))
    return path


def ref_of(path, snapshot=None):
    out = os.path.join(REF, "%s%s.raw" % (os.path.basename(path), "@" + snapshot if snapshot else ""))
    if not os.path.exists(out):
        H.to_raw(path, out, snapshot=snapshot)
    return out


@T.fixture
def source_tree():
    make(S("vm1.qcow2"), pattern=0x11)
    make(S("a.qcow"), pattern=0x12)
    make(S("disk.img"), pattern=0x13)              # qcow2 found by magic, any name
    make(S("noext"), pattern=0x14)
    with open(S("notes.txt"), "w") as f:            # not qcow2: hidden
        f.write("hello\n")
    with open(S("fake.qcow2"), "wb") as f:          # .qcow2 name but not qcow2: hidden
        f.write(b"QFI" + b"\x00" * 4096)
    open(S("empty.qcow2"), "wb").close()            # empty file: hidden
    H.qemu_img("create", "-f", "raw", S("plain.raw.img"), "1M")  # raw image: hidden
    os.makedirs(S("sub", "deeper"))
    os.makedirs(S("emptydir"))
    os.makedirs(S("sub", "emptytoo"))
    make(S("sub", "x.qcow2"), pattern=0x15)
    make(S("sub", "deeper", "y.qcow2"), pattern=0x16, size=3 * MiB)
    # name clash: a.qcow2 beside a.qcow keeps the full name for one of them
    os.makedirs(S("clash"))
    make(S("clash", "b.qcow2"), pattern=0x17)
    make(S("clash", "b.qcow"), pattern=0x18)
    # attributes
    make(S("attrs.qcow2"), pattern=0x19, size=5 * MiB)
    os.chown(S("attrs.qcow2"), 1234, 5678)
    os.chmod(S("attrs.qcow2"), 0o664)
    os.utime(S("attrs.qcow2"), ns=(1500000000_123456789, 1600000000_987654321))
    make(S("mode600.qcow2"), pattern=0x1a)
    os.chmod(S("mode600.qcow2"), 0o600)
    make(S("mode755.qcow2"), pattern=0x1b)
    os.chmod(S("mode755.qcow2"), 0o755)
    # a sparse one for st_blocks / du
    H.create(S("sparse.qcow2"), "100G")
    H.qemu_io(S("sparse.qcow2"), "write -P 0x55 50G 1M")
    # data file
    H.create(S("withdata.qcow2"), 4 * MiB, "data_file=%s" % S("withdata.bin"))
    H.qemu_io(S("withdata.qcow2"), "write -P 0x66 0 3M")
    # snapshots
    make(S("snaps.qcow2"), pattern=0x21, size=4 * MiB)
    H.qemu_img("snapshot", "-c", "first", S("snaps.qcow2"))
    H.qemu_io(S("snaps.qcow2"), "write -P 0x22 0 2M")
    H.qemu_img("snapshot", "-c", "second", S("snaps.qcow2"))
    H.qemu_io(S("snaps.qcow2"), "write -P 0x23 3M 64k")
    make(S("sub", "snapsub.qcow2"), pattern=0x24)
    H.qemu_img("snapshot", "-c", "only", S("sub", "snapsub.qcow2"))

expected_root = sorted([
    "vm1.raw", "a.raw", "disk.img.raw", "noext.raw", "sub", "emptydir", "clash", "attrs.raw",
    "mode600.raw", "mode755.raw", "sparse.raw", "withdata.raw", "snaps.raw", "snaps@first.raw",
    "snaps@second.raw"])


@T.fixture
def mounted():
    source_tree()
    with H.Mount(SRC) as m:
        yield m
        T.check("qcowfs still running", m.alive())
        time.sleep(0.2)


@T.test
def test_names():
    m = mounted()
    M = m.path
    root = H.listdir_safe(m.mnt)
    T.check("root listing is exactly the images, snapshots and subdirectories",
            root == expected_root, "got %s, expected %s" % (root, expected_root))
    for hidden in ("notes.txt", "fake.raw", "fake.qcow2", "empty.raw", "plain.raw.img.raw",
                   "notes.txt.raw"):
        T.check("non-qcow2 %s hidden" % hidden, hidden not in root)
    T.check("sub mirrored", H.listdir_safe(M("sub")) == sorted(
        ["x.raw", "deeper", "emptytoo", "snapsub.raw", "snapsub@only.raw"]),
        H.listdir_safe(M("sub")))
    T.check("sub/deeper mirrored", H.listdir_safe(M("sub", "deeper")) == ["y.raw"],
            H.listdir_safe(M("sub", "deeper")))
    T.check("empty directories mirrored",
            H.listdir_safe(M("emptydir")) == [] and H.listdir_safe(M("sub", "emptytoo")) == [],
            "%s %s" % (H.listdir_safe(M("emptydir")), H.listdir_safe(M("sub", "emptytoo"))))
    T.check("directories are directories",
            all(stat.S_ISDIR(os.stat(M(p)).st_mode) for p in ("sub", "emptydir", "sub/deeper")))
    cl = H.listdir_safe(M("clash"))
    T.check("clash b.qcow2 + b.qcow -> b.raw + b.qcow.raw", cl == ["b.qcow.raw", "b.raw"], cl)
    # contents of the clashing pair, whichever naming was chosen
    full = [n for n in cl if n in ("b.qcow.raw", "b.qcow2.raw")]
    if len(full) == 1 and "b.raw" in cl:
        other = "b.qcow2" if full[0] == "b.qcow.raw" else "b.qcow"
        T.check_compare("clash/%s shows clash/%s" % (full[0], full[0][:-4]),
                        M("clash", full[0]), ref_of(S("clash", full[0][:-4])), nreads=20)
        T.check_compare("clash/b.raw shows clash/%s" % other, M("clash", "b.raw"),
                        ref_of(S("clash", other)), nreads=20)
    T.check("missing name gives ENOENT", not os.path.exists(M("nope.raw")))
    try:
        os.stat(M("vm1.qcow2"))
        T.check("the image's own name is not exposed", False, "vm1.qcow2 exists")
    except FileNotFoundError:
        T.check("the image's own name is not exposed", True)

# ---- contents by name -----------------------------------------------------------


@T.test
def test_contents():
    m = mounted()
    M = m.path
    for view, image in (("vm1.raw", "vm1.qcow2"), ("a.raw", "a.qcow"),
                        ("disk.img.raw", "disk.img"), ("noext.raw", "noext"),
                        ("sub/x.raw", "sub/x.qcow2"), ("sub/deeper/y.raw", "sub/deeper/y.qcow2"),
                        ("withdata.raw", "withdata.qcow2")):
        T.check_compare("%s shows %s" % (view, image), M(view), ref_of(S(image)), nreads=40)

# ---- attributes -----------------------------------------------------------------


@T.test
def test_attributes():
    m = mounted()
    M = m.path
    st = os.stat(M("attrs.raw"))
    hs = os.stat(S("attrs.qcow2"))
    T.check("attrs: regular file", stat.S_ISREG(st.st_mode), oct(st.st_mode))
    T.check("attrs: st_size = virtual size 5 MiB", st.st_size == 5 * MiB, st.st_size)
    T.check("attrs: uid/gid follow the image (1234/5678)",
            (st.st_uid, st.st_gid) == (1234, 5678), (st.st_uid, st.st_gid))
    T.check("attrs: mode 0664 follows the image", stat.S_IMODE(st.st_mode) == 0o664, oct(st.st_mode))
    T.check("attrs: mtime follows the image", int(st.st_mtime) == int(hs.st_mtime),
            "%s vs %s" % (st.st_mtime, hs.st_mtime))
    T.check("attrs: mtime nanoseconds follow the image",
            st.st_mtime_ns == hs.st_mtime_ns, "%d vs %d" % (st.st_mtime_ns, hs.st_mtime_ns))
    T.check("attrs: st_blocks = image's st_blocks", st.st_blocks == hs.st_blocks,
            "%d vs %d" % (st.st_blocks, hs.st_blocks))
    for name, want in (("mode600", 0o600), ("mode755", 0o755), ("vm1", 0o644)):
        mode = stat.S_IMODE(os.stat(M(name + ".raw")).st_mode)
        T.check("%s: mode %o (the image's, write bits included)" % (name, want), mode == want, oct(mode))
    st = os.stat(M("sparse.raw"))
    hs = os.stat(S("sparse.qcow2"))
    T.check("sparse: st_size 100G", st.st_size == 100 * 1024 ** 3, st.st_size)
    T.check("sparse: st_blocks = image's", st.st_blocks == hs.st_blocks,
            "%d vs %d" % (st.st_blocks, hs.st_blocks))
    st = os.stat(M("withdata.raw"))
    a = os.stat(S("withdata.qcow2")).st_blocks
    b = os.stat(S("withdata.bin")).st_blocks
    T.check("data file image: st_blocks = image (+ data file)", st.st_blocks in (a, a + b),
            "%d, image %d, data file %d" % (st.st_blocks, a, b))

# ---- snapshots ------------------------------------------------------------------


@T.test
def test_snapshots():
    m = mounted()
    M = m.path
    for snap in ("first", "second"):
        v = M("snaps@%s.raw" % snap)
        st = os.stat(v)
        T.check("snaps@%s.raw read-only" % snap, stat.S_IMODE(st.st_mode) & 0o222 == 0,
                oct(st.st_mode))
        T.check_compare("snaps@%s.raw = qemu-img convert -l snapshot.name=%s" % (snap, snap),
                        v, ref_of(S("snaps.qcow2"), snap), nreads=40)
    T.check_compare("snaps.raw = current state", M("snaps.raw"), ref_of(S("snaps.qcow2")),
                    nreads=40)
    T.check_compare("sub/snapsub@only.raw", M("sub", "snapsub@only.raw"),
                    ref_of(S("sub", "snapsub.qcow2"), "only"), nreads=40)

# ---- ls, du ---------------------------------------------------------------------


@T.test
def test_ls_du():
    m = mounted()
    M = m.path
    p = H.run(["ls", "-lR", m.mnt])
    T.check("ls -lR works and lists names", "vm1.raw" in p.out and "y.raw" in p.out, p.out[:300])
    du_v = H.run(["du", "-k", M("sparse.raw")]).out.split()[0]
    du_i = H.run(["du", "-k", S("sparse.qcow2")]).out.split()[0]
    T.check("du shows the real use of the 100G sparse image (%s KiB)" % du_i, du_v == du_i,
            "du view %s KiB, image %s KiB" % (du_v, du_i))
    du_a = H.run(["du", "-b", "--apparent-size", M("sparse.raw")]).out.split()[0]
    T.check("du --apparent-size = virtual size", du_a == str(100 * 1024 ** 3), du_a)
    H.run(["du", "-sk", m.mnt])

# ---- the namespace is fixed (writing the disks is test_write_*'s business) -------


@T.test
def test_no_namespace_changes():
    m = mounted()
    M = m.path
    for what, fn in (
            ("create a file", lambda: os.close(os.open(M("new.raw"), os.O_CREAT | os.O_WRONLY, 0o644))),
            ("mkdir", lambda: os.mkdir(M("newdir"))),
            ("unlink", lambda: os.unlink(M("vm1.raw"))),
            ("rename", lambda: os.rename(M("vm1.raw"), M("vm2.raw")))):
        try:
            fn()
            T.check("%s fails" % what, False, "succeeded")
        except OSError as e:
            T.check("%s fails (%s)" % (what, H.errname(e.errno)), True)
    T.check("the image is untouched", os.path.exists(S("vm1.qcow2")) and
            H.sha256_file(ref_of(S("vm1.qcow2"))) == H.sha256_file(M("vm1.raw")))

# ---- images appearing and disappearing ------------------------------------------


@T.test
def test_add_remove_while_mounted():
    m = mounted()
    M = m.path
    staged = make(os.path.join(STAGE, "new1.qcow2"), pattern=0x31)
    ref_new1 = ref_of(staged)
    os.rename(staged, S("new1.qcow2"))
    ok, dt = H.wait_for(lambda: "new1.raw" in os.listdir(m.mnt))
    T.check("image renamed into SOURCE_DIR appears within 1.5 s", ok, "after %.2fs: %s" % (
        dt, H.listdir_safe(m.mnt)))
    if ok:
        print("  (appeared after %.2fs)" % dt)
        T.check_compare("new1.raw reads correctly", M("new1.raw"), ref_new1, nreads=30)
    ok, dt = H.wait_for(lambda: os.path.exists(M("new1.raw")), timeout=0.1)
    T.check("new image reachable by lookup too", ok)

    # created in place by qemu-img
    make(S("sub", "deeper", "inplace.qcow2"), pattern=0x32)
    ok, dt = H.wait_for(lambda: "inplace.raw" in os.listdir(M("sub", "deeper")))
    T.check("image created in a subdirectory appears within 1.5 s", ok, "after %.2fs: %s" % (
        dt, H.listdir_safe(M("sub", "deeper"))))
    if ok:
        T.check_compare("sub/deeper/inplace.raw reads correctly", M("sub", "deeper", "inplace.raw"),
                        ref_of(S("sub", "deeper", "inplace.qcow2")), nreads=30)

    # a new directory with an image
    os.makedirs(os.path.join(STAGE, "newdir"))
    make(os.path.join(STAGE, "newdir", "z.qcow2"), pattern=0x33)
    ref_z = ref_of(os.path.join(STAGE, "newdir", "z.qcow2"))
    os.rename(os.path.join(STAGE, "newdir"), S("newdir"))
    ok, dt = H.wait_for(lambda: os.listdir(M("newdir")) == ["z.raw"])
    T.check("new subdirectory with an image appears within 1.5 s", ok, "after %.2fs: %s" % (
        dt, H.listdir_safe(m.mnt)))
    if ok:
        T.check_compare("newdir/z.raw reads correctly", M("newdir", "z.raw"), ref_z, nreads=20)

    # snapshot added to a mounted image
    H.qemu_img("snapshot", "-c", "late", S("vm1.qcow2"))
    ok, dt = H.wait_for(lambda: "vm1@late.raw" in os.listdir(m.mnt))
    T.check("snapshot taken while mounted appears within 1.5 s", ok, "after %.2fs" % dt)

    os.unlink(S("new1.qcow2"))
    ok, dt = H.wait_for(lambda: "new1.raw" not in os.listdir(m.mnt))
    T.check("removed image disappears within 1.5 s", ok, "after %.2fs: %s" % (
        dt, H.listdir_safe(m.mnt)))
    ok, dt = H.wait_for(lambda: not os.path.exists(M("new1.raw")), timeout=0.2)
    T.check("removed image no longer found by lookup", ok)
    shutil.rmtree(S("newdir"))
    ok, dt = H.wait_for(lambda: "newdir" not in os.listdir(m.mnt))
    T.check("removed directory disappears within 1.5 s", ok, "after %.2fs" % dt)
    H.qemu_img("snapshot", "-d", "late", S("vm1.qcow2"))
    ok, dt = H.wait_for(lambda: "vm1@late.raw" not in os.listdir(m.mnt))
    T.check("deleted snapshot disappears within 1.5 s", ok, "after %.2fs" % dt)

# ---- open file survives renames -------------------------------------------------


@T.test
def test_open_file_across_renames():
    m = mounted()
    M = m.path
    make(S("moving.qcow2"), pattern=0x41, size=3 * MiB)
    H.qemu_io(S("moving.qcow2"), "write -P 0x43 2M 1M")
    ref_mv = ref_of(S("moving.qcow2"))
    ok, _ = H.wait_for(lambda: "moving.raw" in os.listdir(m.mnt))
    T.check("moving.raw appears", ok)
    with open(ref_mv, "rb") as f:
        expect = f.read()
    fd = os.open(M("moving.raw"), os.O_RDONLY)
    try:
        T.check("read before rename", os.pread(fd, 100000, 1000) == expect[1000:101000])
        os.rename(S("moving.qcow2"), S("moved.qcow2"))
        ok, dt = H.wait_for(lambda: "moved.raw" in os.listdir(m.mnt) and
                            "moving.raw" not in os.listdir(m.mnt))
        T.check("renamed image shows under its new name within 1.5 s", ok,
                H.listdir_safe(m.mnt))
        got = H.pread_full(fd, 3 * MiB, 0)
        T.check("open file reads correctly after the image is renamed", got == expect,
                "got %d bytes, equal=%s" % (len(got), got == expect))
        os.rename(S("moved.qcow2"), S("sub", "moved-deeper.qcow2"))
        ok, dt = H.wait_for(lambda: "moved-deeper.raw" in os.listdir(M("sub")))
        T.check("image renamed into a subdirectory shows there within 1.5 s", ok,
                H.listdir_safe(M("sub")))
        got = H.pread_full(fd, 3 * MiB, 0)
        T.check("open file reads correctly after a rename into a subdirectory",
                got == expect, "got %d bytes" % len(got))
        got = H.pread_full(fd, 5000, 2 * MiB - 2500)
        T.check("unaligned read after renames", got == expect[2 * MiB - 2500:2 * MiB + 2500])
    finally:
        os.close(fd)
    if ok:
        T.check_compare("sub/moved-deeper.raw reads correctly", M("sub", "moved-deeper.raw"),
                        ref_mv, nreads=20)


# ---- a view behind the host: requests that find an image moved ask for a fresh scan --------


@T.test
def test_view_behind_host():
    """Between two scans the view can name an image at a path it has left (and a scan that runs
    across a rename can list it under its new name with its old path). A request that finds it
    gone must not fail for that: it asks for a scan at once and tries again with what it finds.
    The scan interval is ten minutes here, so only such a requested scan can help."""
    src = os.path.join(work, "behind")
    os.makedirs(os.path.join(src, "sub"))
    P = lambda *p: os.path.join(src, *p)  # noqa: E731
    for name, pattern in (("a", 0x51), ("b", 0x52), ("c", 0x53), ("d", 0x54), ("e", 0x55), ("f", 0x56),
                          ("g", 0x57)):
        make(P(name + ".qcow2"), pattern=pattern)
    make(os.path.join(STAGE, "other.qcow2"), pattern=0x5f)
    refdir = os.path.join(work, "behind-ref")  # ref_of() keeps refs by file name: others use these
    os.makedirs(refdir)
    refs = {n: H.to_raw(P(n + ".qcow2"), os.path.join(refdir, n + ".raw")) for n in "abcdefg"}
    with H.Mount(src, args=["-o", "scan_interval=600000"]) as m:
        M = lambda *p: os.path.join(m.mnt, *p)  # noqa: E731
        T.check("all seven images listed", all(os.path.exists(M(n + ".raw")) for n in "abcdefg"),
                H.listdir_safe(m.mnt))
        # renamed into a subdirectory, then opened by the name the view still has
        os.rename(P("a.qcow2"), P("sub", "moved-a.qcow2"))
        T.check("the view still names a.raw (no scan for ten minutes)", "a.raw" in os.listdir(m.mnt))
        t0 = time.monotonic()
        T.check_compare("a.raw opens and reads the moved image", M("a.raw"), refs["a"], nreads=10)
        T.check("the open waited for one scan, not for the interval", time.monotonic() - t0 < 5,
                "%.1fs" % (time.monotonic() - t0))
        T.check("the requested scan shows sub/moved-a.raw", H.listdir_safe(M("sub")) == ["moved-a.raw"],
                H.listdir_safe(M("sub")))
        # renamed, then opened for writing
        os.rename(P("b.qcow2"), P("b2.qcow2"))
        try:
            with open(M("b.raw"), "r+b") as f:
                f.seek(4096)
                f.write(b"\xab" * 4096)
            T.check("b.raw opens for writing after its image was renamed", True)
        except OSError as e:
            T.check("b.raw opens for writing after its image was renamed", False, str(e))
        # removed: ENOENT once a fresh scan agrees
        os.unlink(P("c.qcow2"))
        try:
            open(M("c.raw"), "rb").close()
            T.check("a removed image's stale name answers ENOENT", False, "it opened")
        except OSError as e:
            T.check("a removed image's stale name answers ENOENT", e.errno == errno.ENOENT, str(e))
        # replaced by another image under the same name: the kernel's node is the old file, which
        # is gone; it looks the name up again and opens the file that has the name now
        ref_other = H.to_raw(os.path.join(STAGE, "other.qcow2"), os.path.join(refdir, "other.raw"))
        os.rename(os.path.join(STAGE, "other.qcow2"), P("d.qcow2"))
        T.check_compare("d.raw, replaced on the host, opens the image that has the name now",
                        M("d.raw"), ref_other, nreads=10)
        # truncate by name and chmod after a rename
        os.rename(P("e.qcow2"), P("e2.qcow2"))
        try:
            os.truncate(M("e.raw"), 4 * MiB)
            T.check("truncate by a stale name resizes the moved image",
                    H.virtual_size(P("e2.qcow2")) == 4 * MiB, H.virtual_size(P("e2.qcow2")))
        except OSError as e:
            T.check("truncate by a stale name resizes the moved image", False, str(e))
        os.rename(P("f.qcow2"), P("f2.qcow2"))
        try:
            os.chmod(M("f.raw"), 0o640)
            T.check("chmod by a stale name changes the moved image",
                    stat.S_IMODE(os.stat(P("f2.qcow2")).st_mode) == 0o640, oct(os.stat(P("f2.qcow2")).st_mode))
        except OSError as e:
            T.check("chmod by a stale name changes the moved image", False, str(e))
        os.rename(P("g.qcow2"), P("g2.qcow2"))
        try:
            os.setxattr(M("g.raw"), "user.qcowfs.copy_on_read", b"1")
            T.check("setxattr by a stale name succeeds", True)
        except OSError as e:
            T.check("setxattr by a stale name succeeds", False, str(e))
        # added on the host: a name the view lacks is looked up again after a fresh scan
        make(os.path.join(STAGE, "h.qcow2"), pattern=0x58)
        ref_h = H.to_raw(os.path.join(STAGE, "h.qcow2"), os.path.join(refdir, "h.raw"))
        os.makedirs(P("newdir"))
        os.rename(os.path.join(STAGE, "h.qcow2"), P("newdir", "h.qcow2"))
        T.check_compare("newdir/h.raw opens at once after the host made it", M("newdir", "h.raw"), ref_h,
                        nreads=10)
        T.check("a name that is nowhere still answers ENOENT", not os.path.exists(M("nowhere.raw")))
        # A snapshot taken in place changes no directory: a probe for another kind of name
        # (".git") in that directory is answered from the view as it is, the snapshot's own name
        # makes qcowfs look again.
        H.qemu_img("snapshot", "-c", "late", P("b2.qcow2"))
        T.check("a probe for .git answers ENOENT", not os.path.exists(M(".git")))
        T.check("and did not rescan: the new snapshot is not listed yet",
                "b2@late.raw" not in os.listdir(m.mnt), H.listdir_safe(m.mnt))
        T.check("the snapshot's name finds it at once", os.path.exists(M("b2@late.raw")))
        T.check("qcowfs still running", m.alive())
        T.check("nothing logged as an error", " error: " not in m.log_text(), m.log_text()[-800:])
    rc, out = H.check_clean(P("b2.qcow2"))
    T.check("qemu-img check: b2.qcow2 is clean after the write", rc == 0, out)
    data = H.read_raw(P("b2.qcow2"), os.path.join(work, "b2-after.raw"))
    with open(refs["b"], "rb") as f:
        expect = bytearray(f.read())
    expect[4096:8192] = b"\xab" * 4096
    diff = [i for i in range(0, len(data), 512) if data[i:i + 512] != bytes(expect[i:i + 512])]
    T.check("the write reached the renamed image, nothing else changed", data == bytes(expect),
            "%d bytes, %d expected; 512-byte blocks that differ: %s" % (len(data), len(expect), diff[:8]))


@T.test
def test_renames_racing_scans():
    """Scans every 10 ms while an image moves between directories: some scans read the old
    directory before a rename and the new one after it. Whatever a listing shows opens and
    reads right, every time."""
    src = os.path.join(work, "racing")
    dirs = ["", "one", os.path.join("one", "two"), "three"]
    for d in dirs[1:]:
        os.makedirs(os.path.join(src, d))
    # Files that are not images, sorted between the image and the subdirectories: each scan
    # spends a while between reading the image's old directory and its new one.
    for i in range(2000):
        with open(os.path.join(src, "n%04d" % i), "w") as f:
            f.write("not an image")
    path = os.path.join(src, "m0.qcow2")
    make(path, pattern=0x61)
    ref = H.to_raw(path, os.path.join(work, "racing-ref.raw"))
    with H.Mount(src, args=["-o", "scan_interval=10"]) as m:
        bad = []
        for i in range(1, 41):
            new = os.path.join(src, dirs[i % len(dirs)], "m%d.qcow2" % i)
            os.rename(path, new)
            path = new
            view = os.path.join(m.mnt, dirs[i % len(dirs)], "m%d.raw" % i)
            ok, _ = H.wait_for(lambda: os.path.basename(view) in os.listdir(os.path.dirname(view)),
                               interval=0.0002)
            if not ok:
                bad.append("%s never listed" % view)
                continue
            try:
                probs = H.compare(view, ref, nreads=4)
            except OSError as e:
                probs = [str(e)]
            if probs:
                bad.append("%s: %s" % (view, probs[:2]))
        T.check("every listed name opened and read right (40 renames)", not bad, bad[:4])
        T.check("qcowfs still running", m.alive())
        T.check("nothing logged as an error", " error: " not in m.log_text(), m.log_text()[-800:])


T.run()
