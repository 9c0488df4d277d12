"""Comparing what the mount reads with the oracle's raw files: hashes, random unaligned preads,
first differences for failure messages, and manifests of whole directory trees."""

import hashlib
import os
import random
import zlib

from fileops import MiB, pread_full


def sha256_file(path, chunk=4 * MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def hash_files(paths):
    """{path: sha256} for files that must not change (backing files, data files)."""
    return {p: sha256_file(p) for p in paths}


def first_diff(a, b):
    """Index of the first differing byte of a and b (the shorter length if one is a prefix)."""
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            for j in range(i, min(i + 4096, n)):
                if a[j] != b[j]:
                    return j
    return n


def compare(view, ref, nreads=200, seed=None, cluster_size=65536, whole=True):
    """Compares the view file against the reference raw file: size, whole-file sha256 and
    `nreads` random unaligned preads (random offsets, offsets near cluster boundaries and near
    the end of the file, lengths 1..300000, some past EOF). Returns a list of problem strings
    (empty = equal)."""
    problems = []
    vsize = os.stat(view).st_size
    rsize = os.stat(ref).st_size
    if vsize != rsize:
        problems.append("st_size %d, expected %d" % (vsize, rsize))
    if whole:
        try:
            hv = sha256_file(view)
        except OSError as e:
            problems.append("reading the whole file failed: %s" % e)
            return problems
        hr = sha256_file(ref)
        if hv != hr:
            problems.append("sha256 differs: got %s expected %s" % (hv[:16], hr[:16]))
    if seed is None:
        seed = zlib.crc32(os.path.basename(view).encode())
    rnd = random.Random(seed)
    size = rsize
    fv = os.open(view, os.O_RDONLY)
    fr = os.open(ref, os.O_RDONLY)
    try:
        bad = 0
        for i in range(nreads):
            kind = i % 4
            if kind == 0 or size < 2:
                off = rnd.randrange(max(size, 1))
            elif kind == 1:
                # near a cluster boundary
                nclusters = max(size // cluster_size, 1)
                off = rnd.randrange(nclusters + 1) * cluster_size + rnd.randrange(-600, 600)
            elif kind == 2:
                # near the end of the file (sometimes past it)
                off = size - rnd.randrange(1, 70000)
                if rnd.random() < 0.1:
                    off = size + rnd.randrange(0, 4096)
            else:
                # near a 512-byte sector boundary
                off = rnd.randrange(max(size // 512, 1)) * 512 + rnd.choice((-1, 0, 1, 511))
            off = max(0, off)
            ln = rnd.randrange(1, 300001) if rnd.random() < 0.8 else rnd.randrange(1, 600)
            try:
                got = pread_full(fv, ln, off)
            except OSError as e:
                problems.append("pread(len=%d, off=%d) failed: %s" % (ln, off, e))
                bad += 1
                if bad > 5:
                    break
                continue
            exp = pread_full(fr, ln, off)
            if got != exp:
                d = first_diff(got, exp)
                problems.append("pread(len=%d, off=%d): got %d bytes, expected %d; first "
                                "difference at file offset %d (got %r expected %r)" % (
                                    ln, off, len(got), len(exp), off + d,
                                    got[d:d + 8], exp[d:d + 8]))
                bad += 1
                if bad > 5:
                    break
    finally:
        os.close(fv)
        os.close(fr)
    return problems


def first_diff_files(a, b, chunk=1 * MiB):
    """None if the files are equal (content and size), else a description of the first
    difference (offset and the bytes there)."""
    sa, sb = os.stat(a).st_size, os.stat(b).st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                d = first_diff(x, y)
                if d < min(len(x), len(y)):
                    return "first difference at offset %d (0x%x): %r vs %r (sizes %d, %d)" % (
                        off + d, off + d, x[d:d + 8], y[d:d + 8], sa, sb)
                break
            if not x:
                break
            off += len(x)
    if sa != sb:
        return "sizes differ: %d vs %d (equal up to %d)" % (sa, sb, min(sa, sb))
    return None


def diff_ranges(a, b, limit=8, gran=512):
    """Up to `limit` differing byte ranges (merged at `gran` granularity) between two files,
    as 'start-end' strings, for failure messages."""
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        cur = None
        while len(out) < limit:
            x = fa.read(gran)
            y = fb.read(gran)
            if not x and not y:
                break
            if x != y:
                if cur and cur[1] == off:
                    cur[1] = off + max(len(x), len(y))
                else:
                    if cur:
                        out.append("%d-%d" % tuple(cur))
                    cur = [off, off + max(len(x), len(y))]
            off += gran
        if cur and len(out) < limit:
            out.append("%d-%d" % tuple(cur))
    return out


def snapshot_content_diff(out, saved):
    """None if `out` (qemu-img convert -l of a snapshot, which QEMU sizes like the current disk)
    holds the snapshot's saved content: the saved bytes, then zeros if the disk is larger now."""
    ss, so = os.path.getsize(saved), os.path.getsize(out)
    if so < ss:
        return "converted snapshot has %d bytes, fewer than its %d" % (so, ss)
    with open(out, "rb") as fo, open(saved, "rb") as fs:
        pos = 0
        while pos < so:
            a = fo.read(1 * MiB)
            b = fs.read(1 * MiB)
            b = b + bytes(len(a) - len(b))
            if a != b:
                d = first_diff(a, b)
                return "first difference at offset %d (0x%x): %r vs saved %r" % (
                    pos + d, pos + d, a[d:d + 8], b[d:d + 8])
            pos += len(a)
            if not a:
                break
    return None


def tree_manifest(root, skip=("lost+found",)):
    """{relative path: description} of a directory tree: 'dir', 'link -> target', or
    'file SIZE SHA256' (mode bits included), for comparing trees."""
    res = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in skip]
        for d in dirs:
            p = os.path.join(dirpath, d)
            r = os.path.normpath(os.path.join(rel, d))
            if os.path.islink(p):
                res[r] = "link -> %s" % os.readlink(p)
            else:
                res[r] = "dir %o" % (os.lstat(p).st_mode & 0o7777)
        for f in files:
            p = os.path.join(dirpath, f)
            r = os.path.normpath(os.path.join(rel, f))
            st = os.lstat(p)
            if os.path.islink(p):
                res[r] = "link -> %s" % os.readlink(p)
            else:
                res[r] = "file %o %d %s" % (st.st_mode & 0o7777, st.st_size, sha256_file(p))
    return res


def manifest_diff(expected, got, limit=6):
    """Problem strings between two tree manifests (empty = equal)."""
    probs = []
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        probs.append("%d missing (%s)" % (len(missing), ", ".join(missing[:limit])))
    if extra:
        probs.append("%d unexpected (%s)" % (len(extra), ", ".join(extra[:limit])))
    differ = [k for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    for k in differ[:limit]:
        probs.append("%s: expected %s, got %s" % (k, expected[k][:90], got[k][:90]))
    if len(differ) > limit:
        probs.append("... %d entries differ in all" % len(differ))
    return probs
