#!/usr/bin/env python3
"""Inconsistent metadata found by a write (an L1/L2 entry pointing into the L1 table, the
refcount table, a refcount block, its own L2 table, or beyond the end of the file; a used
cluster with refcount 0): EIO, the corrupt bit set, the metadata not overwritten, one log line
naming the image, and the daemon and another image keep working."""

import errno
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import rulehelp as R  # noqa: E402

MiB = H.MiB
T = H.TestRun("write_inconsistent", deadline=400)
EROFS = errno.EROFS
work = H.tempdir("inconsistent")
SRC3 = os.path.join(work, "src3")
os.makedirs(SRC3)


def good(name, src=SRC3):
    return R.good(os.path.join(src, name))


def ref(p, tag=None, snapshot=None):
    return R.ref(p, work, tag, snapshot)


BAD = []   # dict(name, view, target (guest offset to write), protect [(off, len)], ...)
builders = []  # (name, function): what images() runs


def build(name, fn):
    builders.append((name, fn))


def cs_of(p):
    return H.cluster_size(p)


def l2_into(name, target_fn, what):
    def fn():
        p = good(name, SRC3)
        r = ref(p, name)
        e_off = H.l2_entry_offset(p, 0)
        orig = H.read_u64(p, e_off)
        tgt, protect = target_fn(p)
        H.patch(p, e_off, struct.pack(">Q", (orig & ~H.L2_OFFSET_MASK) | H.COPIED | tgt))
        BAD.append(dict(name=name, path=p, ref=r, guest=0, protect=protect, what=what,
                        readable_at=2 * MiB))
    build(name, fn)


def t_l1(p):
    return H.read_field(p, "l1_table_offset"), [(H.read_field(p, "l1_table_offset"), cs_of(p))]


def t_rt(p):
    o = H.read_field(p, "refcount_table_offset")
    return o, [(o, cs_of(p) * H.read_field(p, "refcount_table_clusters"))]


def t_rb(p):
    o = H.read_u64(p, H.read_field(p, "refcount_table_offset")) & H.L2_OFFSET_MASK
    return o, [(o, cs_of(p))]


def t_self(p):
    o = H.l2_table_offset(p, 0)
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
        b["eof_target"] = (H.read_u64(b["path"], H.l2_entry_offset(b["path"], 0)) & H.L2_OFFSET_MASK)


def b_l1_rt():
    name = "c-l1-rt.qcow2"
    p = good(name, SRC3)
    r = ref(p, name)
    rt = H.read_field(p, "refcount_table_offset")
    H.patch(p, H.l1_entry_offset(p, 0), struct.pack(">Q", H.COPIED | rt))
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
    host = H.read_u64(p, H.l2_entry_offset(p, 0)) & H.L2_OFFSET_MASK
    if H.get_refcount(p, host) != 2:
        raise RuntimeError("expected refcount 2 for the shared cluster")
    H.set_refcount(p, host, 0)
    BAD.append(dict(name=name, path=p, ref=r, guest=0, what="refcount 0 for a snapshot-shared cluster",
                    protect=[], readable_at=2 * MiB, snap_ref=sref))


build("c-rc0-shared", b_rc0_shared)


def b_rc0_l2():
    # The L2 table's own cluster has refcount 0: an allocating write may be offered it as
    # "free"; it must never write guest data over the L2 table.
    name = "c-rc0-l2.qcow2"
    p = good(name, SRC3)
    r = ref(p, name)
    l2 = H.l2_table_offset(p, 0)
    H.set_refcount(p, l2, 0)
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


@T.fixture
def images():
    """The broken images of BAD, and good2.qcow2 beside them."""
    T.build_all(builders)
    for b in BAD:
        if b["name"] == "c-l2-eof.qcow2":
            b["eof_target"] = (H.read_u64(b["path"], H.l2_entry_offset(b["path"], 0)) & H.L2_OFFSET_MASK)
    for b in BAD:
        b["view"] = b["name"][:-len(".qcow2")] + ".raw"
        b["protected_bytes"] = [H.read_bytes(b["path"], o, n) for o, n in b["protect"]]
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


bad_log = ""


