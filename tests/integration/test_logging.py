#!/usr/bin/env python3
"""Errors say why and loss is never muted: a write-back that fails for lack of space logs the
system's reason, and the cached writes dropped at close are logged with bytes and ranges even
after the image's errors were logged; expected refusals (O_TRUNC on an image with snapshots) are
notices that do not mute a real error of the same image; an open racing a rename logs nothing;
a snapshot claiming 2^63 bytes or more is left out with one log line, and stat of the rest works."""

import contextlib
import errno
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

MiB = H.MiB
T = H.TestRun("logging", deadline=300)

work = H.tempdir("logging")


@contextlib.contextmanager
def small_fs(name):
    """A 3 MiB tmpfs mounted at WORK/NAME for the block."""
    small = os.path.join(work, name)
    os.makedirs(small)
    H.run(["mount", "-t", "tmpfs", "-o", "size=3M", "qcowfs-it-" + name, small])
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", small])


@T.test
def test_enospc_write_back():
    """A small tmpfs holds the image."""
    with small_fs("small") as small:
        img = os.path.join(small, "full.qcow2")
        H.create(img, 64 * MiB)
        with H.Mount(small) as m:
            fd = os.open(m.path("full.raw"), os.O_WRONLY)
            failed = None
            try:
                # Writes small enough to be cached (a write of 256 KiB or more goes to the image
                # at once and would fail by itself), so that write-back is what runs out of space.
                for i in range(64):
                    os.pwrite(fd, bytes([i + 1]) * (128 * 1024), i * 128 * 1024)
                os.fsync(fd)
            except OSError as e:
                failed = e.errno
            T.check("fsync reports ENOSPC (or EIO)", failed in (errno.ENOSPC, errno.EIO), H.errname(failed))
            # More writes and syncs fail the same way: the log must not fill up with them.
            for _ in range(3):
                try:
                    os.pwrite(fd, b"\x09" * 4096, 9 * MiB)
                    os.fsync(fd)
                except OSError:
                    pass
            try:
                os.close(fd)  # close(2) writes back too: it fails the same way
            except OSError:
                pass
            ok, _ = H.wait_for(lambda: "DATA LOST" in m.log_text(), timeout=15)
            log = m.log_text()
        lines = [l for l in log.splitlines() if "full.qcow2" in l]
        T.check("the failure says why (No space left on device)",
                any("No space left on device" in l for l in lines), lines[:4])
        lost = [l for l in lines if "DATA LOST" in l]
        T.check("the dropped writes are logged at close (not muted by the earlier error)", len(lost) == 1, lines)
        T.check("the loss line gives bytes and guest ranges",
                bool(lost) and " bytes of cached writes" in lost[0] and "0x" in lost[0], lost[:1])
        T.check("repeated failures do not repeat the line", len(lines) <= 4, lines)


@T.test
def test_enospc_keeps_what_was_written():
    """Writes large enough to go to the image at once fill a small tmpfs until one fails. The
    writes that succeeded are kept: the metadata they need had its space taken when they were
    made, so the close does not fail on a full file system and lose all of them."""
    with small_fs("small2") as small:
        img = os.path.join(small, "full.qcow2")
        H.create(img, 64 * MiB)
        chunk = 256 * 1024
        with H.Mount(small) as m:
            fd = os.open(m.path("full.raw"), os.O_WRONLY)
            done, failed = 0, None
            try:
                for i in range(64):
                    os.pwrite(fd, bytes([i + 1]) * chunk, i * chunk)
                    done += 1
            except OSError as e:
                failed = e.errno
            T.check("a write fails with ENOSPC once the file system is full", failed == errno.ENOSPC,
                    "%s after %d writes" % (H.errname(failed), done))
            try:
                os.close(fd)
                closed = None
            except OSError as e:
                closed = e.errno
            T.check("close succeeds", closed is None, H.errname(closed))
        log = m.log_text()
        T.check("no DATA LOST line", "DATA LOST" not in log, log[-800:])
        rc, out = H.check_clean(img)
        T.check("qemu-img check: clean", rc == 0, out[-800:])
        data = H.read_raw(img, os.path.join(work, "full-after.raw"))
        kept = [i for i in range(done) if data[i * chunk:(i + 1) * chunk] == bytes([i + 1]) * chunk]
        T.check("every write that succeeded is in the image (%d of them)" % done,
                done > 0 and len(kept) == done, "kept %d of %d" % (len(kept), done))


