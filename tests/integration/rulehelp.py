"""Helpers of the write-rule tests (test_write_rules.py, test_write_inconsistent.py): small
images with known content, and the fixed set of unaligned writes done to them and checked."""

import os

import harness as H

MiB = H.MiB

# Writes done to each writable image: (offset, length, fill byte); unaligned on purpose.
WRITES = [(0, 4096, 0x11), (1 * MiB - 100, 300, 0x12), (2 * MiB + 70000, 70000, 0x13),
          (3 * MiB + 12345, 5000, 0x14)]


def good(path, opts=None, backing=None, writes=("write -P 0x5a 0 1M", "write -P 0xa5 2M 64k")):
    """A 4 MiB image at path (backing names relative to its directory) with some data."""
    H.create(path, 4 * MiB, opts, backing=backing, cwd=os.path.dirname(path))
    if writes:
        H.qemu_io(path, *writes)
    return path


def ref(p, out_dir, tag=None, snapshot=None):
    """qemu-img convert of p (or of its snapshot) to out_dir/TAG.ref."""
    return H.to_raw(p, os.path.join(out_dir, (tag or os.path.basename(p)) + ".ref"),
                    snapshot=snapshot)


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
