#!/usr/bin/env python3
"""Which images may be written, and what writing does to their header.

- Refused (no write bits, EROFS for O_WRONLY/O_RDWR/truncate, reads still work where they did):
  the corrupt bit, an unknown incompatible bit, an image that is the backing file of another
  image in the directory (also the middle of a chain), snapshot views, and everything under
  `-o ro`.
- Writable, with header rules: an unknown autoclear bit is cleared, an unknown compatible bit is
  kept, a persistent bitmap never goes stale (in-use, or consistent and updated), a
  lazy_refcounts image is dirty while written and clean after unmount, a dirty image has its
  refcounts rebuilt before its first write (its zero-refcount clusters are not handed out again).
- fsync and fdatasync on an exposed file reach the image file's stable storage before they
  return (seen with strace -y).

Inconsistent metadata found by a write is test_write_inconsistent.py.
"""

import errno
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import rulehelp as R  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_rules", deadline=400)
EROFS = errno.EROFS
work = H.tempdir("rules")


def mkdir(*p):
    d = os.path.join(work, *p)
    os.makedirs(d, exist_ok=True)
    return d


SRC = mkdir("src")


def good(name, src=SRC, **kw):
    return R.good(os.path.join(src, name), **kw)


def ref(p, tag=None, snapshot=None):
    return R.ref(p, work, tag, snapshot)


def set_bits(p, field, bits):
    H.write_field(p, field, H.read_field(p, field) | bits)


sha = H.sha256_file


# ============================================================================================
# images for the main mount

IMGS = {}   # view name -> dict(path, ref, kind)


def b_good():
    p = good("good.qcow2")
    IMGS["good.raw"] = dict(path=p, ref=ref(p), writable=True)


def b_corrupt():
    p = good("corrupt.qcow2")
    r = ref(p)
    set_bits(p, "incompatible_features", H.INCOMPAT_CORRUPT)
    IMGS["corrupt.raw"] = dict(path=p, ref=r, writable=False, readable=True)


def b_unkinc():
    p = good("unkinc.qcow2")
    set_bits(p, "incompatible_features", 1 << 10)
    IMGS["unkinc.raw"] = dict(path=p, ref=None, writable=False, readable=False)


def b_autoclear():
    p = good("autoclear.qcow2")
    r = ref(p)
    set_bits(p, "autoclear_features", 1 << 5)
    IMGS["autoclear.raw"] = dict(path=p, ref=r, writable=True)


def b_compat():
    p = good("compat.qcow2")
    r = ref(p)
    set_bits(p, "compatible_features", 1 << 5)
    IMGS["compat.raw"] = dict(path=p, ref=r, writable=True)


def b_backing():
    base = good("base.qcow2")
    IMGS["base.raw"] = dict(path=base, ref=ref(base), writable=False, readable=True)
    ov = good("overlay.qcow2", backing="base.qcow2", writes=["write -P 0x66 1M 64k"])
    IMGS["overlay.raw"] = dict(path=ov, ref=ref(ov), writable=True)
    c0 = good("chain0.qcow2")
    c1 = good("chain1.qcow2", backing="chain0.qcow2", writes=["write -P 0x67 1M 64k"])
    c2 = good("chain2.qcow2", backing="chain1.qcow2", writes=["write -P 0x68 3M 64k"])
    IMGS["chain0.raw"] = dict(path=c0, ref=ref(c0), writable=False, readable=True)
    IMGS["chain1.raw"] = dict(path=c1, ref=ref(c1), writable=False, readable=True)
    IMGS["chain2.raw"] = dict(path=c2, ref=ref(c2), writable=True)


def b_snapshot():
    p = good("snap.qcow2")
    H.qemu_img("snapshot", "-c", "s1", p)
    H.qemu_io(p, "write -P 0x44 3M 64k")
    IMGS["snap.raw"] = dict(path=p, ref=ref(p), writable=True)
    IMGS["snap@s1.raw"] = dict(path=p, ref=ref(p, "snap-s1", snapshot="s1"), writable=False,
                               readable=True, snapshot="s1")


def b_bitmap():
    p = good("bitmap.qcow2")
    H.qemu_img("bitmap", "--add", p, "b0")
    bms = H.bitmaps(p)
    if [b["name"] for b in bms] != ["b0"] or bms[0]["in_use"]:
        raise RuntimeError("unexpected bitmaps after qemu-img bitmap --add: %s" % bms)
    IMGS["bitmap.raw"] = dict(path=p, ref=ref(p), writable=True)


def b_lazy():
    p = good("lazy.qcow2", opts="compat=1.1,lazy_refcounts=on")
    if H.is_dirty(p):
        raise RuntimeError("fresh lazy image is dirty")
    IMGS["lazy.raw"] = dict(path=p, ref=ref(p), writable=True)


