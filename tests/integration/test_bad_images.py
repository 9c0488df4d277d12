#!/usr/bin/env python3
"""Damaged images: never a crash or a hang. Files with a bad magic are hidden; broken qcow2
files fail with EIO (EOPNOTSUPP for unsupported features and encryption), each with a log line
naming the file; a good image beside them keeps reading correctly."""

import errno
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("bad_images", deadline=300)

work = H.tempdir("bad")
SRC = os.path.join(work, "src")
os.makedirs(SRC)
EIO = {errno.EIO}
EIO_OR_NOTSUP = {errno.EIO, errno.EOPNOTSUPP}


def S(name):
    return os.path.join(SRC, name)


def align_up(n, a=64 * KiB):
    return (n + a - 1) // a * a


def good(name, opts=None, backing=None, writes=None):
    p = S(name)
    H.create(p, 4 * MiB, opts, backing=backing, cwd=SRC)
    H.qemu_io(p, *(writes or ["write -P 0x5a 0 1M", "write -P 0xa5 2M 64k"]))
    return p


hidden = []   # file names that must not show up
broken = []   # (file name, view name, [guest offsets to read], allowed errnos, log must mention)


def bad(name, offsets=(0,), errnos=EIO, mention=None, whole=False, allow_zero=False):
    view = name[:-len(".qcow2")] + ".raw" if name.endswith(".qcow2") else name + ".raw"
    broken.append(dict(name=name, view=view, offsets=list(offsets), errnos=errnos,
                       mention=mention, whole=whole, allow_zero=allow_zero))


builders = []  # (name, function): what images() runs


def build(name, fn):
    builders.append((name, fn))


# ---- a good image -----------------------------------------------------------------------------
def make_good():
    good("good.qcow2", writes=["write -P 0x11 0 1M", "write -P 0x12 1500000 700000",
                               "write -c -P 0x13 3M 64k"])
    H.to_raw(S("good.qcow2"), os.path.join(work, "good.ref"))


build("good", make_good)
GOOD_REF = os.path.join(work, "good.ref")


# ---- bad magic: hidden ------------------------------------------------------------------------
def bad_magic():
    for name, head in (("magic-fa.qcow2", b"QFI\xfa"), ("magic-zero.qcow2", b"\0\0\0\0"),
                       ("magic-lower.qcow2", b"qfi\xfb"), ("magic-swapped.qcow2", b"\xfbIFQ")):
        good(name)
        H.patch(S(name), 0, head)
        hidden.append(name)
    with open(S("magic-short.qcow2"), "wb") as f:
        f.write(b"QFI")
    hidden.append("magic-short.qcow2")
    with open(S("magic-shifted.qcow2"), "wb") as f:
        f.write(b"\0QFI\xfb" + bytes(1000))
    hidden.append("magic-shifted.qcow2")


build("bad magic", bad_magic)


# ---- header fields ----------------------------------------------------------------------------
def field(name, fld, value, **kw):
    def fn():
        good(name)
        H.write_field(S(name), fld, value)
        bad(name, **kw)
    build(name, fn)


field("hdr-version4.qcow2", "version", 4)
field("hdr-version1.qcow2", "version", 1, errnos=EIO_OR_NOTSUP)
field("hdr-clusterbits30.qcow2", "cluster_bits", 30)
field("hdr-clusterbits8.qcow2", "cluster_bits", 8)
field("hdr-l1size-huge.qcow2", "l1_size", 0x7fffffff)
field("hdr-refcount-order7.qcow2", "refcount_order", 7)
field("hdr-header-length-huge.qcow2", "header_length", 0x7ffffff8)
field("hdr-unknown-incompat.qcow2", "incompatible_features", 1 << 10, errnos=EIO_OR_NOTSUP)
field("hdr-size-huge.qcow2", "size", 1 << 62)
field("hdr-nbsnapshots-huge.qcow2", "nb_snapshots", 0x7fffffff)


