"""The reference model of a written disk: every operation goes to the file under the mount and
to a plain raw file, which must stay byte-for-byte equal."""

import mmap
import os
import re

from compare import diff_ranges, first_diff, first_diff_files
from fileops import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, MiB,
                     fallocate, pread_full, pwrite_full)
from procs import errname


class OpError(Exception):
    """An operation on the file under the mount failed (the reference was left unchanged)."""

    def __init__(self, op, err):
        self.op = op
        self.err = err
        super().__init__("%s on the mounted file failed: %s" % (op, err))


class DualFile:
    """Applies every operation to a file under the mount AND to a reference raw file, so the
    two must stay byte-for-byte equal. The operation is done on the mounted file first; if it
    fails, OpError is raised and the reference is not touched. `history` keeps the operations
    (for failure messages).

    Reference semantics: punch/zero ranges become zeros (written, so the reference's file
    system does not matter); allocate changes no content; truncate and writes past the end
    change the size as on any file."""

    def __init__(self, view, ref, log=None):
        self.view = view
        self.ref = ref
        self.fv = os.open(view, os.O_RDWR)
        self.fr = os.open(ref, os.O_RDWR)
        self.history = []
        self.ranges = []  # (index into history, start, end) of what each operation touched
        self.log = log

    def close(self):
        for fd in (self.fv, self.fr):
            try:
                os.close(fd)
            except OSError:
                pass

    def reopen(self, between=None):
        """Closes the mounted file (its last handle: the image is closed) and opens it again;
        `between()` runs while it is closed."""
        self.history.append("close and reopen")
        try:
            os.close(self.fv)
        except OSError as e:
            raise OpError("close", "%s (%s)" % (errname(e.errno), e.strerror or e))
        if between:
            between()
        try:
            self.fv = os.open(self.view, os.O_RDWR)
        except OSError as e:
            raise OpError("reopen", "%s (%s)" % (errname(e.errno), e.strerror or e))

    def size(self):
        return os.fstat(self.fr).st_size

    def _do(self, desc, fn, start=None, end=None):
        if start is not None:
            self.ranges.append((len(self.history), start, end))
        self.history.append(desc)
        if self.log:
            self.log(desc)
        try:
            fn()
        except OSError as e:
            raise OpError(desc, "%s (%s)" % (errname(e.errno), e.strerror or e))

    def _ref_zero(self, off, ln):
        end = min(off + ln, self.size())
        pos = off
        z = bytes(min(4 * MiB, max(end - off, 0)))
        while pos < end:
            n = min(len(z), end - pos)
            pwrite_full(self.fr, z[:n], pos)
            pos += n

    def pwrite(self, off, data):
        self._do("pwrite(off=%d, len=%d)" % (off, len(data)),
                 lambda: pwrite_full(self.fv, data, off), off, off + len(data))
        pwrite_full(self.fr, data, off)

    def punch(self, off, ln):
        self._do("fallocate(PUNCH_HOLE|KEEP_SIZE, off=%d, len=%d)" % (off, ln),
                 lambda: fallocate(self.fv, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln),
                 off, off + ln)
        self._ref_zero(off, ln)

    def zero_range(self, off, ln, keep_size=True):
        mode = FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep_size else 0)
        self._do("fallocate(ZERO_RANGE%s, off=%d, len=%d)" % (
            "|KEEP_SIZE" if keep_size else "", off, ln),
            lambda: fallocate(self.fv, mode, off, ln), off, off + ln)
        if not keep_size and off + ln > self.size():
            os.ftruncate(self.fr, off + ln)
        self._ref_zero(off, ln)

    def allocate(self, off, ln):
        """fallocate mode 0: allocates; content unchanged; a range past the end grows the file
        (with zeros)."""
        self._do("fallocate(0, off=%d, len=%d)" % (off, ln),
                 lambda: fallocate(self.fv, 0, off, ln), off, off + ln)
        if off + ln > self.size():
            os.ftruncate(self.fr, off + ln)

    def mmap_write(self, off, data):
        """Writes `data` at `off` through a shared writable mapping of the mounted file (the
        kernel's page write-back path), then msync; the reference gets a pwrite."""

        def do():
            start = off // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(self.fv, off + len(data) - start, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
            try:
                mm[off - start:off - start + len(data)] = data
                mm.flush()
            finally:
                mm.close()
        self._do("mmap write(off=%d, len=%d) + msync" % (off, len(data)), do, off,
                 off + len(data))
        pwrite_full(self.fr, data, off)

    def truncate(self, size, by_path=False):
        old = self.size()
        lo, hi = min(old, size), max(old, size)
        if by_path:
            self._do("truncate(path, %d) [was %d]" % (size, old),
                     lambda: os.truncate(self.view, size), lo, hi)
        else:
            self._do("ftruncate(fd, %d) [was %d]" % (size, old),
                     lambda: os.ftruncate(self.fv, size), lo, hi)
        os.ftruncate(self.fr, size)

    def fsync(self, data_only=False):
        self._do("fdatasync" if data_only else "fsync",
                 lambda: (os.fdatasync if data_only else os.fsync)(self.fv))

    def verify(self, off, ln):
        """None if the mounted file reads like the reference at [off, off+ln), else a problem
        string (a read error included)."""
        try:
            got = pread_full(self.fv, ln, off)
        except OSError as e:
            return "pread(off=%d, len=%d) on the mounted file failed: %s" % (
                off, ln, errname(e.errno))
        exp = pread_full(self.fr, ln, off)
        if got == exp:
            return None
        d = first_diff(got, exp)
        return ("pread(off=%d, len=%d): got %d bytes, expected %d; first difference at offset "
                "%d (got %r expected %r)" % (off, ln, len(got), len(exp), off + d,
                                             got[d:d + 8], exp[d:d + 8]))

    def size_problem(self):
        vs, rs = os.fstat(self.fv).st_size, self.size()
        st = os.stat(self.view).st_size
        if vs == rs and st == rs:
            return None
        return "size: fstat %d, stat %d, expected %d" % (vs, st, rs)

    def recent(self, n=8):
        return "; ".join(self.history[-n:])

    def touching(self, offset, limit=6):
        """The operations (numbered from 1) whose range contains `offset`, last ones first."""
        hits = ["#%d %s" % (i + 1, self.history[i]) for i, a, b in self.ranges if a <= offset < b]
        return "; ".join(hits[::-1][:limit]) or "none"

    def first_difference(self):
        """None if the mounted file equals the reference (size, content), else a description of
        the first difference, the differing ranges and the operations that touched it."""
        d = first_diff_files(self.view, self.ref)
        if d is None:
            return None
        m = re.search(r"offset (\d+)", d)
        where = int(m.group(1)) if m else None
        return "%s; differing ranges: %s; operations that touched offset %s: %s" % (
            d, ", ".join(diff_ranges(self.view, self.ref)), where,
            self.touching(where) if where is not None else "?")

