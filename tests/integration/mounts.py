"""Temporary directories, the mount table, and `Mount`: qcowfs run in the foreground under a
temp mount point, always unmounted (or killed) at the end."""

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import time

from procs import dec, errname, fmt_cmd

_tempdirs = []
live_mounts = []  # Mount objects not yet cleanly unmounted
_cleanup_lock = threading.Lock()


def qcowfs_bin():
    return os.environ.get("QCOWFS_BIN", "")


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


def listdir_safe(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return ["<error %s>" % errname(e.errno)]


def tempdir(tag="t"):
    """A new directory under /tmp, removed by cleanup() (at exit at the latest)."""
    d = tempfile.mkdtemp(prefix="qcowfs-it-%s-" % tag, dir="/tmp")
    _tempdirs.append(d)
    return d


def cleanup():
    """Stops every live mount, detaches whatever is still mounted below the temp dirs, and
    removes them."""
    with _cleanup_lock:
        for m in list(live_mounts):
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


atexit.register(cleanup)


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
        live_mounts.append(self)
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
                return dec(f.read())
        except OSError:
            return ""

    def output_text(self):
        try:
            with open(self.out, "rb") as f:
                return dec(f.read())
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
                        self.mnt, dec(p.stderr).strip()))
                time.sleep(0.2)
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.force_cleanup()
            raise MountError("qcowfs did not exit within %ss after unmount" % timeout)
        self._done()
        return self.exit_code

    def _done(self):
        if self in live_mounts:
            live_mounts.remove(self)
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
