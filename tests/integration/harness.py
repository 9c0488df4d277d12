"""Shared helpers for the qcowfs integration tests (Python 3 standard library only).

Every test script:
    import harness as H
    T = H.TestRun("read_variants")          # checks root, /dev/fuse, qemu-img, QCOWFS_BIN
    with T.step("something"): ...           # an exception inside = one failed check
    T.check("name", condition, "detail")     # one line per check
    T.finish()                               # prints "N passed, M failed", exits 0/1

qemu-img is the oracle: every view file is compared against `qemu-img convert -O raw`.
Exit codes: 0 pass, 77 skip, anything else fail.
"""

import atexit
import contextlib
import errno
import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib

SKIP = 77
QCOW2_MAGIC = b"QFI\xfb"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_tempdirs = []
_live_mounts = []  # Mount objects not yet cleanly unmounted
_cleanup_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# subprocess helpers


class CmdError(Exception):
    pass


def fmt_cmd(cmd):
    return " ".join(shlex.quote(str(c)) for c in cmd)


def run(cmd, check=True, timeout=120, cwd=None, input=None, env=None, quiet=False):
    """Runs cmd (a list), captures output. On failure (check=True) prints the command and its
    output and raises CmdError."""
    cmd = [str(c) for c in cmd]
    try:
        p = subprocess.run(cmd, cwd=cwd, input=input, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        msg = "command timed out after %ss: %s\n  stdout: %s\n  stderr: %s" % (
            timeout, fmt_cmd(cmd), _dec(e.stdout), _dec(e.stderr))
        print(msg, flush=True)
        raise CmdError(msg)
    if check and p.returncode != 0:
        msg = "command failed (exit %d): %s%s\n  stdout: %s\n  stderr: %s" % (
            p.returncode, fmt_cmd(cmd), (" (cwd %s)" % cwd) if cwd else "",
            _dec(p.stdout).strip(), _dec(p.stderr).strip())
        if not quiet:
            print(msg, flush=True)
        raise CmdError(msg)
    p.out = _dec(p.stdout)
    p.err = _dec(p.stderr)
    return p


def _dec(b):
    if b is None:
        return ""
    if isinstance(b, str):
        return b
    return b.decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# environment


def qcowfs_bin():
    return os.environ.get("QCOWFS_BIN", "")


def preflight(need_loop=False):
    """Skips (77) if not root, no /dev/fuse, or qemu tools missing; fails (1) if QCOWFS_BIN is
    not an executable file."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    if not os.path.exists("/dev/fuse"):
        reasons.append("no /dev/fuse")
    for tool in ("qemu-img", "qemu-io", "fusermount3"):
        if shutil.which(tool) is None:
            reasons.append("%s missing" % tool)
    if reasons:
        print("SKIP: " + ", ".join(reasons), flush=True)
        sys.exit(SKIP)
    b = qcowfs_bin()
    if not b or not os.path.isfile(b) or not os.access(b, os.X_OK):
        print("FAIL: QCOWFS_BIN is not set to an executable qcowfs binary (got %r)" % b, flush=True)
        print("0 passed, 1 failed", flush=True)
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# temp dirs and cleanup


def mounts():
    """List of mount points from /proc/self/mountinfo (octal escapes decoded)."""
    res = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split(b" ")
            if len(parts) > 4:
                res.append(_unescape(parts[4]))
    return res


def mountinfo_entry(mnt):
    """The last mountinfo line (decoded fields) for mount point mnt, or None."""
    found = None
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.rstrip(b"\n").split(b" ")
            if len(parts) > 4 and _unescape(parts[4]) == mnt:
                sep = parts.index(b"-")
                found = {
                    "mount_options": parts[5].decode(),
                    "fstype": parts[sep + 1].decode(),
                    "source": parts[sep + 2].decode(),
                    "super_options": parts[sep + 3].decode() if len(parts) > sep + 3 else "",
                }
    return found


def _unescape(b):
    out = bytearray()
    i = 0
    while i < len(b):
        if b[i:i + 1] == b"\\" and i + 3 < len(b) + 0 and b[i + 1:i + 4].isdigit():
            out.append(int(b[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(b[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def is_mounted(mnt):
    return os.path.realpath(mnt) in mounts()


def mount_count(mnt):
    return mounts().count(os.path.realpath(mnt))


def tempdir(tag="t"):
    d = tempfile.mkdtemp(prefix="qcowfs-it-%s-" % tag, dir="/tmp")
    _tempdirs.append(d)
    return d


def _cleanup():
    with _cleanup_lock:
        for m in list(_live_mounts):
            try:
                m.force_cleanup()
            except Exception:
                pass
        for d in _tempdirs:
            # Anything still mounted below d (qcowfs, loop mounts): detach lazily first.
            for _ in range(3):
                below = [p for p in mounts() if p == d or p.startswith(d + "/")]
                if not below:
                    break
                for p in sorted(below, key=len, reverse=True):
                    subprocess.run(["umount", "-l", p], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    subprocess.run(["fusermount3", "-uz", p], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            if any(p == d or p.startswith(d + "/") for p in mounts()):
                print("warning: %s still has mounts; not removing it" % d, flush=True)
                continue
            shutil.rmtree(d, ignore_errors=True)
        _tempdirs.clear()


atexit.register(_cleanup)


# --------------------------------------------------------------------------------------------
# qemu helpers (the oracle and the image factory)


def qemu_img(*args, cwd=None, timeout=300):
    return run(["qemu-img"] + [str(a) for a in args], cwd=cwd, timeout=timeout)


def create(path, size, opts=None, backing=None, backing_fmt="qcow2", cwd=None, extra=()):
    """qemu-img create -f qcow2 [-b backing -F fmt] [-o opts] path size.
    opts: dict or 'k=v,k=v' string."""
    cmd = ["create", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", backing, "-F", backing_fmt]
    if opts:
        if isinstance(opts, dict):
            opts = ",".join("%s=%s" % kv for kv in opts.items())
        cmd += ["-o", opts]
    cmd += list(extra)
    cmd += [path, str(size)]
    qemu_img(*cmd, cwd=cwd)
    return path


def qemu_io(path, *cmds, fmt="qcow2", cwd=None, extra=()):
    """qemu-io -f fmt -c cmd1 -c cmd2 ... path. Fails if any command reports an error."""
    cmd = ["qemu-io", "-f", fmt] + list(extra)
    for c in cmds:
        cmd += ["-c", c]
    cmd.append(path)
    p = run(cmd, cwd=cwd)
    # qemu-io exits 0 even when a command fails: look at its output.
    text = p.out + p.err
    for bad in ("failed:", "Error", "error:", "Invalid", "invalid"):
        if bad in text:
            raise CmdError("qemu-io reported an error: %s\n%s" % (fmt_cmd(cmd), text))
    return p


def to_raw(img, out, snapshot=None, fmt="qcow2", cwd=None):
    """qemu-img convert -O raw (the oracle)."""
    cmd = ["convert", "-U", "-f", fmt]
    if snapshot is not None:
        cmd += ["-l", "snapshot.name=%s" % snapshot]
    cmd += ["-O", "raw", img, out]
    qemu_img(*cmd, cwd=cwd)
    return out


def info(img):
    import json
    p = run(["qemu-img", "info", "-U", "--output=json", img])
    return json.loads(p.out)


def write_varied_raw(path, size, seed=1):
    """A raw file with varied, partly compressible data: text-like runs, random bytes, zeros,
    repeated patterns, so compression produces clusters of many different compressed sizes."""
    rnd = random.Random(seed)
    words = [b"qcow2", b"cluster", b"refcount", b"snapshot", b"backing", b"zstd", b"zlib",
             b"the", b"of", b"image", b"\n", b" ", b"0123456789", b"lorem", b"ipsum"]
    with open(path, "wb") as f:
        written = 0
        while written < size:
            kind = rnd.randrange(5)
            n = min(rnd.randrange(1, 96 * KiB), size - written)
            if kind == 0:
                chunk = rnd.randbytes(n)
            elif kind == 1:
                chunk = bytes(n)
            elif kind == 2:
                parts = []
                total = 0
                while total < n:
                    w = words[rnd.randrange(len(words))]
                    parts.append(w)
                    total += len(w) + 1
                chunk = b" ".join(parts)[:n]
            elif kind == 3:
                pat = rnd.randbytes(rnd.randrange(1, 17))
                chunk = (pat * (n // len(pat) + 1))[:n]
            else:
                # low-entropy bytes
                chunk = bytes(rnd.randrange(4) for _ in range(min(n, 4096)))
                chunk = (chunk * (n // len(chunk) + 1))[:n]
            f.write(chunk)
            written += len(chunk)


# --------------------------------------------------------------------------------------------
# qcow2 header access for corruption tests

HDR_FIELDS = {
    # name: (offset, struct format)
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
}


def read_field(path, name):
    off, f = HDR_FIELDS[name]
    with open(path, "rb") as fh:
        fh.seek(off)
        return struct.unpack(f, fh.read(struct.calcsize(f)))[0]


def write_field(path, name, value):
    off, f = HDR_FIELDS[name]
    patch(path, off, struct.pack(f, value))


def patch(path, offset, data):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def read_u64(path, offset):
    with open(path, "rb") as fh:
        fh.seek(offset)
        return struct.unpack(">Q", fh.read(8))[0]


def l1_entry_offset(path, index):
    return read_field(path, "l1_table_offset") + 8 * index


def l2_entry_offset(path, guest_offset):
    """Host file offset of the L2 entry for guest_offset (standard L2, no extended L2)."""
    cb = read_field(path, "cluster_bits")
    cs = 1 << cb
    l2_entries = cs // 8
    l1_index = guest_offset // (cs * l2_entries)
    l1e = read_u64(path, l1_entry_offset(path, l1_index))
    l2_off = l1e & 0x00fffffffffffe00
    if l2_off == 0:
        raise ValueError("no L2 table for guest offset %d" % guest_offset)
    return l2_off + 8 * ((guest_offset // cs) % l2_entries)


def header_extensions(path):
    """[(file_offset_of_ext_header, type, length)] of a v3 (or v2) image."""
    version = read_field(path, "version")
    start = read_field(path, "header_length") if version >= 3 else 72
    cs = 1 << read_field(path, "cluster_bits")
    res = []
    with open(path, "rb") as fh:
        off = start
        while off + 8 <= cs:
            fh.seek(off)
            t, ln = struct.unpack(">II", fh.read(8))
            res.append((off, t, ln))
            if t == 0:
                break
            off += 8 + ((ln + 7) & ~7)
    return res


# --------------------------------------------------------------------------------------------
# hashing and comparison


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


def _first_diff(a, b):
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
                d = _first_diff(got, exp)
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


# --------------------------------------------------------------------------------------------
# reading in a child process (never let a hung daemon hang the test)

_CHILD_READ = r"""
import os, sys, json, hashlib
path, off, ln = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
res = {}
try:
    fd = os.open(path, os.O_RDONLY)
except OSError as e:
    print(json.dumps({"stage": "open", "errno": e.errno})); sys.exit(0)
try:
    data = os.pread(fd, ln, off)
    res = {"stage": "read", "errno": 0, "len": len(data), "sha": hashlib.sha256(data).hexdigest(),
           "zero": data.count(0) == len(data)}
except OSError as e:
    res = {"stage": "read", "errno": e.errno}
os.close(fd)
print(json.dumps(res))
"""


def child_read(path, off, ln, timeout=10):
    """Opens and preads in a child process. Returns dict(stage, errno, ...) or
    {"stage": "timeout"}."""
    import json
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD_READ, path, str(off), str(ln)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"stage": "timeout", "errno": None}
    try:
        return json.loads(p.stdout.decode())
    except Exception:
        return {"stage": "child-crash", "errno": None, "stderr": _dec(p.stderr)}


def errname(e):
    if e is None:
        return "None"
    if e == 0:
        return "success"
    return errno.errorcode.get(e, str(e))


# --------------------------------------------------------------------------------------------
# the mount


class MountError(Exception):
    pass


class Mount:
    """Runs `QCOWFS_BIN -f --log=LOG [args] SRC MNT` in the foreground as a child process.

    with Mount(src) as m:  # waits until MNT is in /proc/self/mountinfo (10 s)
        ...                # m.mnt, m.log_text(), m.proc
    On exit: fusermount3 -u, wait (20 s) and require exit code 0. Always cleans up."""

    def __init__(self, src, mnt=None, args=(), log=None, foreground=True, start_timeout=10):
        self.src = src
        self.mnt = mnt or tempdir("mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.mnt = os.path.realpath(self.mnt)
        wd = tempdir("log")
        self.log = log or os.path.join(wd, "qcowfs.log")
        self.out = os.path.join(wd, "qcowfs.out")
        self.args = list(args)
        self.start_timeout = start_timeout
        self.proc = None
        self.exit_code = None

    def cmd(self):
        return [qcowfs_bin(), "-f", "--log=%s" % self.log] + self.args + [self.src, self.mnt]

    def start(self):
        cmd = self.cmd()
        print("  $ " + fmt_cmd(cmd), flush=True)
        self._outf = open(self.out, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._outf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        _live_mounts.append(self)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mnt):
                return self
            if self.proc.poll() is not None:
                self.force_cleanup()
                raise MountError("qcowfs exited with %s before mounting; output: %s; log: %s" % (
                    self.proc.returncode, self.output_text().strip(), self.log_text().strip()))
            time.sleep(0.02)
        self.force_cleanup()
        raise MountError("%s did not appear in /proc/self/mountinfo within %ss; output: %s; "
                         "log: %s" % (self.mnt, self.start_timeout, self.output_text().strip(),
                                      self.log_text().strip()))

    def __enter__(self):
        return self.start()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        try:
            with open(self.log, "rb") as f:
                return _dec(f.read())
        except OSError:
            return ""

    def output_text(self):
        try:
            with open(self.out, "rb") as f:
                return _dec(f.read())
        except OSError:
            return ""

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def unmount(self, timeout=20):
        """fusermount3 -u (retried while busy), wait for the process; returns its exit code."""
        if self.proc is None:
            return self.exit_code
        if self.proc.poll() is None or is_mounted(self.mnt):
            deadline = time.monotonic() + 10
            while True:
                p = subprocess.run(["fusermount3", "-u", self.mnt], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
                if p.returncode == 0 or not is_mounted(self.mnt):
                    break
                if time.monotonic() > deadline:
                    self.force_cleanup()
                    raise MountError("fusermount3 -u %s failed: %s" % (
                        self.mnt, _dec(p.stderr).strip()))
                time.sleep(0.2)
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.force_cleanup()
            raise MountError("qcowfs did not exit within %ss after unmount" % timeout)
        self._done()
        return self.exit_code

    def _done(self):
        if self in _live_mounts:
            _live_mounts.remove(self)
        try:
            self._outf.close()
        except Exception:
            pass

    def force_cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
            try:
                self.exit_code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self._done()

    def __exit__(self, etype, evalue, tb):
        if etype is not None:
            # Keep the original failure; just clean up.
            try:
                self.unmount(timeout=5)
            except Exception:
                pass
            self.force_cleanup()
            return False
        code = self.unmount()
        if code != 0:
            raise MountError("qcowfs exited with %s after fusermount3 -u (expected 0); output: %s"
                             % (code, self.output_text().strip()[-2000:]))
        return False


def wait_for(pred, timeout=1.5, interval=0.05):
    """Polls pred() until true or timeout; returns (ok, seconds)."""
    t0 = time.monotonic()
    while True:
        try:
            if pred():
                return True, time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0
        time.sleep(interval)


def listdir_safe(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return ["<error %s>" % errname(e.errno)]


# --------------------------------------------------------------------------------------------
# the test run: checks, steps, summary, watchdog


class TestRun:
    def __init__(self, name, deadline=420, need_loop=False):
        self.name = name
        self.passed = 0
        self.failed = 0
        self.failures = []
        self.t0 = time.monotonic()
        preflight(need_loop=need_loop)
        print("== %s (QCOWFS_BIN=%s)" % (name, qcowfs_bin()), flush=True)
        self._deadline = deadline
        t = threading.Thread(target=self._watchdog, daemon=True)
        t.start()

    def _watchdog(self):
        time.sleep(self._deadline)
        print("FAIL: watchdog: %s still running after %ss (a hung mount?); killing qcowfs" % (
            self.name, self._deadline), flush=True)
        self.failed += 1
        for m in list(_live_mounts):
            try:
                print("  qcowfs log tail: %s" % m.log_text()[-2000:], flush=True)
            except Exception:
                pass
        try:
            _cleanup()
        except Exception:
            pass
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        os._exit(1)

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print("PASS: %s" % name, flush=True)
        else:
            self.failed += 1
            self.failures.append(name)
            print("FAIL: %s%s" % (name, (" -- " + str(detail)) if detail else ""), flush=True)
        return bool(ok)

    def check_compare(self, name, view, ref, **kw):
        try:
            probs = compare(view, ref, **kw)
        except OSError as e:
            probs = ["%s" % e]
        return self.check(name, not probs, "; ".join(probs[:4]))

    @contextlib.contextmanager
    def step(self, name):
        """A block whose unexpected exception counts as one failed check (the block's own
        checks are counted separately)."""
        try:
            yield
        except Exception as e:
            detail = "%s: %s" % (type(e).__name__, e)
            tb = traceback.format_exc().strip().splitlines()
            where = [l.strip() for l in tb if l.strip().startswith("File ")][-1:]
            self.check(name, False, detail + ((" [" + where[0] + "]") if where else ""))

    def finish(self):
        dt = time.monotonic() - self.t0
        if self.failures:
            print("failed checks:", flush=True)
            for f in self.failures:
                print("  - %s" % f, flush=True)
        print("(%s took %.1fs)" % (self.name, dt), flush=True)
        _cleanup()
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        sys.exit(0 if self.failed == 0 else 1)


# --------------------------------------------------------------------------------------------
# writing: fallocate, the reference applier, image checks after writes

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = None


def fallocate(fd, mode, offset, length):
    """fallocate(2) through ctypes; raises OSError with the errno on failure."""
    global _libc
    import ctypes
    import ctypes.util
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                      ctypes.c_longlong]
        _libc.fallocate64.restype = ctypes.c_int
    if _libc.fallocate64(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "fallocate(mode=0x%x, off=%d, len=%d): %s" % (
            mode, offset, length, os.strerror(e)))


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


def check_clean(img, cwd=None, timeout=300, force_share=False):
    """`qemu-img check` (no repair; -U with force_share). Returns (exit code, output): 0 means
    no errors and no leaks (2: corruptions, 3: leaks only, 1: the check could not run)."""
    p = run(["qemu-img", "check"] + (["-U"] if force_share else []) + [img], check=False,
            cwd=cwd, timeout=timeout)
    return p.returncode, (p.out + p.err).strip()


def clip_text(text, head=700, tail=1100):
    """The start and the end of a long output (qemu-img check lists every error, then sums up)."""
    if len(text) <= head + tail + 20:
        return text
    return "%s\n[... %d characters ...]\n%s" % (text[:head], len(text) - head - tail,
                                                  text[-tail:])


def qemu_compare(img, ref, fmt="qcow2", ref_fmt="raw", cwd=None, timeout=300,
                 force_share=False):
    """`qemu-img compare -f fmt -F ref_fmt img ref`: returns (exit code, output); 0 means
    identical guest contents (qemu-img treats a size difference as zeros: compare sizes too)."""
    p = run(["qemu-img", "compare"] + (["-U"] if force_share else []) +
            ["-f", fmt, "-F", ref_fmt, img, ref], check=False, cwd=cwd, timeout=timeout)
    return p.returncode, (p.out + p.err).strip()


def virtual_size(img):
    return info(img)["virtual-size"]


def header_bits(img):
    """(dirty, corrupt) from a v3 header's incompatible features; (False, False) for v2, which
    has no such field."""
    if read_field(img, "version") < 3:
        return False, False
    f = read_field(img, "incompatible_features")
    return bool(f & 1), bool(f & 2)


def snapshot_names(img):
    return [s["name"] for s in info(img).get("snapshots", [])]


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
                d = _first_diff(x, y)
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
        import mmap

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
        d = _first_diff(got, exp)
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


def hash_files(paths):
    """{path: sha256} for files that must not change (backing files, data files)."""
    return {p: sha256_file(p) for p in paths}


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


def snapshot_table(img):
    """The internal snapshot table: [{id, name, l1_offset, l1_size, disk_size}] (disk_size None
    when the entry has no such extra data, as in old v2 images)."""
    n = read_field(img, "nb_snapshots")
    off = read_field(img, "snapshots_offset")
    res = []
    with open(img, "rb") as f:
        for _ in range(n):
            f.seek(off)
            h = f.read(40)
            (l1_off, l1_size, id_len, name_len, _ds, _dn, _vmc, _vms,
             extra_len) = struct.unpack(">QIHHIIQII", h)
            extra = f.read(extra_len)
            disk_size = struct.unpack(">Q", extra[8:16])[0] if extra_len >= 16 else None
            sid = f.read(id_len).decode("utf-8", "replace")
            name = f.read(name_len).decode("utf-8", "replace")
            res.append({"id": sid, "name": name, "l1_offset": l1_off, "l1_size": l1_size,
                        "disk_size": disk_size})
            off += (40 + extra_len + id_len + name_len + 7) // 8 * 8
    return res


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
                d = _first_diff(a, b)
                return "first difference at offset %d (0x%x): %r vs saved %r" % (
                    pos + d, pos + d, a[d:d + 8], b[d:d + 8])
            pos += len(a)
            if not a:
                break
    return None