def trunc_header():
    with open(S("hdr-truncated.qcow2"), "wb") as f:
        f.write(b"QFI\xfb\x00\x00\x00\x03" + bytes(12))
    bad("hdr-truncated.qcow2")


build("hdr-truncated", trunc_header)


def l1_offset_eof():
    p = good("l1-offset-eof.qcow2")
    H.write_field(p, "l1_table_offset", align_up(os.path.getsize(p)) + 16 * 64 * KiB)
    bad("l1-offset-eof.qcow2")


build("l1-offset-eof", l1_offset_eof)


def l1_entry(name, fn_value):
    def fn():
        p = good(name)
        off = H.l1_entry_offset(p, 0)
        orig = H.read_u64(p, off)
        H.patch(p, off, struct.pack(">Q", fn_value(p, orig)))
        bad(name)
    build(name, fn)


l1_entry("l1e-beyond-eof.qcow2", lambda p, o: (1 << 63) | (align_up(os.path.getsize(p)) + 64 * 64 * KiB))
l1_entry("l1e-unaligned.qcow2", lambda p, o: o + 0x200)


def l2_entry(name, fn_value, guest=0, allow_zero=False):
    def fn():
        p = good(name)
        off = H.l2_entry_offset(p, guest)
        orig = H.read_u64(p, off)
        H.patch(p, off, struct.pack(">Q", fn_value(p, orig)))
        bad(name, offsets=[guest], allow_zero=allow_zero)
    build(name, fn)


l2_entry("l2e-reserved-low.qcow2", lambda p, o: o | (1 << 3))
l2_entry("l2e-reserved-high.qcow2", lambda p, o: o | (1 << 57))
l2_entry("l2e-unaligned.qcow2", lambda p, o: o + 0x200)
# qemu reads zeros here (host reads past EOF give zeros): accept that too
l2_entry("l2e-beyond-eof.qcow2", lambda p, o: (1 << 63) | (align_up(os.path.getsize(p)) + 100 * 64 * KiB),
         allow_zero=True)


def compressed_garbage(name, ctype):
    def fn():
        p = S(name)
        H.create(p, 4 * MiB, "compression_type=%s" % ctype)
        H.qemu_io(p, "write -c -P 0x5a 0 64k", "write -P 0xa5 2M 64k")
        l2off = H.l2_entry_offset(p, 0)
        e = H.read_u64(p, l2off)
        if not e & (1 << 62):
            raise RuntimeError("L2 entry 0x%x is not compressed" % e)
        x = 62 - (16 - 8)
        host = e & ((1 << x) - 1)
        H.patch(p, host, b"\xff" * 256)
        bad(name)
    build(name, fn)


compressed_garbage("cmp-garbage-zlib.qcow2", "zlib")
compressed_garbage("cmp-garbage-zstd.qcow2", "zstd")


def ext_len_past_cluster():
    p = good("ext-len-past-cluster.qcow2")
    exts = H.header_extensions(p)
    first = exts[0]
    if first[1] == 0:
        raise RuntimeError("no header extension to damage: %s" % exts)
    H.patch(p, first[0] + 4, struct.pack(">I", 64 * KiB))
    bad("ext-len-past-cluster.qcow2")


build("ext-len-past-cluster", ext_len_past_cluster)


def backing_name_5000():
    good("bk-base.qcow2")
    p = good("bk-name-5000.qcow2", backing="bk-base.qcow2", writes=["write -P 1 1M 64k"])
    H.write_field(p, "backing_file_size", 5000)
    bad("bk-name-5000.qcow2")


build("backing name size 5000", backing_name_5000)


def backing_missing():
    good("vanished-base.qcow2")
    good("bk-missing.qcow2", backing="vanished-base.qcow2", writes=["write -P 1 1M 64k"])
    os.unlink(S("vanished-base.qcow2"))
    bad("bk-missing.qcow2", offsets=[0])


build("backing missing", backing_missing)


