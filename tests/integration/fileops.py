"""Sizes and the file system calls the tests make on mounted files: full preads and pwrites,
fallocate(2), dropping cached pages, and calls whose errno is the result."""

import ctypes
import ctypes.util
import errno
import os

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = None


def fallocate(fd, mode, offset, length):
    """fallocate(2) through ctypes; raises OSError with the errno on failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                      ctypes.c_longlong]
        _libc.fallocate64.restype = ctypes.c_int
    if _libc.fallocate64(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "fallocate(mode=0x%x, off=%d, len=%d): %s" % (
            mode, offset, length, os.strerror(e)))


def pread_full(fd, length, offset):
    """pread until length bytes or EOF (a FUSE file may legally return short reads only at EOF,
    but tolerate it here; the bytes are compared anyway)."""
    parts = []
    got = 0
    while got < length:
        b = os.pread(fd, length - got, offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def pwrite_full(fd, data, offset):
    """pwrite until every byte is written; a write that makes no progress raises OSError."""
    mv = memoryview(data)
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite(off=%d, len=%d) wrote %d bytes" % (
                offset + done, len(mv) - done, n))
        done += n
    return done


def drop_page_cache(fd):
    """Drops the kernel's clean cached pages of the open file (fsync first so that they are
    clean), so the next reads go to the file system rather than the page cache."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def open_errno(path, flags):
    """errno of os.open(path, flags), 0 if it opened (then closed again)."""
    try:
        fd = os.open(path, flags)
    except OSError as e:
        return e.errno
    os.close(fd)
    return 0


def truncate_errno(path, size):
    try:
        os.truncate(path, size)
    except OSError as e:
        return e.errno
    return 0


def write_bits(path):
    return os.stat(path).st_mode & 0o222
