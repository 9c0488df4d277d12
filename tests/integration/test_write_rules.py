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
- Inconsistent metadata found by a write (an L1/L2 entry pointing into the L1 table, the
  refcount table, a refcount block, its own L2 table, or beyond the end of the file; a used
  cluster with refcount 0): EIO, the corrupt bit set, the metadata not overwritten, one log line
  naming the image, and the daemon and another image keep working.
"""

import errno
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import writehelp as W  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_rules", deadline=400)
EROFS = errno.EROFS
work = H.tempdir("rules")


def mkdir(*p):
    d = os.path.join(work, *p)
    os.makedirs(d, exist_ok=True)
    return d


SRC = mkdir("src")


def S(name, src=SRC):
    return os.path.join(src, name)


def good(name, src=SRC, opts=None, backing=None, writes=("write -P 0x5a 0 1M", "write -P 0xa5 2M 64k")):
    p = S(name, src)
    H.create(p, 4 * MiB, opts, backing=backing, cwd=src)
    if writes:
        H.qemu_io(p, *writes)
    return p


def ref(p, tag=None, snapshot=None):
    return H.to_raw(p, os.path.join(work, (tag or os.path.basename(p)) + ".ref"), snapshot=snapshot)


def set_bits(p, field, bits):
    H.write_field(p, field, H.read_field(p, field) | bits)


def sha(p):
    return H.sha256_file(p)


# Writes done to each writable image: (offset, length, fill byte); unaligned on purpose.
WRITES = [(0, 4096, 0x11), (1 * MiB - 100, 300, 0x12), (2 * MiB + 70000, 70000, 0x13),
          (3 * MiB + 12345, 5000, 0x14)]


def apply_writes(raw_bytes, writes=WRITES):
    b = bytearray(raw_bytes)
    for off, ln, v in writes:
        b[off:off + ln] = bytes([v]) * ln
    return bytes(b)


def do_writes(path, writes=WRITES, after_write=None, after_sync=None):
    """Opens O_RDWR, pwrites, (after_write), fsync, (after_sync), reads back, closes.
    Returns a problem string or ''."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        return "open O_RDWR: %s" % H.errname(e.errno)
    try:
        for off, ln, v in writes:
            n = os.pwrite(fd, bytes([v]) * ln, off)
            if n != ln:
                return "short pwrite %d of %d at %d" % (n, ln, off)
        if after_write:
            after_write()
        os.fsync(fd)
        if after_sync:
            after_sync()
        for off, ln, v in writes:
            got = H.pread_full(fd, ln, off)
            if got != bytes([v]) * ln:
                return "read back at %d differs right after the write" % off
    except OSError as e:
        return "%s" % e
    finally:
        try:
            os.close(fd)
        except OSError as e:
            return "close: %s" % e
    return ""


# ============================================================================================
# images for the main mount

IMGS = {}   # view name -> dict(path, ref, kind)


def build(name, fn):
    with T.step("build %s" % name):
        fn()


def b_good():
    p = good("good.qcow2")
    IMGS["good.raw"] = dict(path=p, ref=ref(p), writable=True)


def b_corrupt():
    p = good("corrupt.qcow2")
    r = ref(p)
    set_bits(p, "incompatible_features", W.INCOMPAT_CORRUPT)
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
    bms = W.bitmaps(p)
    if [b["name"] for b in bms] != ["b0"] or bms[0]["in_use"]:
        raise RuntimeError("unexpected bitmaps after qemu-img bitmap --add: %s" % bms)
    IMGS["bitmap.raw"] = dict(path=p, ref=ref(p), writable=True)


def b_lazy():
    p = good("lazy.qcow2", opts="compat=1.1,lazy_refcounts=on")
    if W.is_dirty(p):
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
        host = H.read_u64(p, H.l2_entry_offset(p, g)) & W.L2_OFFSET_MASK
        W.set_refcount(p, host, 0)
        zeroed.append(host)
    set_bits(p, "incompatible_features", W.INCOMPAT_DIRTY)
    c = W.qcheck(p)
    if c.corruptions == 0:
        raise RuntimeError("the damaged dirty image does not look damaged: " + c.summary())
    IMGS["lazydirty.raw"] = dict(path=p, ref=r, writable=True, zeroed=zeroed)


for n, fn in (("good", b_good), ("corrupt", b_corrupt), ("unkinc", b_unkinc),
              ("autoclear", b_autoclear), ("compat", b_compat), ("backing", b_backing),
              ("snapshot", b_snapshot), ("bitmap", b_bitmap), ("lazy", b_lazy),
              ("lazydirty", b_lazydirty)):
    build(n, fn)