def b_lazydirty():
    # A lazy_refcounts image that crashed: dirty bit set, and the refcounts of its 16 data
    # clusters (guest 0..1M) never written. qcowfs must rebuild the refcounts before it
    # allocates anything, or it hands those clusters out again and overwrites guest 0..1M.
    p = good("lazydirty.qcow2", opts="compat=1.1,lazy_refcounts=on", writes=["write -P 0x5a 0 1M"])
    r = ref(p)
    zeroed = []
    for g in range(0, 1 * MiB, 64 * KiB):
        host = H.read_u64(p, H.l2_entry_offset(p, g)) & H.L2_OFFSET_MASK
        H.set_refcount(p, host, 0)
        zeroed.append(host)
    set_bits(p, "incompatible_features", H.INCOMPAT_DIRTY)
    c = H.qcheck(p)
    if c.corruptions == 0:
        raise RuntimeError("the damaged dirty image does not look damaged: " + c.summary())
    IMGS["lazydirty.raw"] = dict(path=p, ref=r, writable=True, zeroed=zeroed)


@T.fixture
def images():
    T.build_all((("good", b_good), ("corrupt", b_corrupt), ("unkinc", b_unkinc),
                 ("autoclear", b_autoclear), ("compat", b_compat), ("backing", b_backing),
                 ("snapshot", b_snapshot), ("bitmap", b_bitmap), ("lazy", b_lazy),
                 ("lazydirty", b_lazydirty)))
    for v in IMGS.values():
        v["sha_before"] = sha(v["path"])


def bitmap_state(p, writes=R.WRITES):
    """'' if every bitmap is in-use, or consistent with every written granule's bit set;
    otherwise what is wrong."""
    bms = H.bitmaps(p)
    names = [b["name"] for b in bms]
    if "b0" not in names:
        return "bitmap b0 is gone (bitmaps: %s; autoclear 0x%x)" % (names, H.read_field(
            p, "autoclear_features"))
    if not H.read_field(p, "autoclear_features") & H.AUTOCLEAR_BITMAPS:
        return "autoclear bit 0 (bitmaps extension valid) was cleared: QEMU ignores the bitmaps"
    for b in bms:
        if b["in_use"]:
            continue
        missing = []
        for off, ln, _ in writes:
            g = 1 << b["gran_bits"]
            for x in range(off - off % g, off + ln, g):
                if not H.bitmap_bit(p, b, x):
                    missing.append(x)
        if missing:
            return ("bitmap %s is consistent (not in-use) but stale: the bits for the written "
                    "granules at %s are clear" % (b["name"], missing[:5]))
    return ""


def refused_checks(m, view, info):
    path = m.path(view)
    T.check("%s: listed" % view, os.path.exists(path), H.listdir_safe(m.mnt))
    if not os.path.exists(path):
        return
    T.check("%s: no write bits" % view, H.write_bits(path) == 0, "mode %o" % os.stat(path).st_mode)
    for fl, fname in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR"),
                      (os.O_RDONLY | os.O_TRUNC, "O_RDONLY|O_TRUNC")):
        e = H.open_errno(path, fl)
        T.check("%s: open %s fails with EROFS" % (view, fname), e == EROFS, "got %s" % H.errname(e))
    e = H.truncate_errno(path, 1 * MiB)
    T.check("%s: truncate fails with EROFS" % view, e == EROFS, "got %s" % H.errname(e))
    if info.get("readable"):
        T.check_compare("%s: still reads correctly" % view, path, info["ref"], nreads=20)
    else:
        r = H.child_read(path, 0, 4096)
        T.check("%s: reading fails as before (EIO/EOPNOTSUPP)" % view,
                r.get("errno") in (errno.EIO, errno.EOPNOTSUPP), r)


# ---- the main mount ---------------------------------------------------------------------------
main_log = ""


