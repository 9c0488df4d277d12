#!/usr/bin/env python3
"""qcowfs-stream against qemu-img convert: decode from a pipe, decode a zstd image, encode -c zstd.

A stand-alone benchmark, not a test. Makes a raw disk of --size (default 2G; every 64 KiB
cluster is half random bytes and half text, so zstd about halves it; one cluster in 16 is left
zero), converts it to a plain and a zstd-compressed qcow2 with qemu-img, then times, median of
--reps runs, each output written to a fresh file in the same directory:

  decode        cat full.qcow2 | qcowfs-stream decode - out.raw   vs  qemu-img convert -O raw full.qcow2 out.raw
  decode zstd   cat zstd.qcow2 | qcowfs-stream decode - out.raw   vs  qemu-img convert -O raw zstd.qcow2 out.raw
  encode zstd   qcowfs-stream encode -c zstd disk.raw out.qcow2   vs  qemu-img convert -c -O qcow2 -o compression_type=zstd disk.raw out.qcow2

and prints the ratio qemu-img time / qcowfs-stream time (above 1: qcowfs-stream is faster), next
to the goals of issue 10 (1.0, 1.5, 1.0). Every output is checked: decoded disks with cmp against
the raw disk, encoded images with qemu-img check and qemu-img compare. Files are read from the
page cache (each input is read once before timing), which favours neither side.
"""

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def size_arg(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def make_raw(path, size, seed=1):
    rnd = random.Random(seed)
    words = [b"qcow2 ", b"cluster ", b"refcount ", b"stream ", b"pipe ", b"the ", b"of ", b"\n"]
    text = b"".join(rnd.choice(words) for _ in range(40000))
    cs = 64 << 10
    with open(path, "wb") as f:
        for i in range(size // cs):
            if i % 16 == 15:
                f.seek(cs, 1)
                continue
            start = rnd.randrange(len(text) - cs // 2)
            f.write(rnd.randbytes(cs // 2) + text[start:start + cs // 2])
        f.truncate(size)


def cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd, shell=False):
    """(wall seconds, CPU seconds of the command and everything it waited for: `cat` included)"""
    c0, t0 = cpu_children(), time.monotonic()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL,
                   executable="/bin/bash" if shell else None)
    return time.monotonic() - t0, cpu_children() - c0


def warm(path):
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def median_time(make_cmd, out, reps, shell=False):
    """Median wall time and median CPU time over `reps` runs."""
    walls, cpus = [], []
    for _ in range(reps):
        if os.path.exists(out):
            os.unlink(out)
        subprocess.run(["sync"])
        w, c = run(make_cmd, shell=shell)
        walls.append(w)
        cpus.append(c)
    return statistics.median(walls), statistics.median(cpus)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="raw disk size (default 2G)")
    ap.add_argument("--reps", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--bin", default=os.environ.get("QCOWFS_STREAM_BIN", os.path.join(ROOT, "build", "qcowfs-stream")))
    ap.add_argument("--dir", default=None, help="work directory (default: a new one in $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    size = size_arg(a.size)
    if not os.access(a.bin, os.X_OK):
        sys.exit("no qcowfs-stream at %s (build it, or pass --bin)" % a.bin)
    work = tempfile.mkdtemp(prefix="qcowfs-stream-bench.", dir=a.dir)
    try:
        raw = os.path.join(work, "disk.raw")
        full = os.path.join(work, "full.qcow2")
        zstd = os.path.join(work, "zstd.qcow2")
        print("making a %s raw disk and its qcow2 images in %s ..." % (a.size, work), flush=True)
        make_raw(raw, size)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, full], check=True)
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                        "compression_type=zstd", raw, zstd], check=True)
        print("  raw %d MiB, full.qcow2 %d MiB, zstd.qcow2 %d MiB; %d CPUs" % (
            size >> 20, os.path.getsize(full) >> 20, os.path.getsize(zstd) >> 20, os.cpu_count()), flush=True)
        load0 = os.getloadavg()
        out_raw = os.path.join(work, "out.raw")
        out_q = os.path.join(work, "out.qcow2")
        rows = []

        def decode_row(label, image, goal):
            warm(image)
            ours = median_time("cat %s | %s decode - %s" % (image, a.bin, out_raw), out_raw, a.reps, shell=True)
            subprocess.run(["cmp", out_raw, raw], check=True)
            theirs = median_time(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, out_raw], out_raw, a.reps)
            rows.append((label, ours, theirs, goal))

        decode_row("decode from a pipe (plain image)", full, 1.0)
        decode_row("decode from a pipe (zstd image)", zstd, 1.5)
        warm(raw)
        ours = median_time([a.bin, "encode", "-c", "zstd", raw, out_q], out_q, a.reps)
        subprocess.run(["qemu-img", "check", "-q", out_q], check=True)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", raw, out_q], check=True)
        ours_size = os.path.getsize(out_q)
        theirs = median_time(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                              "compression_type=zstd", raw, out_q], out_q, a.reps)
        rows.append(("encode -c zstd", ours, theirs, 1.0))
        print("  encoded image: qcowfs-stream %d MiB, qemu-img %d MiB" % (ours_size >> 20, os.path.getsize(out_q) >> 20))

        print()
        print("load average: %.2f %.2f %.2f before the runs, %.2f %.2f %.2f after (%d CPUs)" % (
            load0 + os.getloadavg() + (os.cpu_count(),)))
        print("%-34s %21s %21s %8s %6s %9s" % ("", "qcowfs-stream", "qemu-img", "ratio", "goal", "CPU ratio"))
        ok = True
        for label, ours, theirs, goal in rows:
            ratio = theirs[0] / ours[0]
            ok &= ratio >= goal
            print("%-34s %7.2fs (CPU %6.2fs) %7.2fs (CPU %6.2fs) %7.2fx %5.1fx %8.2fx %s" % (
                label, ours[0], ours[1], theirs[0], theirs[1], ratio, goal, theirs[1] / ours[1],
                "" if ratio >= goal else "(below goal)"))
        print("\nratio = qemu-img wall time / qcowfs-stream wall time (medians); CPU ratio = the same for")
        print("CPU time (user + system, of every process in the pipeline: cat included). Outputs checked")
        print("with cmp, qemu-img check and qemu-img compare.")
        return 0 if ok else 1
    finally:
        if a.keep:
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