for v in IMGS.values():
    v["sha_before"] = sha(v["path"])


def bitmap_state(p, writes=WRITES):
    """'' if every bitmap is in-use, or consistent with every written granule's bit set;
    otherwise what is wrong."""
    bms = W.bitmaps(p)
    names = [b["name"] for b in bms]
    if "b0" not in names:
        return "bitmap b0 is gone (bitmaps: %s; autoclear 0x%x)" % (names, H.read_field(
            p, "autoclear_features"))
    if not H.read_field(p, "autoclear_features") & W.AUTOCLEAR_BITMAPS:
        return "autoclear bit 0 (bitmaps extension valid) was cleared: QEMU ignores the bitmaps"
    for b in bms:
        if b["in_use"]:
            continue
        missing = []
        for off, ln, _ in writes:
            g = 1 << b["gran_bits"]
            for x in range(off - off % g, off + ln, g):
                if not W.bitmap_bit(p, b, x):
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
    T.check("%s: no write bits" % view, W.write_bits(path) == 0, "mode %o" % os.stat(path).st_mode)
    for fl, fname in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR"),
                      (os.O_RDONLY | os.O_TRUNC, "O_RDONLY|O_TRUNC")):
        e = W.open_errno(path, fl)
        T.check("%s: open %s fails with EROFS" % (view, fname), e == EROFS, "got %s" % H.errname(e))
    e = W.truncate_errno(path, 1 * MiB)
    T.check("%s: truncate fails with EROFS" % view, e == EROFS, "got %s" % H.errname(e))
    if info.get("readable"):
        T.check_compare("%s: still reads correctly" % view, path, info["ref"], nreads=20)
    else:
        r = H.child_read(path, 0, 4096)
        T.check("%s: reading fails as before (EIO/EOPNOTSUPP)" % view,
                r.get("errno") in (errno.EIO, errno.EOPNOTSUPP), r)


# ---- the main mount ---------------------------------------------------------------------------
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
                T.check("%s: has the owner write bit" % view, W.write_bits(path) & 0o200,
                        "mode %o" % os.stat(path).st_mode)
                hooks = {}
                if view == "lazy.raw":
                    seen = {}

                    def aw():
                        seen["after write"] = W.is_dirty(info["path"])

                    def as_():
                        seen["after fsync"] = W.is_dirty(info["path"])
                    hooks = dict(after_write=aw, after_sync=as_)
                if view == "bitmap.raw":
                    bm = {}

                    def bs():
                        bm["state"] = bitmap_state(info["path"])
                        bm["bitmaps"] = W.bitmaps(info["path"])
                    hooks = dict(after_sync=bs)
                prob = do_writes(path, **hooks)
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
                want = apply_writes(open(info["ref"], "rb").read())
                info["expected"] = os.path.join(work, view + ".expected")
                with open(info["expected"], "wb") as f:
                    f.write(want)
                T.check_compare("%s: reads the written content through the mount" % view, path,
                                info["expected"], nreads=30)
                if view in ("good.raw", "lazy.raw", "snap.raw", "overlay.raw"):
                    # the last handle is closed: everything written back, image clean, while
                    # the mount is still up
                    ok, _ = H.wait_for(lambda: not W.is_dirty(info["path"]) and W.qcheck(
                        info["path"]).clean(), timeout=3, interval=0.2)
                    c = W.qcheck(info["path"])
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
    main_log = ""

# ---- after the unmount: the image files ------------------------------------------------------
for view, info in sorted(IMGS.items()):
    p = info["path"]
    with T.step("after unmount %s" % view):
        if not info["writable"]:
            if info.get("snapshot"):
                got = H.sha256_file(H.to_raw(p, os.path.join(work, "snapcheck.raw"),
                                             snapshot=info["snapshot"]))
                T.check("%s: snapshot content unchanged" % view, got == sha(info["ref"]))
            else:
                T.check("%s: image file unchanged (byte for byte)" % view,
                        sha(p) == info["sha_before"], "sha differs")
            continue
        f = W.features(p)
        T.check("%s: dirty bit clear after unmount" % view, not f["inc"] & W.INCOMPAT_DIRTY,
                "incompatible 0x%x" % f["inc"])
        T.check("%s: corrupt bit clear" % view, not f["inc"] & W.INCOMPAT_CORRUPT,
                "incompatible 0x%x" % f["inc"])
        c = W.qcheck(p)
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
            T.check("lazy.raw: lazy_refcounts compatible bit kept", f["compat"] & W.COMPAT_LAZY,
                    "compatible 0x%x" % f["compat"])
        if view == "lazydirty.raw":
            T.check("lazydirty.raw: zeroed clusters not reused (guest 0..1M keeps its data)",
                    "expected" in info and
                    open(os.path.join(work, "now.raw"), "rb").read(1 * MiB)[4096:1 * MiB - 100] ==
                    bytes([0x5a]) * (1 * MiB - 4196), "guest data 4096..1M-100 changed")