@T.fixture
def written():
    """One mount of SRC: the refused images refuse, the writable ones are written; then the
    unmount (exit 0)."""
    global main_log
    images()
    try:
        with H.Mount(SRC) as m:
            listing = H.listdir_safe(m.mnt)
            print("  listing: %s" % " ".join(listing), flush=True)
            for view, info in sorted(IMGS.items()):
                if info["writable"]:
                    continue
                with T.step("refused %s" % view):
                    refused_checks(m, view, info)

            for view, info in sorted(IMGS.items()):
                if not info["writable"]:
                    continue
                with T.step("write %s" % view):
                    path = m.path(view)
                    T.check("%s: has the owner write bit" % view, H.write_bits(path) & 0o200,
                            "mode %o" % os.stat(path).st_mode)
                    hooks = {}
                    if view == "lazy.raw":
                        seen = {}

                        def aw():
                            seen["after write"] = H.is_dirty(info["path"])

                        def as_():
                            seen["after fsync"] = H.is_dirty(info["path"])
                        hooks = dict(after_write=aw, after_sync=as_)
                    if view == "bitmap.raw":
                        bm = {}

                        def bs():
                            bm["state"] = bitmap_state(info["path"])
                            bm["bitmaps"] = H.bitmaps(info["path"])
                        hooks = dict(after_sync=bs)
                    prob = R.do_writes(path, **hooks)
                    T.check("%s: write + fsync + read back" % view, not prob,
                            prob + "; log tail: " + m.log_text()[-800:])
                    if view == "lazy.raw" and not prob:
                        print("  lazy.raw: dirty bit after the write (before fsync): %s" %
                              seen.get("after write"), flush=True)
                        T.check("lazy.raw: dirty bit set on the image file while written (after fsync, "
                                "still mounted)", seen.get("after fsync") is True, seen)
                    if view == "bitmap.raw" and not prob:
                        T.check("bitmap.raw: after the first write + fsync the bitmap is in-use, or "
                                "consistent and updated", bm.get("state") == "",
                                "%s; bitmaps %s" % (bm.get("state"), bm.get("bitmaps")))
                    if prob:
                        continue   # nothing (or not all) written: the content checks would only repeat it
                    want = R.apply_writes(open(info["ref"], "rb").read())
                    info["expected"] = os.path.join(work, view + ".expected")
                    with open(info["expected"], "wb") as f:
                        f.write(want)
                    T.check_compare("%s: reads the written content through the mount" % view, path,
                                    info["expected"], nreads=30)
                    if view in ("good.raw", "lazy.raw", "snap.raw", "overlay.raw"):
                        # the last handle is closed: everything written back, image clean, while
                        # the mount is still up
                        ok, _ = H.wait_for(lambda: not H.is_dirty(info["path"]) and H.qcheck(
                            info["path"]).clean(), timeout=3, interval=0.2)
                        c = H.qcheck(info["path"])
                        T.check("%s: after the last close (still mounted): no dirty bit, check exit 0, "
                                "no leaks" % view, ok, c.summary() + "; incompatible 0x%x" %
                                H.read_field(info["path"], "incompatible_features"))
                        T.check_compare("%s: after the last close qemu-img convert shows the writes" % view,
                                        H.to_raw(info["path"], os.path.join(work, "closed.raw")),
                                        info["expected"], nreads=10)
            T.check("daemon alive after the writes", m.alive(), m.log_text()[-1000:])
            main_log = m.log_text()
    except H.MountError as e:
        T.check("main mount/unmount (exit 0)", False, str(e))


@T.test
def test_refused_and_written():
    written()


# ---- after the unmount: the image files ------------------------------------------------------
def after_unmount(view, info):
    p = info["path"]
    if not info["writable"]:
        if info.get("snapshot"):
            got = H.sha256_file(H.to_raw(p, os.path.join(work, "snapcheck.raw"),
                                         snapshot=info["snapshot"]))
            T.check("%s: snapshot content unchanged" % view, got == sha(info["ref"]))
        else:
            T.check("%s: image file unchanged (byte for byte)" % view,
                    sha(p) == info["sha_before"], "sha differs")
        return
    f = H.features(p)
    T.check("%s: dirty bit clear after unmount" % view, not f["inc"] & H.INCOMPAT_DIRTY,
            "incompatible 0x%x" % f["inc"])
    T.check("%s: corrupt bit clear" % view, not f["inc"] & H.INCOMPAT_CORRUPT,
            "incompatible 0x%x" % f["inc"])
    c = H.qcheck(p)
    T.check("%s: qemu-img check exit 0, no leaks, no errors" % view, c.clean(), c.summary())
    if "expected" in info:
        T.check_compare("%s: qemu-img convert shows the writes" % view,
                        H.to_raw(p, os.path.join(work, "now.raw")), info["expected"], nreads=10)
    if view == "autoclear.raw":
        T.check("autoclear.raw: unknown autoclear bit 5 cleared by the write",
                not f["autoclear"] & (1 << 5), "autoclear 0x%x" % f["autoclear"])
    if view == "compat.raw":
        T.check("compat.raw: unknown compatible bit 5 kept", f["compat"] & (1 << 5),
                "compatible 0x%x" % f["compat"])
    if view == "bitmap.raw":
        st = bitmap_state(p)
        T.check("bitmap.raw: after unmount the bitmap is in-use, or consistent and updated",
                st == "", st)
        inf = H.info(p)
        bl = inf.get("format-specific", {}).get("data", {}).get("bitmaps")
        print("  qemu-img info bitmaps: %s" % bl, flush=True)
        T.check("bitmap.raw: qemu-img info still lists b0", bool(bl) and bl[0].get("name") == "b0", bl)
    if view == "lazy.raw":
        T.check("lazy.raw: lazy_refcounts compatible bit kept", f["compat"] & H.COMPAT_LAZY,
                "compatible 0x%x" % f["compat"])
    if view == "lazydirty.raw":
        T.check("lazydirty.raw: zeroed clusters not reused (guest 0..1M keeps its data)",
                "expected" in info and
                open(os.path.join(work, "now.raw"), "rb").read(1 * MiB)[4096:1 * MiB - 100] ==
                bytes([0x5a]) * (1 * MiB - 4196), "guest data 4096..1M-100 changed")


