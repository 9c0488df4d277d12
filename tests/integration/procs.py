"""Running commands and child processes for the integration tests: captured output, errors
that show the command, errno names, polling."""

import errno
import json
import shlex
import subprocess
import sys
import time


class CmdError(Exception):
    pass


def fmt_cmd(cmd):
    return " ".join(shlex.quote(str(c)) for c in cmd)


def dec(b):
    """Text of a bytes object (None and str pass as text)."""
    if b is None:
        return ""
    if isinstance(b, str):
        return b
    return b.decode("utf-8", "replace")


def run(cmd, check=True, timeout=120, cwd=None, input=None, env=None, quiet=False):
    """Runs cmd (a list), captures output. On failure (check=True) prints the command and its
    output and raises CmdError."""
    cmd = [str(c) for c in cmd]
    try:
        p = subprocess.run(cmd, cwd=cwd, input=input, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        msg = "command timed out after %ss: %s\n  stdout: %s\n  stderr: %s" % (
            timeout, fmt_cmd(cmd), dec(e.stdout), dec(e.stderr))
        print(msg, flush=True)
        raise CmdError(msg)
    if check and p.returncode != 0:
        msg = "command failed (exit %d): %s%s\n  stdout: %s\n  stderr: %s" % (
            p.returncode, fmt_cmd(cmd), (" (cwd %s)" % cwd) if cwd else "",
            dec(p.stdout).strip(), dec(p.stderr).strip())
        if not quiet:
            print(msg, flush=True)
        raise CmdError(msg)
    p.out = dec(p.stdout)
    p.err = dec(p.stderr)
    return p


def errname(e):
    if e is None:
        return "None"
    if e == 0:
        return "success"
    return errno.errorcode.get(e, str(e))


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


# Reading in a child process: a hung daemon must never hang the test.
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
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD_READ, path, str(off), str(ln)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"stage": "timeout", "errno": None}
    try:
        return json.loads(p.stdout.decode())
    except Exception:
        return {"stage": "child-crash", "errno": None, "stderr": dec(p.stderr)}