# ---- -o ro --------------------------------------------------------------------------------------
with T.step("-o ro"):
    before = {v: sha(i["path"]) for v, i in IMGS.items()}
    try:
        with H.Mount(SRC, args=["-o", "ro"]) as m:
            for view, info in sorted(IMGS.items()):
                path = m.path(view)
                for fl, fname in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR")):
                    e = W.open_errno(path, fl)
                    T.check("-o ro: %s: open %s fails with EROFS" % (view, fname), e == EROFS,
                            "got %s" % H.errname(e))
                e = W.truncate_errno(path, 1 * MiB)
                T.check("-o ro: %s: truncate fails with EROFS" % view, e == EROFS, "got %s" % H.errname(e))
            T.check_compare("-o ro: good.raw reads", m.path("good.raw"),
                            IMGS["good.raw"].get("expected", IMGS["good.raw"]["ref"]), nreads=10)
    except H.MountError as e:
        T.check("-o ro mount/unmount", False, str(e))
    for view, info in sorted(IMGS.items()):
        T.check("-o ro: %s image file unchanged" % view, sha(info["path"]) == before[view])

# ============================================================================================
# inconsistent metadata found by a write

SRC3 = mkdir("src3")
BAD = []   # dict(name, view, target (guest offset to write), protect [(off, len)], ...)


def cs_of(p):
    return W.cluster_size(p)


def l2_into(name, target_fn, what):
    def fn():
        p = good(name, SRC3)
        r = ref(p, name)
        e_off = H.l2_entry_offset(p, 0)
        orig = H.read_u64(p, e_off)
        tgt, protect = target_fn(p)
        H.patch(p, e_off, struct.pack(">Q", (orig & ~W.L2_OFFSET_MASK) | W.COPIED | tgt))
        BAD.append(dict(name=name, path=p, ref=r, guest=0, protect=protect, what=what,
                        readable_at=2 * MiB))
    build(name, fn)


def t_l1(p):
    return H.read_field(p, "l1_table_offset"), [(H.read_field(p, "l1_table_offset"), cs_of(p))]


def t_rt(p):
    o = H.read_field(p, "refcount_table_offset")
    return o, [(o, cs_of(p) * H.read_field(p, "refcount_table_clusters"))]


def t_rb(p):
    o = H.read_u64(p, H.read_field(p, "refcount_table_offset")) & W.L2_OFFSET_MASK
    return o, [(o, cs_of(p))]


def t_self(p):
    o = W.l2_table_offset(p, 0)
    return o, [(o, cs_of(p))]


def t_eof(p):
    cs = cs_of(p)
    o = (os.path.getsize(p) + cs - 1) // cs * cs + 100 * cs
    return o, []


l2_into("c-l2-l1.qcow2", t_l1, "L2 entry -> L1 table")
l2_into("c-l2-rt.qcow2", t_rt, "L2 entry -> refcount table")
l2_into("c-l2-rb.qcow2", t_rb, "L2 entry -> refcount block")
l2_into("c-l2-self.qcow2", t_self, "L2 entry -> its own L2 table")
l2_into("c-l2-eof.qcow2", t_eof, "L2 entry beyond EOF")
for b in BAD:
    if b["name"] == "c-l2-eof.qcow2":
        b["eof_target"] = (H.read_u64(b["path"], H.l2_entry_offset(b["path"], 0)) & W.L2_OFFSET_MASK)


def b_l1_rt():
    name = "c-l1-rt.qcow2"
    p = good(name, SRC3)
    r = ref(p, name)
    rt = H.read_field(p, "refcount_table_offset")
    H.patch(p, H.l1_entry_offset(p, 0), struct.pack(">Q", W.COPIED | rt))
    BAD.append(dict(name=name, path=p, ref=r, guest=0, what="L1 entry -> refcount table",
                    protect=[(rt, cs_of(p) * H.read_field(p, "refcount_table_clusters"))],
                    readable_at=None))


build("c-l1-rt", b_l1_rt)