@T.test
def test_image_files_after_unmount():
    written()
    for view, info in sorted(IMGS.items()):
        with T.step("after unmount %s" % view):
            after_unmount(view, info)


# ---- -o ro --------------------------------------------------------------------------------------
@T.test
def test_read_only_mount():
    images()
    before = {v: sha(i["path"]) for v, i in IMGS.items()}
    try:
        with H.Mount(SRC, args=["-o", "ro"]) as m:
            for view, info in sorted(IMGS.items()):
                path = m.path(view)
                for fl, fname in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR")):
                    e = H.open_errno(path, fl)
                    T.check("-o ro: %s: open %s fails with EROFS" % (view, fname), e == EROFS,
                            "got %s" % H.errname(e))
                e = H.truncate_errno(path, 1 * MiB)
                T.check("-o ro: %s: truncate fails with EROFS" % view, e == EROFS, "got %s" % H.errname(e))
            T.check_compare("-o ro: good.raw reads", m.path("good.raw"),
                            IMGS["good.raw"].get("expected", IMGS["good.raw"]["ref"]), nreads=10)
    except H.MountError as e:
        T.check("-o ro mount/unmount", False, str(e))
    for view, info in sorted(IMGS.items()):
        T.check("-o ro: %s image file unchanged" % view, sha(info["path"]) == before[view])


# ============================================================================================
# fsync/fdatasync reach the image file's stable storage before they return (seen with strace -y)


def host_syncs(trace, img):
    """Completed fsync/fdatasync calls on img in an `strace -f -y -o` file."""
    n = 0
    pending = {}
    try:
        text = open(trace, errors="replace").read()
    except OSError:
        return 0
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        pid, rest = parts
        if rest.startswith(("fsync(", "fdatasync(")):
            on_img = ("<%s>" % img) in rest
            if rest.endswith("<unfinished ...>"):
                pending[pid] = on_img
            elif on_img and rest.rstrip().endswith("= 0"):
                n += 1
        elif rest.startswith(("<... fsync resumed>", "<... fdatasync resumed>")):
            if pending.pop(pid, False) and rest.rstrip().endswith("= 0"):
                n += 1
    return n


@T.test
def test_fsync_reaches_stable_storage():
    if not shutil.which("strace"):
        print("  NOTE: strace not installed; the host-sync check is not run", flush=True)
    else:
        SRC4 = mkdir("src4")
        dimg = os.path.realpath(good("dur.qcow2", SRC4))
        trace = os.path.join(work, "strace.txt")

        class StraceMount(H.Mount):
            def cmd(self):
                return ["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o", trace] + \
                    super().cmd()

        with StraceMount(SRC4, start_timeout=20) as m:
            fd = os.open(m.path("dur.raw"), os.O_RDWR)
            try:
                for i, (fn, fname) in enumerate(((os.fsync, "fsync"), (os.fdatasync, "fdatasync"),
                                                 (os.fsync, "fsync"))):
                    # allocating writes (guest 3M.. is unallocated), then one in place
                    off = 3 * MiB + i * 100000 if i < 2 else 1000
                    os.pwrite(fd, bytes([0x30 + i]) * 70000, off)
                    before = host_syncs(trace, dimg)
                    fn(fd)
                    after = host_syncs(trace, dimg)
                    T.check("%s #%d on the exposed file: the daemon fsync'ed/fdatasync'ed the image "
                            "file before replying (%d host syncs before, %d after)" % (fname, i, before, after),
                            after > before, "strace lines on the image: %s" % [
                                l for l in open(trace, errors="replace").read().splitlines()
                                if "dur.qcow2" in l][-5:])
            finally:
                os.close(fd)
        c = H.qcheck(dimg)
        T.check("dur.qcow2: check exit 0 after the strace'd mount", c.clean(), c.summary())


@T.at_end
def main_log_on_failure():
    if T.failed:
        print("---- qcowfs log (main mount) ----\n%s\n-----" % main_log[-4000:], flush=True)


T.run()