@T.fixture
def written():
    """One mount of SRC3: a write to each broken image, then to good2; then the unmount."""
    global bad_log
    images()
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
                        ok, _ = H.wait_for(lambda: H.open_errno(path, os.O_RDWR) == EROFS, timeout=3)
                        T.check("%s: afterwards open O_RDWR gives EROFS" % b["name"], ok,
                                "got %s" % H.errname(H.open_errno(path, os.O_RDWR)))
                        ok, _ = H.wait_for(lambda: H.write_bits(path) == 0, timeout=3)
                        T.check("%s: afterwards the file has no write bits" % b["name"], ok,
                                "mode %o" % os.stat(path).st_mode)
                        T.check("%s: corrupt bit set on the image file (while mounted)" % b["name"],
                                H.is_corrupt(b["path"]), "incompatible 0x%x" % H.read_field(
                                    b["path"], "incompatible_features"))
                    if b["readable_at"] is not None:
                        r = H.child_read(path, b["readable_at"], 65536)
                        exp = H.sha256_bytes(H.read_bytes(b["ref"], b["readable_at"], 65536))
                        T.check("%s: an untouched area still reads correctly" % b["name"],
                                r.get("errno") == 0 and r.get("sha") == exp, r)
            with T.step("good2 beside the broken ones"):
                prob = R.do_writes(m.path("good2.raw"))
                T.check("good2.raw: write + fsync + read back in the same mount", not prob, prob)
                if prob:
                    raise RuntimeError("good2.raw could not be written")
                GOOD2["expected"] = os.path.join(work, "good2.expected")
                with open(GOOD2["expected"], "wb") as f:
                    f.write(R.apply_writes(open(GOOD2["ref"], "rb").read()))
                T.check_compare("good2.raw: reads the written content", m.path("good2.raw"),
                                GOOD2["expected"], nreads=20)
            T.check("daemon alive at the end of the inconsistent-image part", m.alive(),
                    m.log_text()[-1000:])
            time.sleep(1)
            bad_log = m.log_text()
    except H.MountError as e:
        T.check("inconsistent-image mount/unmount (exit 0)", False, str(e))


@T.test
def test_writes_to_inconsistent_images():
    written()


def after_unmount(b, lines):
    p = b["path"]
    for (o, n), before in zip(b["protect"], b["protected_bytes"]):
        now = H.read_bytes(p, o, n)
        T.check("%s: metadata at 0x%x..0x%x not overwritten" % (b["name"], o, o + n), now == before,
                "%d of %d bytes differ" % (sum(1 for x, y in zip(now, before) if x != y), n))
    if "eof_target" in b:
        T.check("%s: nothing written at the beyond-EOF offset 0x%x" % (b["name"], b["eof_target"]),
                os.path.getsize(p) <= b["eof_target"], "file is now %d bytes" % os.path.getsize(p))
    if "snap_ref" in b:
        got = H.sha256_file(H.to_raw(p, os.path.join(work, "rc0s1.raw"), snapshot="s1"))
        T.check("%s: snapshot s1 content not overwritten" % b["name"], got == H.sha256_file(b["snap_ref"]),
                "snapshot reads differently now")
    # Writes that were cached and could not be written back are reported as lost: that line
    # is never muted, and is not the image's error line.
    mine = [l for l in lines if b["name"] in l and "DATA LOST" not in l]
    if b.get("flexible") and not b.get("eio"):
        print("  %s: the write succeeded (the allocator did not offer the L2 table's cluster); "
              "log lines: %s" % (b["name"], mine[:2]), flush=True)
        return
    T.check("%s: corrupt bit set after unmount" % b["name"], H.is_corrupt(p),
            "incompatible 0x%x" % H.read_field(p, "incompatible_features"))
    T.check("%s: exactly one log line naming the image" % b["name"], len(mine) == 1,
            "%d lines: %s" % (len(mine), mine[:3]))
    T.check("%s: the log line gives a reason" % b["name"],
            bool(mine) and len(mine[0].split(b["name"], 1)[-1].strip(" :")) >= 8, mine[:1])


@T.test
def test_image_files_after_unmount():
    written()
    lines = bad_log.splitlines()
    for b in BAD:
        with T.step("after unmount %s" % b["name"]):
            after_unmount(b, lines)


@T.test
def test_good2_after_unmount():
    written()
    if "expected" not in GOOD2:
        raise RuntimeError("good2.raw was not written")
    c = H.qcheck(GOOD2["path"])
    T.check("good2: qemu-img check exit 0, no leaks", c.clean(), c.summary())
    T.check_compare("good2: qemu-img convert shows the writes",
                    H.to_raw(GOOD2["path"], os.path.join(work, "good2.now")), GOOD2["expected"], nreads=10)


@T.at_end
def print_log():
    print("---- qcowfs log (inconsistent images) ----\n%s\n-----" % bad_log[-4000:], flush=True)


T.run()
