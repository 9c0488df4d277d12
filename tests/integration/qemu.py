"""QEMU's tools as the image factory and the oracle: qemu-img create/convert/info/check/compare
and qemu-io, run with their output captured and their errors raised."""

import json
import random
import re
import subprocess

from fileops import KiB
from procs import CmdError, dec, fmt_cmd, run


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


def read_raw(img, out, snapshot=None):
    """The guest content of img (converted to the raw file out) as bytes."""
    to_raw(img, out, snapshot=snapshot)
    with open(out, "rb") as f:
        return f.read()


def info(img):
    p = run(["qemu-img", "info", "-U", "--output=json", img])
    return json.loads(p.out)


def virtual_size(img):
    return info(img)["virtual-size"]


def snapshot_names(img):
    return [s["name"] for s in info(img).get("snapshots", [])]


def clip_text(text, head=700, tail=1100):
    """The start and the end of a long output (qemu-img check lists every error, then sums up)."""
    if len(text) <= head + tail + 20:
        return text
    return "%s\n[... %d characters ...]\n%s" % (text[:head], len(text) - head - tail,
                                                  text[-tail:])


def check_clean(img, cwd=None, timeout=300, force_share=False):
    """`qemu-img check` (no repair; -U with force_share). Returns (exit code, output): 0 means
    no errors and no leaks (2: corruptions, 3: leaks only, 1: the check could not run)."""
    p = run(["qemu-img", "check"] + (["-U"] if force_share else []) + [img], check=False,
            cwd=cwd, timeout=timeout)
    return p.returncode, (p.out + p.err).strip()


def qemu_compare(img, ref, fmt="qcow2", ref_fmt="raw", cwd=None, timeout=300,
                 force_share=False):
    """`qemu-img compare -f fmt -F ref_fmt img ref`: returns (exit code, output); 0 means
    identical guest contents (qemu-img treats a size difference as zeros: compare sizes too)."""
    p = run(["qemu-img", "compare"] + (["-U"] if force_share else []) +
            ["-f", fmt, "-F", ref_fmt, img, ref], check=False, cwd=cwd, timeout=timeout)
    return p.returncode, (p.out + p.err).strip()


REFCOUNT_ONLY_ERRORS = (
    re.compile(r"^ERROR cluster \d+ refcount=\d+ reference=\d+$"),
    re.compile(r"^ERROR OFLAG_COPIED (data|L2) cluster: .*refcount=\d+$"),
)


class Check:
    """`qemu-img check --output=json`, parsed: exit code, the JSON summary, the ERROR lines."""

    def __init__(self, path, rc, js, out, err, cmd):
        self.path, self.rc, self.js, self.out, self.err, self.cmd = path, rc, js, out, err, cmd
        self.corruptions = js.get("corruptions", 0) if js else None
        self.leaks = js.get("leaks", 0) if js else None
        self.check_errors = js.get("check-errors", 0) if js else None
        self.error_lines = [l.strip() for l in (out + "\n" + err).splitlines()
                            if "ERROR" in l or l.startswith("qemu-img:")]

    def leaks_only(self):
        """rc 0 or 3, no corruptions, no check errors, no ERROR line."""
        return (self.rc in (0, 3) and self.js is not None and self.corruptions == 0
                and self.check_errors == 0 and not self.error_lines
                and "corruption" not in self.err.lower())

    def clean(self):
        return self.leaks_only() and self.rc == 0 and self.leaks == 0

    def non_refcount_errors(self):
        return [l for l in self.error_lines if not any(r.match(l) for r in REFCOUNT_ONLY_ERRORS)]

    def summary(self):
        return "%s: exit %s, corruptions %s, leaks %s, check-errors %s; %d ERROR lines%s%s" % (
            fmt_cmd(self.cmd), self.rc, self.corruptions, self.leaks, self.check_errors,
            len(self.error_lines), (": " + " | ".join(self.error_lines[:6])) if self.error_lines else "",
            ("; stderr: " + self.err.strip()[-600:]) if self.err.strip() and not self.error_lines else "")


def qcheck(path, repair=None):
    """Runs `qemu-img check --output=json [-r repair] path`; returns a Check."""
    cmd = ["qemu-img", "check", "--output=json"]
    if repair:
        cmd += ["-r", repair]
    cmd.append(path)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    out, err = dec(p.stdout), dec(p.stderr)
    try:
        js = json.loads(out)
    except ValueError:
        js = None
    return Check(path, p.returncode, js, out, err, cmd)


def write_varied_raw(path, size, seed=1, holes=()):
    """A raw file with varied, partly compressible data: text-like runs, random bytes, zeros,
    repeated patterns, so compression produces clusters of many different compressed sizes;
    zeroed at `holes` [(offset, length)] (where qemu-io can put compressed clusters). Returns
    path."""
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
        for off, ln in holes:
            f.seek(off)
            f.write(bytes(ln))
    return path
