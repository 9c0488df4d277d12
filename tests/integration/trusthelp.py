"""Helpers for the trust tests: a throw-away unprivileged user, operations run as that user in a
child process (each with a timeout, so a hang is a failed check, never a hung test), decoys whose
content, mode and times must not change, and a QEMU process holding an image open."""

import atexit
import json
import os
import pwd
import subprocess
import sys
import time

import harness as H

_users = []


def make_user(tag="trust"):
    """Creates a system user without home or login shell; removed at exit. Returns (uid, gid)."""
    name = "qcowfs-%s-%d" % (tag, os.getpid() % 100000)
    subprocess.run(["userdel", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    H.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
    _users.append(name)
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def _remove_users():
    for name in _users:
        subprocess.run(["userdel", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


atexit.register(_remove_users)

# One operation in a child process as another user; prints a JSON result. A timeout (hang) is
# reported as {"errno": "timeout"}.
_CHILD = r"""
import errno, hashlib, json, os, sys
op, path = sys.argv[1], sys.argv[2]
arg = sys.argv[3] if len(sys.argv) > 3 else ""
res = {"ok": False, "errno": None}
try:
    if op == "read":
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, int(arg or 65536), 0)
        finally:
            os.close(fd)
        res["sha"] = hashlib.sha256(data).hexdigest()
        res["data_head"] = data[:16].hex()
    elif op == "open_rw":
        fd = os.open(path, os.O_RDWR)
        os.close(fd)
    elif op == "write":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes.fromhex(arg) * 512, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    elif op == "chmod":
        os.chmod(path, int(arg, 8))
    elif op == "chgrp":
        os.chown(path, -1, int(arg))
    elif op == "touch":
        os.utime(path, (1234567890, 1234567890))
    elif op == "stat":
        st = os.stat(path)
        res["mode"] = oct(st.st_mode)
    elif op == "list":
        res["names"] = sorted(os.listdir(path))
    elif op == "symlink_swap":
        tmp = path + ".swap"
        os.symlink(arg, tmp)
        os.rename(tmp, path)
    elif op == "fifo_swap":
        tmp = path + ".swap"
        os.mkfifo(tmp)
        os.rename(tmp, path)
    else:
        raise SystemExit("unknown op " + op)
    res["ok"] = True
except OSError as e:
    res["errno"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(res))
"""


def as_user(uid, gid, op, path, arg="", timeout=10):
    """Runs one operation as uid/gid (no supplementary groups). Returns the result dict."""
    # The system's interpreter: the test's own may live where the user cannot reach (/root).
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    cmd = [python, "-c", _CHILD, op, path, str(arg)]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           user=uid, group=gid, extra_groups=[], cwd="/")
    except subprocess.TimeoutExpired:
        return {"ok": False, "errno": "timeout"}
    try:
        return json.loads(p.stdout.decode())
    except ValueError:
        return {"ok": False, "errno": "child failed: " + p.stderr.decode()[-300:]}


def as_root(op, path, arg="", timeout=10):
    return as_user(0, 0, op, path, arg, timeout)


def run_as(uid, gid, cmd, timeout=60):
    """Runs a command as uid/gid; returns the CompletedProcess (no check)."""
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, user=uid, group=gid, extra_groups=[], cwd="/")


class Decoy:
    """A file that must stay unread and unchanged: content, mode, owner, atime and mtime are
    recorded (atime set far back, so that any read would move it under relatime)."""

    def __init__(self, path, content, mode=0o600):
        self.path = path
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        os.utime(path, ns=(1_000_000_000 * 10**9, 1_100_000_000 * 10**9))
        self.before = self.state()

    def state(self):
        st = os.stat(self.path)
        with open(self.path, "rb") as f:
            # Reading it here would move atime: take the times first, restore them after.
            data = f.read()
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return dict(sha=H.sha256_bytes(data), mode=oct(st.st_mode), uid=st.st_uid,
                    gid=st.st_gid, atime=st.st_atime_ns, mtime=st.st_mtime_ns)

    def changes(self):
        now = self.state()
        return {k: (self.before[k], now[k]) for k in now if now[k] != self.before[k]}


def set_data_file_name(img, name):
    """Rewrites the external data file name extension of a v3 image (no backing file) to `name`,
    keeping the other extensions."""
    exts = H.header_extensions(img)
    kept = []
    with open(img, "rb") as f:
        for off, t, ln in exts:
            if t in (0, 0x44415441):
                continue
            f.seek(off + 8)
            kept.append((t, f.read(ln)))
    body = b""
    for t, data in kept + [(0x44415441, name.encode())]:
        body += t.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data
        body += b"\0" * ((8 - len(data) % 8) % 8)
    body += b"\0" * 8
    start = H.read_field(img, "header_length")
    H.patch(img, start, body + b"\0" * 512)


class QemuHolder:
    """qemu-io with `img` open (read-write unless read_only) until stop(): QEMU's own locks."""

    def __init__(self, img, read_only=False, fmt="qcow2"):
        cmd = ["qemu-io", "-f", fmt] + (["-r"] if read_only else []) + ["-c", "sleep 120000", img]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.img = img
        # It holds its locks once it has opened the image: wait for its own byte-100 lock (not
        # anyone's: a qcowfs handle still closing may hold that byte too).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-io exited: %s" % self.proc.stderr.read().decode(errors="replace"))
            if 100 in process_lock_bytes(self.proc.pid, img):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("qemu-io did not lock %s" % img)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def qemu_write(img, fmt="qcow2", pattern=0x33, offset=0, length="64k"):
    """qemu-io write; returns (ok, text). ok is False when QEMU refuses (lock error)."""
    p = subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P %d %d %s" % (pattern, offset, length), img],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    text = (p.stdout + p.stderr).decode(errors="replace")
    return p.returncode == 0 and "lock" not in text and "rror" not in text, text


def process_lock_bytes(pid, path):
    """The byte offsets of the OFD locks that process `pid` holds on `path`, from the "lock:" lines
    of /proc/PID/fdinfo of each descriptor it has open on the file."""
    st = os.stat(path)
    found = set()
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in fds:
        try:
            fst = os.stat(os.path.join(fd_dir, fd))
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] == "lock:" and "OFDLCK" in parts:
                        found.update(range(int(parts[-2]), int(parts[-1]) + 1))
        except OSError:
            continue  # closed meanwhile
    return found


def lock_bytes(path):
    """The byte offsets of the OFD locks anyone holds on `path` (from /proc/locks), sorted, a byte
    once per holder (as a set when compared with one)."""
    st = os.stat(path)
    key = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    found = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 101" (a range: first and last byte)
            if "OFDLCK" in parts and any(p == key for p in parts):
                found.extend(range(int(parts[-2]), int(parts[-1]) + 1))
    return LockList(sorted(found))


class LockList(list):
    """A sorted list of locked bytes that also compares equal to a set of them held once."""

    def __eq__(self, other):
        if isinstance(other, (set, frozenset)):
            return list(self) == sorted(other)
        return list.__eq__(self, other)

    __hash__ = None