def backing_loops():
    # two images backing each other, and one backing itself (qemu-img create -u: no checks)
    H.create(S("cycle-first.qcow2"), 4 * MiB, backing="cycle-second.qcow2", cwd=SRC, extra=["-u"])
    H.create(S("cycle-second.qcow2"), 4 * MiB, backing="cycle-first.qcow2", cwd=SRC, extra=["-u"])
    H.create(S("self-loop.qcow2"), 4 * MiB, backing="self-loop.qcow2", cwd=SRC, extra=["-u"])
    bad("cycle-first.qcow2", offsets=[0])
    bad("cycle-second.qcow2", offsets=[0])
    bad("self-loop.qcow2", offsets=[0])


build("backing loops", backing_loops)


def snapshot_table_eof():
    p = good("snap-table-eof.qcow2")
    H.qemu_img("snapshot", "-c", "s1", p)
    H.write_field(p, "snapshots_offset", align_up(os.path.getsize(p)) + 32 * 64 * KiB)
    bad("snap-table-eof.qcow2")


build("snapshot table beyond EOF", snapshot_table_eof)


def truncated_half():
    p = good("truncated-half.qcow2", writes=["write -P 0x5a 0 3M", "write -P 0x5b 3M 1M"])
    size = os.path.getsize(p)
    os.truncate(p, size // 2)
    # Guest 0..3M lives in the surviving first half and reads fine; 3M.. lies past the cut.
    bad("truncated-half.qcow2", offsets=(3 << 20,), whole=True)


build("truncated half", truncated_half)


def encrypted():
    # a short PBKDF benchmark: qemu's default iter-time can fail here with "Unable to get
    # accurate CPU usage"; retry with other values
    tries = (10, 50, 100) * 6
    for i, it in enumerate(tries):
        try:
            H.run(["qemu-img", "create", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
                   "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=%d" % it,
                   S("encrypted-luks.qcow2"), "1M"], quiet=True)
            break
        except H.CmdError:
            if i == len(tries) - 1:
                raise
    bad("encrypted-luks.qcow2", errnos=EIO_OR_NOTSUP, mention="encryption")
    # old AES (crypt_method 1), patched into a v2 header
    p = good("encrypted-aes.qcow2", opts="compat=0.10")
    H.write_field(p, "crypt_method", 1)
    bad("encrypted-aes.qcow2", errnos=EIO_OR_NOTSUP, mention="encryption")


build("encrypted", encrypted)


@T.fixture
def images():
    """Builds every image above (each failure is one failed check)."""
    T.build_all(builders)

    # names must not contain each other (log lines are matched by file name)
    names = [b["name"] for b in broken]
    for a in names:
        for b in names:
            assert a == b or a[:-6] not in b, (a, b)

    # ---- what qemu says (information only) ---------------------------------------------------------
    for b in broken:
        if b["name"].startswith(("cycle-", "self-loop")):
            print("  qemu on %s: (not asked: qemu-io hangs on backing loops)" % b["name"])
            continue
        try:
            p = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 64k", S(b["name"])],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=5)
            text = p.stdout.decode("utf-8", "replace").strip().splitlines()
        except subprocess.TimeoutExpired:
            text = ["(qemu-io hangs)"]
        print("  qemu on %s: %s" % (b["name"], (text[-1] if text else "")[:150]), flush=True)


# ---- the mount ------------------------------------------------------------------------------
CHILD_SCAN = r"""
import os, sys, json
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
errs = {}
ok = 0
for off in range(0, size, 65536):
    try:
        os.pread(fd, 65536, off); ok += 1
    except OSError as e:
        errs[e.errno] = errs.get(e.errno, 0) + 1
print(json.dumps({"ok": ok, "errs": errs}))
"""

@T.fixture
def mounted():
    images()
    with H.Mount(SRC) as m:
        yield m
        print("---- qcowfs log ----\n%s\n-------------------" % m.log_text()[-6000:], flush=True)


@T.test
def test_good_image_before():
    m = mounted()
    T.check_compare("good.raw equals qemu-img convert (before the bad ones)",
                    m.path("good.raw"), GOOD_REF, nreads=60)


@T.test
def test_bad_magic_hidden():
    m = mounted()
    listing = H.listdir_safe(m.mnt)
    for name in hidden:
        base = name[:-6]
        T.check("bad magic %s is not listed" % name,
                base + ".raw" not in listing and name + ".raw" not in listing, listing)


@T.fixture
def broken_read():
    """Opens and reads every broken image (each one's failures are failed checks)."""
    m = mounted()
    listing = H.listdir_safe(m.mnt)
    print("  listing: %s" % " ".join(listing), flush=True)
    for b in broken:
        with T.step("broken %s" % b["name"]):
            view = m.path(b["view"])
            listed = b["view"] in listing
            print("  %s: %s" % (b["name"], "listed" if listed else "not listed"), flush=True)
            if listed:
                for off in b["offsets"]:
                    r = H.child_read(view, off, 65536, timeout=10)
                    zeros_ok = b["allow_zero"] and r.get("errno") == 0 and r.get("zero")
                    b["read_zeros"] = bool(zeros_ok)
                    T.check("%s: open/read at %d fails with %s%s" % (
                        b["name"], off, "/".join(H.errname(e) for e in sorted(b["errnos"])),
                        " (or reads zeros)" if b["allow_zero"] else ""),
                        r.get("errno") in b["errnos"] or zeros_ok,
                        "got %s at stage %s" % (H.errname(r.get("errno")), r.get("stage")))
                if b["whole"]:
                    try:
                        p = H.run([sys.executable, "-c", CHILD_SCAN, view], timeout=20, check=False)
                        out = p.out.strip()
                        T.check("%s: reading it all hits EIO somewhere" % b["name"],
                                '"5"' in out or ("open" in p.err and "Errno 5" in p.err),
                                out + p.err[-200:])
                    except H.CmdError as e:
                        T.check("%s: reading it all answers" % b["name"], False, str(e))
                # a second attempt fails the same way (no crash, no different state)
                r = H.child_read(view, b["offsets"][0], 4096, timeout=10)
                zeros_ok = b["allow_zero"] and r.get("errno") == 0 and r.get("zero")
                T.check("%s: second attempt fails too" % b["name"],
                        r.get("errno") in b["errnos"] or zeros_ok,
                        "got %s at stage %s" % (H.errname(r.get("errno")), r.get("stage")))
            T.check("%s: qcowfs still running" % b["name"], m.alive(),
                    "exit %s; log tail %s" % (m.proc.poll(), m.log_text()[-800:]))
            if not m.alive():
                break


@T.test
def test_broken_images_fail():
    broken_read()


@T.test
def test_good_image_after():
    m = mounted()
    broken_read()
    if m.alive():
        T.check_compare("good.raw still equals qemu-img convert after the bad ones",
                        m.path("good.raw"), GOOD_REF, nreads=60)


@T.test
def test_log_lines():
    m = mounted()
    broken_read()
    time.sleep(2.5)  # at least two rescans: a rescan must not log the same problem again
    lines = m.log_text().splitlines()
    for b in broken:
        if b.get("read_zeros"):
            continue  # tolerated like qemu does: no error, so no log line required
        mine = [l for l in lines if b["name"] in l]
        T.check("%s: log line naming the file" % b["name"], len(mine) >= 1,
                "log has %d lines, none names it" % len(lines))
        if not b["name"].startswith("cycle-"):
            T.check("%s: exactly one log line" % b["name"], len(mine) <= 1,
                    "%d lines: %s" % (len(mine), mine[:3]))
        if b["mention"]:
            T.check("%s: log line mentions %r" % (b["name"], b["mention"]),
                    any(b["mention"] in l.lower() for l in mine), mine[:3])


T.run()