# ---- refusals are notices; real errors still show; renames; huge snapshot ------------------------
SRC = os.path.join(work, "src")
os.makedirs(SRC)


@T.fixture
def mounted():
    """snap.qcow2 (a snapshot, a damaged L2 entry), huge.qcow2 (a snapshot claiming 2^63 bytes)
    and moving.qcow2, mounted."""
    snap = os.path.join(SRC, "snap.qcow2")
    H.create(snap, 4 * MiB)
    H.qemu_io(snap, "write -P 0x44 0 1M", "write -P 0x45 2M 64k")
    H.qemu_img("snapshot", "-c", "s1", snap)
    # Damage: the L2 entry of guest 2M points past the end of the file.
    l2e = H.l2_entry_offset(snap, 2 * MiB)
    raw = H.read_u64(snap, l2e)
    H.patch(snap, l2e, struct.pack(">Q", (raw & ~0x00fffffffffffe00) | (1 << 40)))

    huge = os.path.join(SRC, "huge.qcow2")
    H.create(huge, 4 * MiB)
    H.qemu_img("snapshot", "-c", "ok", huge)
    H.qemu_img("snapshot", "-c", "big", huge)
    off = H.read_field(huge, "snapshots_offset")
    # Second entry: skip the first, then its disk_size sits 8 bytes into its extra data.
    with open(huge, "rb") as f:
        f.seek(off)
        h = f.read(40)
    _, _, id_len, name_len, _, _, _, _, extra_len = struct.unpack(">QIHHIIQII", h)
    second = off + (40 + extra_len + id_len + name_len + 7) // 8 * 8
    H.patch(huge, second + 40 + 8, struct.pack(">Q", 1 << 63))

    H.create(os.path.join(SRC, "moving.qcow2"), MiB)
    with H.Mount(SRC) as m:
        yield m


@T.test
def test_refusal_is_a_notice():
    m = mounted()
    try:
        fd = os.open(m.path("snap.raw"), os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        trunc = 0
    except OSError as e:
        trunc = e.errno
    T.check("O_TRUNC on an image with snapshots: EOPNOTSUPP", trunc == errno.EOPNOTSUPP, H.errname(trunc))
    r = H.child_read(m.path("snap.raw"), 2 * MiB, 65536)
    T.check("the damaged cluster reads EIO", r.get("errno") == errno.EIO, r)
    log = m.log_text()
    mine = [l for l in log.splitlines() if "snap.qcow2" in l]
    T.check("the O_TRUNC refusal is a notice", any("info" in l and "O_TRUNC" in l for l in mine), mine)
    T.check("the real error after it is logged as an error",
            any(" error: " in l and "beyond the end" in l for l in mine), mine)


@T.test
def test_huge_snapshot():
    """The bad snapshot is left out, the rest works."""
    m = mounted()
    names = sorted(os.listdir(m.mnt))
    T.check("the 2^63-byte snapshot is not shown", "huge@big.raw" not in names, names)
    T.check("the good snapshot is shown and stat works",
            "huge@ok.raw" in names and os.stat(m.path("huge@ok.raw")).st_size == 4 * MiB, names)
    T.check("stat of every entry works", all(os.stat(m.path(n)).st_size >= 0 for n in names))
    T.check("one log line about the huge snapshot",
            len([l for l in m.log_text().splitlines() if "huge.qcow2" in l and "2^63" in l]) == 1,
            m.log_text()[-600:])


@T.test
def test_open_racing_rename():
    """Opens racing a rename: the kernel still knows the name, the host file is gone."""
    m = mounted()
    before = m.log_text()
    answers = []
    for i in range(10):
        src = os.path.join(SRC, "moving.qcow2" if i % 2 == 0 else "moved.qcow2")
        dst = os.path.join(SRC, "moved.qcow2" if i % 2 == 0 else "moving.qcow2")
        view = "moving.raw" if i % 2 == 0 else "moved.raw"
        H.wait_for(lambda: os.path.exists(m.path(view)), timeout=3)
        os.stat(m.path(view))
        os.rename(src, dst)
        try:
            os.close(os.open(m.path(view), os.O_RDONLY))
            answers.append(0)
        except OSError as e:
            answers.append(e.errno)
    T.check("racing opens answer ENOENT or succeed", set(answers) <= {0, errno.ENOENT}, answers)
    after = m.log_text()[len(before):]
    T.check("racing opens log nothing", "moving" not in after and "moved" not in after, after[-600:])


T.run()