def b_rc0_shared():
    # A cluster shared with snapshot s1 (no COPIED flag) whose refcount reads 0: a write to it
    # must copy it out and drop a reference that is not there.
    name = "c-rc0-shared.qcow2"
    p = good(name, SRC3)
    H.qemu_img("snapshot", "-c", "s1", p)
    r = ref(p, name)
    sref = ref(p, "c-rc0-shared-s1", snapshot="s1")
    host = H.read_u64(p, H.l2_entry_offset(p, 0)) & W.L2_OFFSET_MASK
    if W.get_refcount(p, host) != 2:
        raise RuntimeError("expected refcount 2 for the shared cluster")
    W.set_refcount(p, host, 0)
    BAD.append(dict(name=name, path=p, ref=r, guest=0, what="refcount 0 for a snapshot-shared cluster",
                    protect=[], readable_at=2 * MiB, snap_ref=sref))


build("c-rc0-shared", b_rc0_shared)


def b_rc0_l2():
    # The L2 table's own cluster has refcount 0: an allocating write may be offered it as
    # "free"; it must never write guest data over the L2 table.
    name = "c-rc0-l2.qcow2"
    p = good(name, SRC3)
    r = ref(p, name)
    l2 = W.l2_table_offset(p, 0)
    W.set_refcount(p, l2, 0)
    ent = H.l2_entry_offset(p, 3 * MiB)   # the entry an allocating write at 3M updates
    BAD.append(dict(name=name, path=p, ref=r, guest=3 * MiB, what="refcount 0 for the L2 table",
                    protect=[(l2, ent - l2), (ent + 8, l2 + cs_of(p) - ent - 8)],
                    readable_at=2 * MiB, flexible=True))


build("c-rc0-l2", b_rc0_l2)

GOOD2 = None


def b_good2():
    global GOOD2
    p = good("good2.qcow2", SRC3)
    GOOD2 = dict(path=p, ref=ref(p, "good2"))


build("good2", b_good2)

for b in BAD:
    b["view"] = b["name"][:-len(".qcow2")] + ".raw"
    b["protected_bytes"] = [W.read_bytes(b["path"], o, n) for o, n in b["protect"]]
    b["size_before"] = os.path.getsize(b["path"])


def attempt_write(path, guest):
    """open O_RDWR, pwrite 4 KiB at guest, fsync, then a second pwrite + fsync elsewhere.
    Returns dict of errnos (0 = success) per step."""
    res = {}
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        res["open"] = e.errno
        return res
    res["open"] = 0
    for step, fn in (("write", lambda: os.pwrite(fd, b"\xee" * 4096, guest)),
                     ("fsync", lambda: os.fsync(fd)),
                     ("write2", lambda: os.pwrite(fd, b"\xdd" * 4096, 2 * MiB + 4096)),
                     ("fsync2", lambda: os.fsync(fd))):
        try:
            fn()
            res[step] = 0
        except OSError as e:
            res[step] = e.errno
    try:
        os.close(fd)
        res["close"] = 0
    except OSError as e:
        res["close"] = e.errno
    return res


try:
    with H.Mount(SRC3) as m:
        for b in BAD:
            with T.step("inconsistent %s" % b["name"]):
                path = m.path(b["view"])
                res = attempt_write(path, b["guest"])
                b["res"] = res
                print("  %s (%s): %s" % (b["name"], b["what"], {k: H.errname(v) for k, v in res.items()}),
                      flush=True)
                first_eio = res.get("write") == errno.EIO or (
                    res.get("write") == 0 and res.get("fsync") == errno.EIO)
                b["eio"] = first_eio
                if b.get("flexible"):
                    T.check("%s: the write either succeeds or fails with EIO" % b["name"],
                            res.get("open") == 0 and (first_eio or (res.get("write") == 0 and
                                                                    res.get("fsync") == 0)), res)
                else:
                    T.check("%s: open O_RDWR succeeds (the header looks fine)" % b["name"],
                            res.get("open") == 0, res)
                    T.check("%s: the write (or its fsync) fails with EIO" % b["name"], first_eio,
                            {k: H.errname(v) for k, v in res.items()})
                    T.check("%s: a second write to the image fails too (EIO/EROFS)" % b["name"],
                            res.get("write2") in (errno.EIO, errno.EROFS) or
                            res.get("fsync2") in (errno.EIO, errno.EROFS),
                            {k: H.errname(v) for k, v in res.items()})
                T.check("%s: daemon alive" % b["name"], m.alive(), m.log_text()[-1000:])
                if b["eio"]:
                    ok, _ = H.wait_for(lambda: W.open_errno(path, os.O_RDWR) == EROFS, timeout=3)
                    T.check("%s: afterwards open O_RDWR gives EROFS" % b["name"], ok,
                            "got %s" % H.errname(W.open_errno(path, os.O_RDWR)))
                    ok, _ = H.wait_for(lambda: W.write_bits(path) == 0, timeout=3)
                    T.check("%s: afterwards the file has no write bits" % b["name"], ok,
                            "mode %o" % os.stat(path).st_mode)
                    T.check("%s: corrupt bit set on the image file (while mounted)" % b["name"],
                            W.is_corrupt(b["path"]), "incompatible 0x%x" % H.read_field(
                                b["path"], "incompatible_features"))
                if b["readable_at"] is not None:
                    r = H.child_read(path, b["readable_at"], 65536)
                    exp = H.sha256_bytes(W.read_bytes(b["ref"], b["readable_at"], 65536))
                    T.check("%s: an untouched area still reads correctly" % b["name"],
                            r.get("errno") == 0 and r.get("sha") == exp, r)
        with T.step("good2 beside the broken ones"):
            prob = do_writes(m.path("good2.raw"))
            T.check("good2.raw: write + fsync + read back in the same mount", not prob, prob)
            if prob:
                raise RuntimeError("good2.raw could not be written")
            GOOD2["expected"] = os.path.join(work, "good2.expected")
            with open(GOOD2["expected"], "wb") as f:
                f.write(apply_writes(open(GOOD2["ref"], "rb").read()))
            T.check_compare("good2.raw: reads the written content", m.path("good2.raw"),
                            GOOD2["expected"], nreads=20)
        T.check("daemon alive at the end of the inconsistent-image part", m.alive(),
                m.log_text()[-1000:])
        time.sleep(1)
        bad_log = m.log_text()
except H.MountError as e:
    T.check("inconsistent-image mount/unmount (exit 0)", False, str(e))
    bad_log = ""

lines = bad_log.splitlines()
for b in BAD:
    with T.step("after unmount %s" % b["name"]):
        p = b["path"]
        for (o, n), before in zip(b["protect"], b["protected_bytes"]):
            now = W.read_bytes(p, o, n)
            T.check("%s: metadata at 0x%x..0x%x not overwritten" % (b["name"], o, o + n), now == before,
                    "%d of %d bytes differ" % (sum(1 for x, y in zip(now, before) if x != y), n))
        if "eof_target" in b:
            T.check("%s: nothing written at the beyond-EOF offset 0x%x" % (b["name"], b["eof_target"]),
                    os.path.getsize(p) <= b["eof_target"], "file is now %d bytes" % os.path.getsize(p))
        if "snap_ref" in b:
            got = H.sha256_file(H.to_raw(p, os.path.join(work, "rc0s1.raw"), snapshot="s1"))
            T.check("%s: snapshot s1 content not overwritten" % b["name"], got == sha(b["snap_ref"]),
                    "snapshot reads differently now")
        # Writes that were cached and could not be written back are reported as lost: that line
        # is never muted, and is not the image's error line.
        mine = [l for l in lines if b["name"] in l and "DATA LOST" not in l]
        if b.get("flexible") and not b.get("eio"):
            print("  %s: the write succeeded (the allocator did not offer the L2 table's cluster); "
                  "log lines: %s" % (b["name"], mine[:2]), flush=True)
            continue
        T.check("%s: corrupt bit set after unmount" % b["name"], W.is_corrupt(p),
                "incompatible 0x%x" % H.read_field(p, "incompatible_features"))
        T.check("%s: exactly one log line naming the image" % b["name"], len(mine) == 1,
                "%d lines: %s" % (len(mine), mine[:3]))
        T.check("%s: the log line gives a reason" % b["name"],
                bool(mine) and len(mine[0].split(b["name"], 1)[-1].strip(" :")) >= 8, mine[:1])

with T.step("good2 after unmount"):
    if "expected" not in GOOD2:
        raise RuntimeError("good2.raw was not written")
    c = W.qcheck(GOOD2["path"])
    T.check("good2: qemu-img check exit 0, no leaks", c.clean(), c.summary())
    T.check_compare("good2: qemu-img convert shows the writes",
                    H.to_raw(GOOD2["path"], os.path.join(work, "good2.now")), GOOD2["expected"], nreads=10)
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


with T.step("fsync reaches stable storage"):
    import shutil
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
        c = W.qcheck(dimg)
        T.check("dur.qcow2: check exit 0 after the strace'd mount", c.clean(), c.summary())


print("---- qcowfs log (inconsistent images) ----\n%s\n-----" % bad_log[-4000:], flush=True)
if T.failed:
    print("---- qcowfs log (main mount) ----\n%s\n-----" % main_log[-4000:], flush=True)
T.finish()
