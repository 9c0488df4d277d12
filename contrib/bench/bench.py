#!/usr/bin/env python3
"""Side-by-side read and write benchmark: qcowfs vs. qemu-storage-daemon's FUSE export (vs. a raw file).

Not part of the test suite. Run it through contrib/bench/run.sh (which installs the tools and
builds qcowfs), as root: it drops the page cache and mounts FUSE filesystems.

Reads: for every test image it mounts the image directory once with qcowfs and each image with its
own `qemu-storage-daemon --export type=fuse`, checks that both show exactly the bytes of
`qemu-img convert -O raw`, and then measures, alternating the two mounts and dropping the page
cache before every run:

  * cold sha256sum of the whole file (seconds, lower is better; doubles as the correctness check)
  * sequential read, fio bs=1M psync buffered (MiB/s)
  * random 4 KiB read, fio psync buffered, queue depth 1 (IOPS)
  * random 4 KiB read, fio libaio O_DIRECT, queue depth 16 (IOPS; skipped if O_DIRECT fails)

Writes: every job runs on a fresh `cp --sparse=always` copy of its template image per side (made
before the timed part), on a freshly started qcowfs (default options, writable) and a fresh
`qemu-storage-daemon --export type=fuse,writable=on`, and on a raw copy on the host disk. fio's
data is deterministic (fixed --randseed, refilled random buffers, fixed I/O count), every job ends
with an fsync. After each run the daemon is stopped (qcowfs: fusermount3 -u and wait for its exit),
`qemu-img check` must exit 0, and `qemu-img compare` must find the qcowfs result identical to the
qsd result and to the raw result:

  * sequential write, fio bs=1M psync buffered, end_fsync, into an empty image (MiB/s)
  * sequential overwrite of a fully written image, same job (MiB/s)
  * random 4 KiB write, psync buffered QD1, fsync every 32 writes, fully written image (IOPS)
  * random 4 KiB write, libaio O_DIRECT QD16, empty image (IOPS; skipped if O_DIRECT fails)
  * random 64 KiB write straddling two clusters into the top of a backing chain (copy-on-write, IOPS)

The same jobs on the raw file on the host disk give the upper bound. Each value is the median of
--reps runs. Standard library only.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]

TARGETS = ("qcowfs", "qsd", "raw")
TARGET_TITLES = {"qcowfs": "qcowfs", "qsd": "qsd", "raw": "raw-host"}


class BenchError(Exception):
    """A failure that must stop the run loudly (wrong data, I/O errors, mount failures)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        raise BenchError(f"command failed ({e.returncode}): {' '.join(cmd)}\n{e.stderr or ''}{e.stdout or ''}") from None


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def human(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n / MiB:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# Cleanup: every mount and daemon is registered here the moment it exists.

class Cleanup:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Path] = []
        self.dirs: list[Path] = []
        # Callables run first, newest first (side.py: unmount a loop-mounted file system, detach
        # its loop device), before any FUSE daemon goes away.
        self.hooks: list = []
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        for hook in reversed(self.hooks):
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                print(f"bench: cleanup step failed: {e}", file=sys.stderr)
        # Plain unmount first: qcowfs then leaves its session loop and exits by itself.
        for m in reversed(self.mounts):
            if is_mounted(m):
                subprocess.run(["fusermount3", "-u", str(m)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Anything still mounted (a hung daemon) goes lazily, so the temp dir can be removed safely.
        for m in reversed(self.mounts):
            if is_mounted(m):
                subprocess.run(["fusermount3", "-uz", str(m)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for d in self.dirs:
            left = [m for m in mounted_paths() if m == d or d in m.parents]
            if left:
                print(f"bench: NOT removing {d}: still mounted: {', '.join(map(str, left))}", file=sys.stderr)
            else:
                shutil.rmtree(d, ignore_errors=True)


CLEANUP = Cleanup()


def on_signal(signum, _frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def mounted_paths() -> list[Path]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                mp = mp.replace(esc, ch)
            out.append(Path(mp))
    return out


def is_mounted(path: Path) -> bool:
    return path in mounted_paths()


def wait_mounted(path: Path, proc: subprocess.Popen, what: str, logfile: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if is_mounted(path):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = logfile.read_text(errors="replace")[-3000:] if logfile.exists() else ""
    raise BenchError(f"{what} did not mount {path} (exit status {proc.poll()}); log:\n{tail}")


# ----------------------------------------------------------------------------------------------
# Machine and page cache

def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
        return (r.stdout.strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"


def machine_info(qcowfs_bin: str) -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "loadavg_start": " ".join(open("/proc/loadavg").read().split()[:3]),
        "qemu": first_line(["qemu-storage-daemon", "--version"]),
        "qemu_img": first_line(["qemu-img", "--version"]),
        "fio": first_line(["fio", "--version"]),
        "qcowfs": first_line([qcowfs_bin, "--version"]),
        "qcowfs_bin": qcowfs_bin,
        "source_tree": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "page_reporting": page_reporting(),
    }


def page_reporting() -> str:
    """Whether the guest hands free memory back to its host (virtio-balloon free page reporting).
    Then memory freed a few seconds ago is unmapped on the host, and whoever touches it next (a
    new page-cache page) pays a host fault: writes through the page cache run at half speed or
    full speed depending on what ran before them."""
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    balloon = Path("/sys/bus/virtio/drivers/virtio_balloon")
    if not order.exists():
        return "no"
    devices = [d for d in balloon.iterdir() if d.name.startswith("virtio")] if balloon.exists() else []
    try:
        o = int(order.read_text().strip())
    except (OSError, ValueError):
        return "?"
    return (f"yes, free blocks of {human((1 << o) * 4096)} and more" if devices else "no balloon device") + \
        " (virtio-balloon free page reporting)"


def read_ahead_kb(path: Path) -> str:
    """The kernel readahead window of the filesystem that serves path (its backing_dev_info)."""
    st = os.stat(path)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        return bdi.read_text().strip()
    except OSError:
        return "?"


# ----------------------------------------------------------------------------------------------
# Test images

def make_data(path: Path, size: int) -> None:
    """Non-zero data that zstd compresses to roughly half: each 64 KiB cluster is 32 KiB of random
    bytes followed by 32 KiB of text stamped with the cluster number."""
    cl, half = 64 * 1024, 32 * 1024
    text = (b"The quick brown fox jumps over the lazy dog; qcowfs benchmark filler line.\n" * 600)[: half - 16]
    with open(path, "wb") as f:
        for mb in range(size // MiB):
            rnd = os.urandom(MiB // 2)
            buf = bytearray(MiB)
            for i in range(MiB // cl):
                b = i * cl
                buf[b : b + half] = rnd[i * half : (i + 1) * half]
                buf[b + half : b + half + 16] = b"%016x" % (mb * (MiB // cl) + i)
                buf[b + half + 16 : b + cl] = text
            f.write(buf)


def qemu_io_writes(img: Path, clusters: list[int], cluster: int) -> None:
    cmds = "".join(f"write -q -P {(c % 255) + 1} {c * cluster} {cluster}\n" for c in sorted(clusters))
    r = subprocess.run(["qemu-io", str(img)], input=cmds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or "error" in r.stdout.lower() or r.stderr.strip():
        raise BenchError(f"qemu-io on {img} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def make_images(src: Path, work: Path, size: int, wanted: set[str]) -> list[dict]:
    """Builds `full` (always: the chain's base is a copy of it) and whichever of zstd, chain-top
    and xl2 are in `wanted`, each with its `qemu-img convert -O raw` reference."""
    data = work / "data.raw"
    log(f"generating {human(size)} of half-compressible data")
    make_data(data, size)
    images = []

    def img(name: str, desc: str) -> dict:
        d = {"name": name, "file": src / f"{name}.qcow2", "desc": desc}
        images.append(d)
        return d

    log("full: qcow2, 64 KiB clusters, every cluster written")
    full = img("full", "64 KiB clusters, fully written")
    run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=64k", str(data), str(full["file"])])

    if "zstd" in wanted:
        log("zstd: the same, every cluster zstd-compressed")
        z = img("zstd", "64 KiB clusters, zstd-compressed")
        run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=64k,compression_type=zstd",
             str(data), str(z["file"])])

    if "chain-top" in wanted:
        log("chain: top -> mid -> base, top and mid each hold 25% of clusters")
        base, mid = src / "chain-base.qcow2", src / "chain-mid.qcow2"
        shutil.copyfile(full["file"], base)
        top = img("chain-top", "top(25%) -> mid(25%) -> base(100%), 64 KiB clusters")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", base.name, "-F", "qcow2",
             str(mid)])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", mid.name, "-F", "qcow2",
             str(top["file"])])
        n = size // (64 * 1024)
        order = list(range(n))
        random.Random(20240611).shuffle(order)
        qemu_io_writes(mid, order[n // 4 : n // 2], 64 * 1024)
        qemu_io_writes(top["file"], order[: n // 4], 64 * 1024)

    if "xl2" in wanted:
        log("xl2: extended_l2=on, 2 MiB clusters, fully written")
        x = img("xl2", "extended_l2=on, 2 MiB clusters, fully written")
        run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", str(data),
             str(x["file"])])
    data.unlink()

    rawdir = work / "rawref"
    rawdir.mkdir()
    for d in images:
        d["raw"] = rawdir / f"{d['name']}.raw"
        log(f"reference: qemu-img convert -O raw {d['file'].name}")
        run(["qemu-img", "convert", "-O", "raw", str(d["file"]), str(d["raw"])])
        h = hashlib.sha256()
        with open(d["raw"], "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        d["sha256"] = h.hexdigest()
        d["qcow2_bytes"] = d["file"].stat().st_size
    return images


# ----------------------------------------------------------------------------------------------
# Mounts

def mount_qcowfs(qcowfs_bin: str, src: Path, mnt: Path, logdir: Path, logname: str = "qcowfs.log") -> subprocess.Popen:
    logfile = logdir / logname
    mnt.mkdir(exist_ok=True)
    with open(logfile, "a") as lf:
        # Backing files of the copy-on-write job lie outside the mounted directory: allow them,
        # as qemu-storage-daemon does (qcowfs keeps them inside SOURCE_DIR by default).
        lf.write(f"=== {time.strftime('%H:%M:%S')} {qcowfs_bin} -f -o allow_dir=/ {src} {mnt}\n")
        lf.flush()
        p = subprocess.Popen([qcowfs_bin, "-f", "-o", "allow_dir=/", src.as_posix(), mnt.as_posix()], stdout=lf, stderr=lf,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    CLEANUP.procs.append(p)
    CLEANUP.mounts.append(mnt)
    wait_mounted(mnt, p, "qcowfs", logfile)
    return p


def mount_qsd(image: Path, mntfile: Path, logdir: Path, aio: str, idx: int | str,
              writable: bool = False) -> subprocess.Popen:
    for part in (str(image), str(mntfile)):
        if "," in part:
            raise BenchError(f"path contains a comma, which qemu option syntax would need escaped: {part}")
    mntfile.touch()
    logfile = logdir / f"qsd-{idx}.log"
    if writable:
        # Read-write image; its backing chain (if any) is opened read-only from the header.
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file0,filename={image},aio={aio}",
               "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
               "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={mntfile},writable=on"]
    else:
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file0,filename={image},aio={aio},read-only=on",
               "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,read-only=on",
               "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={mntfile},writable=off"]
    with open(logfile, "a") as lf:
        lf.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        lf.flush()
        p = subprocess.Popen(cmd, stdout=lf, stderr=lf, stdin=subprocess.DEVNULL, start_new_session=True)
    CLEANUP.procs.append(p)
    CLEANUP.mounts.append(mntfile)
    wait_mounted(mntfile, p, "qemu-storage-daemon", logfile)
    return p


def check_alive(procs: dict[str, subprocess.Popen]) -> None:
    for what, p in procs.items():
        if p.poll() is not None:
            raise BenchError(f"{what} exited unexpectedly with status {p.returncode}")


def direct_io_works(path: Path) -> bool:
    r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4096", "count=4", "iflag=direct"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def forget(proc: subprocess.Popen, mnt: Path) -> None:
    """Drops a cleanly stopped daemon and its mount point from the cleanup lists."""
    if proc in CLEANUP.procs:
        CLEANUP.procs.remove(proc)
    while mnt in CLEANUP.mounts:
        CLEANUP.mounts.remove(mnt)


def stop_qcowfs(proc: subprocess.Popen, mnt: Path, timeout: float = 600) -> None:
    """fusermount3 -u, then wait for the daemon to write everything back and exit by itself."""
    for attempt in range(20):
        if not is_mounted(mnt):
            break
        r = subprocess.run(["fusermount3", "-u", str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    else:
        raise BenchError(f"fusermount3 -u {mnt} keeps failing: {r.stdout.strip()}")
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"qcowfs did not exit within {timeout:.0f}s of the unmount of {mnt}") from None
    if rc != 0:
        raise BenchError(f"qcowfs exited with status {rc} after the unmount of {mnt}")
    forget(proc, mnt)


def stop_qsd(proc: subprocess.Popen, mnt: Path, timeout: float = 600) -> None:
    """SIGTERM: qemu-storage-daemon flushes and closes its images, removes the export and exits."""
    if proc.poll() is None:
        proc.terminate()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"qemu-storage-daemon did not exit within {timeout:.0f}s of SIGTERM") from None
    if rc != 0:
        raise BenchError(f"qemu-storage-daemon exited with status {rc} on SIGTERM")
    if is_mounted(mnt):
        raise BenchError(f"qemu-storage-daemon exited but {mnt} is still mounted")
    forget(proc, mnt)


def stop_all(procs: dict[str, subprocess.Popen], mounts: dict[str, Path]) -> None:
    for what, p in procs.items():
        if what == "qcowfs":
            stop_qcowfs(p, mounts[what])
        else:
            stop_qsd(p, mounts[what])


def direct_write_open_works(path: Path) -> bool:
    """Whether open(O_RDWR | O_DIRECT) works (nothing is written)."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return True


# ----------------------------------------------------------------------------------------------
# Measurements

def fio(path: Path, out: Path, *, rw: str, bs: str, engine: str, direct: bool, iodepth: int = 1,
        runtime: int | None = None) -> dict:
    cmd = ["fio", "--name=bench", f"--filename={path}", "--readonly", f"--rw={rw}", f"--bs={bs}",
           f"--ioengine={engine}", f"--direct={int(direct)}", f"--iodepth={iodepth}",
           "--output-format=json", f"--output={out}"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    return run_fio(cmd, path, out)["read"]


def run_fio(cmd: list[str], path: Path, out: Path) -> dict:
    """Runs an fio command line that ends in --output-format=json --output=OUT; returns its job."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = json.loads(out.read_text())["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        job = None
    if r.returncode != 0 or job is None or job.get("error", 0) != 0:
        err = job.get("error") if job else "?"
        raise BenchError(f"fio failed on {path} (exit {r.returncode}, job error {err}): {' '.join(cmd)}\n"
                         f"{r.stderr[-2000:]}{r.stdout[-2000:]}")
    return job


def first_difference(ref: Path, other: Path) -> str:
    r = subprocess.run(["cmp", str(ref), str(other)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r.stdout.strip() or f"cmp exit {r.returncode}"


def measure(metric: str, target: str, path: Path, image: dict, ctx: dict) -> float:
    out = ctx["work"] / "fio.json"
    rt = ctx["runtime"]
    if metric == "sha256":
        t0 = time.perf_counter()
        r = subprocess.run(["sha256sum", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise BenchError(f"sha256sum of {path} ({target}) failed: {r.stderr.strip()}")
        digest = r.stdout.split()[0]
        if digest != image["sha256"]:
            raise BenchError(
                f"WRONG DATA from {target} for image {image['name']}: sha256 {digest} != reference "
                f"{image['sha256']} (qemu-img convert -O raw); first difference: "
                f"{first_difference(image['raw'], path)}")
        return dt
    if metric == "seq":
        return fio(path, out, rw="read", bs="1M", engine="psync", direct=False)["bw_bytes"] / MiB
    if metric == "rand1":
        return fio(path, out, rw="randread", bs="4k", engine="psync", direct=False, runtime=rt)["iops"]
    if metric == "rand16":
        return fio(path, out, rw="randread", bs="4k", engine="libaio", direct=True, iodepth=16, runtime=rt)["iops"]
    raise ValueError(metric)


METRICS = {
    # key: (title, unit, higher_is_better)
    "sha256": ("cold sha256sum, whole file", "s", False),
    "seq": ("seq read 1M psync buffered", "MiB/s", True),
    "rand1": ("rand 4k psync buffered QD1", "IOPS", True),
    "rand16": ("rand 4k libaio O_DIRECT QD16", "IOPS", True),
}


def spread(samples: list[float]) -> float:
    m = statistics.median(samples)
    return (max(samples) - min(samples)) / 2 / m * 100 if m else 0.0


def fmt_val(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "MiB/s":
        return f"{v:.0f}"
    return f"{v:.0f}"


def print_rows(heading: str, rows: list[tuple[str, str, bool]], res: dict, reps: int, notes: list[str],
               width: int = 30) -> None:
    """rows: (metric key, title, unit, higher_is_better) in order; res: key -> per-target samples."""
    print(f"\n== {heading} ==")
    head = f"{'metric':<{width}} {'unit':<6}"
    for t in TARGETS:
        head += f" {TARGET_TITLES[t]:>14}"
    head += f" {'qcowfs/qsd':>11}  better"
    print(head)
    print("-" * len(head))
    for key, title, unit, higher in rows:
        r = res.get(key)
        if r is None:
            continue
        line = f"{title:<{width}} {unit:<6}"
        for t in TARGETS:
            med = r[t]["median"]
            cell = fmt_val(med, unit)
            if reps > 1 and med is not None:
                cell += f" ±{spread(r[t]['samples']):.0f}%"
            if r[t].get("wrong_data_reps"):
                cell += " !"
            line += f" {cell:>14}"
        ratio = r.get("ratio")
        line += f" {('%.2fx' % ratio) if ratio else '-':>11}  {'higher' if higher else 'lower'}"
        print(line)
    for n in notes:
        print(f"  note: {n}")


def print_table(image: dict, res: dict, reps: int, notes: list[str]) -> None:
    print_rows(f"{image['name']}.raw: {image['desc']} ({human(image['size'])} virtual, "
               f"{image['qcow2_bytes'] / MiB:.0f} MiB qcow2)",
               [(k, *v) for k, v in METRICS.items()], res, reps, notes)


# ----------------------------------------------------------------------------------------------
# Write benchmark

WRITE_SEED = 20240611

# key: title, unit, template, fio job. "io" is the number of bytes written as a fraction of the
# image size (a fixed amount, never time-based, so both sides write exactly the same bytes).
WRITE_JOBS = {
    "wseq": {"title": "seq write 1M psync, empty image", "unit": "MiB/s", "template": "empty",
             "rw": "write", "bs": "1M", "engine": "psync", "direct": False, "iodepth": 1, "io": 1.0},
    "wover": {"title": "seq overwrite 1M psync, full img", "unit": "MiB/s", "template": "full",
              "rw": "write", "bs": "1M", "engine": "psync", "direct": False, "iodepth": 1, "io": 1.0},
    "wrand1": {"title": "rand 4k psync QD1 fsync=32, full", "unit": "IOPS", "template": "full",
               "rw": "randwrite", "bs": "4k", "engine": "psync", "direct": False, "iodepth": 1, "io": 1 / 16,
               "fsync": 32},
    "wrand16": {"title": "rand 4k libaio O_DIRECT QD16, empty", "unit": "IOPS", "template": "empty",
                "rw": "randwrite", "bs": "4k", "engine": "libaio", "direct": True, "iodepth": 16, "io": 1 / 16},
    "wcow": {"title": "rand 64k@32k psync QD1, chain-top CoW", "unit": "IOPS", "template": "chain",
             "rw": "randwrite", "bs": "64k", "engine": "psync", "direct": False, "iodepth": 1, "io": 1 / 8,
             "offset": 32 * 1024},
}


def write_templates(work: Path, src: Path, rawref: Path, size: int, needed: set[str]) -> dict:
    """template name -> (qcow2 file, raw file with the same content)."""
    tpl = work / "wtpl"
    tpl.mkdir()
    out = {}
    if "empty" in needed:
        e, er = tpl / "empty.qcow2", tpl / "empty.raw"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(e), str(size)])
        with open(er, "wb") as f:
            f.truncate(size)
        out["empty"] = (e, er)
    if "full" in needed:
        out["full"] = (src / "full.qcow2", rawref / "full.raw")
    if "chain" in needed:
        # A copy of chain-top whose backing file name is the absolute path of chain-mid in src, so
        # copies of it work from any directory; mid and base are only ever opened read-only.
        c = tpl / "chain-top.qcow2"
        shutil.copyfile(src / "chain-top.qcow2", c)
        run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str((src / "chain-mid.qcow2").resolve()), str(c)])
        out["chain"] = (c, rawref / "chain-top.raw")
    return out


def fio_write(path: Path, out: Path, job: dict, size: int) -> dict:
    offset = job.get("offset", 0)
    span = size - 2 * offset if offset else size
    io = int(size * job["io"])
    bs = parse_size(job["bs"])
    io -= io % bs
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={job['rw']}", f"--bs={job['bs']}",
           f"--ioengine={job['engine']}", f"--direct={int(job['direct'])}", f"--iodepth={job['iodepth']}",
           f"--offset={offset}", f"--size={span}", f"--io_size={io}",
           # Deterministic data and offsets: the same bytes land at the same places on every side.
           "--randrepeat=1", f"--randseed={WRITE_SEED}", "--refill_buffers=1", "--scramble_buffers=0",
           # Never fallocate or create: write into the existing disk, and end durable.
           "--fallocate=none", "--allow_file_create=0", "--end_fsync=1",
           "--output-format=json", f"--output={out}"]
    if job.get("fsync"):
        cmd.append(f"--fsync={job['fsync']}")
    w = run_fio(cmd, path, out)["write"]
    if w["io_bytes"] != io:
        raise BenchError(f"fio wrote {w['io_bytes']} bytes to {path}, expected {io}: {' '.join(cmd)}")
    return w


def qemu_img_check(img: Path, what: str) -> None:
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(img)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise BenchError(f"qemu-img check of the image {what} wrote exited with {r.returncode} "
                         f"(1 = check failed, 2 = corruptions, 3 = leaked clusters): {img}\n{r.stdout[-3000:]}")


def qemu_img_compare(a: Path, fa: str, b: Path, fb: str) -> tuple[bool, str]:
    r = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, str(a), str(b)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode not in (0, 1):
        raise BenchError(f"qemu-img compare {a} {b} failed with exit {r.returncode}:\n{r.stdout[-2000:]}")
    return r.returncode == 0, r.stdout.strip()


def bench_writes(args, work: Path, src: Path, rawref: Path, logs: Path, size: int, reps: int,
                 qcowfs_bin: str) -> tuple[dict, list[str]]:
    keys = [k for k in WRITE_JOBS if not args.write_jobs or k in args.write_jobs.split(",")]
    if not keys:
        raise BenchError(f"--write-jobs {args.write_jobs}: no such job (have {', '.join(WRITE_JOBS)})")
    templates = write_templates(work, src, rawref, size, {WRITE_JOBS[k]["template"] for k in keys})
    rundir, qmnt, smnt = work / "wrun", work / "wmnt-qcowfs", work / "wmnt-qsd.raw"
    fio_out = work / "fio.json"
    results, notes = {}, []
    for key in keys:
        job = WRITE_JOBS[key]
        tq, tr = templates[job["template"]]
        samples = {t: [] for t in TARGETS}
        skipped = False
        qsd_wrong: list[int] = []
        for rep in range(reps):
            order = ("qcowfs", "qsd", "raw") if rep % 2 == 0 else ("qsd", "qcowfs", "raw")
            shutil.rmtree(rundir, ignore_errors=True)
            files = {}
            for t in order:
                d = rundir / t
                d.mkdir(parents=True)
                # The fresh copy, outside the timed part; drop_caches below syncs it first.
                files[t] = d / ("disk.raw" if t == "raw" else "disk.qcow2")
                run(["cp", "--sparse=always", str(tr if t == "raw" else tq), str(files[t])])
                if t == "qcowfs":
                    proc = mount_qcowfs(qcowfs_bin, d, qmnt, logs, "qcowfs-write.log")
                    path = qmnt / "disk.raw"
                    mnt = qmnt
                elif t == "qsd":
                    proc = mount_qsd(files[t], smnt, logs, args.qsd_aio, "write", writable=True)
                    path = smnt
                    mnt = smnt
                else:
                    proc, path, mnt = None, files[t], None
                if proc is not None:
                    st = path.stat().st_size if path.exists() else None
                    if st != size:
                        raise BenchError(f"{t} shows the write image as {path} with size {st}, expected {size}")
                if job["direct"] and not direct_write_open_works(path):
                    notes.append(f"{job['title']}: skipped, open(O_RDWR|O_DIRECT) fails on {t}")
                    skipped = True
                if not skipped:
                    drop_caches()
                    w = fio_write(path, fio_out, job, size)
                    v = w["bw_bytes"] / MiB if job["unit"] == "MiB/s" else w["iops"]
                    samples[t].append(v)
                if t == "qcowfs":
                    stop_qcowfs(proc, mnt)
                elif t == "qsd":
                    stop_qsd(proc, mnt)
                if skipped:
                    break
                if t != "raw":
                    qemu_img_check(files[t], f"{t} ({key}, rep {rep + 1})")
                log(f"writes    {key:<7} rep {rep + 1}/{reps} {t:<6} {v:10.2f} {job['unit']}")
            if skipped:
                break
            # The raw file is the reference: fio's data and offsets are fixed, so the same job on a raw
            # file on the host disk holds exactly the bytes fio wrote.
            qs_same, qs_msg = qemu_img_compare(files["qcowfs"], "qcow2", files["qsd"], "qcow2")
            q_same, q_msg = qemu_img_compare(files["qcowfs"], "qcow2", files["raw"], "raw")
            where = f"rerun with --keep to keep the images in {rundir}"
            if not q_same:
                s_same, s_msg = qemu_img_compare(files["qsd"], "qcow2", files["raw"], "raw")
                raise BenchError(f"WRONG DATA after write job {key} (rep {rep + 1}): the qcowfs result differs from "
                                 f"the same fio job on a raw file: {q_msg}; qcowfs vs qsd: {qs_msg}; "
                                 f"qsd vs raw: {s_msg} ({where})")
            if not qs_same:
                # qcowfs holds what fio wrote and qsd does not: qemu-storage-daemon's fault.
                msg = (f"{key} rep {rep + 1}: qsd's result differs from qcowfs's and from the raw reference "
                       f"({qs_msg.rstrip('!')}); qcowfs's is identical to the raw reference")
                if args.strict_qsd:
                    raise BenchError(f"WRONG DATA from qemu-storage-daemon: {msg} ({where})")
                log(f"WARNING: {msg}")
                qsd_wrong.append(rep + 1)
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        if skipped:
            continue
        r = {t: {"samples": samples[t], "median": statistics.median(samples[t]) if samples[t] else None}
             for t in TARGETS}
        q, s = r["qcowfs"]["median"], r["qsd"]["median"]
        r["ratio"] = q / s if q and s else None
        if qsd_wrong:
            r["qsd"]["wrong_data_reps"] = qsd_wrong
            notes.append(f"{job['title']}: ! qsd's image did NOT hold the bytes fio wrote in rep(s) "
                         f"{','.join(map(str, qsd_wrong))} of {reps} (qcowfs's did; qemu-img compare against the "
                         "raw-host run); with concurrent writes this is QEMU's FUSE export reusing its request "
                         "buffer while a write is still in flight (seen with QEMU 7.2; upstream fix \"fuse: Copy write "
                         "buffer content before polling\"), so its number is not a fair comparison")
        results[key] = r
    return results, notes


# ----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", help="virtual size of each test image (default 1G; 128M with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small images, 1 repetition, short fio runs")
    ap.add_argument("--reps", type=int, help="repetitions per measurement, median taken (default 3; 1 with --quick)")
    ap.add_argument("--runtime", type=int, help="seconds per random-read fio job (default 10; 2 with --quick)")
    ap.add_argument("--qsd-aio", default="threads", choices=["threads", "native", "io_uring"],
                    help="aio= of qemu-storage-daemon's file node (default threads, QEMU's default)")
    ap.add_argument("--only", help="comma-separated image names for the read benchmark (full,zstd,chain-top,xl2)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--reads-only", action="store_true", help="run only the read benchmark")
    mode.add_argument("--writes-only", action="store_true", help="run only the write benchmark")
    ap.add_argument("--strict-qsd", action="store_true",
                    help="also stop when only qemu-storage-daemon's write result is wrong (default: flag it with !)")
    ap.add_argument("--write-jobs", help=f"comma-separated write jobs to run ({','.join(WRITE_JOBS)})")
    ap.add_argument("--json", metavar="FILE", help="also write all samples and medians to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (images, logs) for inspection")
    args = ap.parse_args()

    size = parse_size(args.size or ("128M" if args.quick else "1G"))
    size -= size % (2 * MiB)
    if size < 16 * MiB:
        ap.error("--size must be at least 16M")
    reps = args.reps or (1 if args.quick else 3)
    runtime = args.runtime or (2 if args.quick else 10)
    qcowfs_bin = os.environ.get("QCOWFS_BIN") or str(REPO / "build" / "qcowfs")
    if not os.access(qcowfs_bin, os.X_OK):
        ap.error(f"qcowfs binary {qcowfs_bin} is missing; build it or set QCOWFS_BIN (run.sh does both)")
    if os.geteuid() != 0:
        ap.error("must run as root (drop_caches, FUSE mounts): sudo bash contrib/bench/run.sh")
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon", "fio", "fusermount3", "sha256sum", "cmp", "dd"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (run.sh installs it)")

    return guarded("qcowfs-bench.", args.keep, lambda work: bench(args, work, size, reps, runtime, qcowfs_bin))


def guarded(prefix: str, keep: bool, body) -> int:
    """Runs body(work) in a fresh /tmp/PREFIX* directory with signal handlers and CLEANUP in place;
    a BenchError ends it with BENCHMARK FAILED and the tails of the daemon logs in work/logs."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(CLEANUP)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if not keep:
        CLEANUP.dirs.append(work)
    else:
        log(f"keeping {work}")
    try:
        return body(work)
    except BenchError as e:
        print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
        logs = sorted((work / "logs").glob("*.log")) if (work / "logs").exists() else []
        for lf in logs:
            text = lf.read_text(errors="replace").strip()
            if text:
                print(f"--- {lf.name} (last lines) ---\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        CLEANUP()


def bench(args, work: Path, size: int, reps: int, runtime: int, qcowfs_bin: str) -> int:
    info = machine_info(qcowfs_bin)
    info["qsd_aio"] = args.qsd_aio
    src, logs = work / "src", work / "logs"
    src.mkdir()
    logs.mkdir()
    t_start = time.time()
    do_reads, do_writes = not args.writes_only, not args.reads_only
    read_names = set(args.only.split(",")) if args.only else {"full", "zstd", "chain-top", "xl2"}
    wanted = set(read_names) if do_reads else set()
    if do_writes:
        wanted |= {"full", "chain-top"}
    images = make_images(src, work, size, wanted)
    for d in images:
        d["size"] = size

    print("qcowfs vs qemu-storage-daemon FUSE export: "
          + " and ".join(x for x, on in (("read", do_reads), ("write", do_writes)) if on) + " benchmark")
    for k in ("nproc", "cpu", "memory", "kernel", "loadavg_start", "qemu", "qemu_img", "fio", "qcowfs", "qcowfs_bin",
              "source_tree"):
        print(f"  {k:<14} {info[k]}")
    print(f"  {'settings':<14} image size {human(size)}, median of {reps} rep(s), qsd aio={args.qsd_aio}, "
          "page cache dropped before every run")
    print("  ratio qcowfs/qsd: for MiB/s and IOPS higher is better (>1 = qcowfs faster); "
          "for seconds lower is better (<1 = qcowfs faster)")
    sys.stdout.flush()

    doc = {"machine": info, "size": size, "reps": reps, "runtime": runtime}
    if do_reads:
        read_images = [d for d in images if d["name"] in read_names]
        if not read_images:
            raise BenchError(f"--only {args.only}: no such image")
        doc["metrics"] = {k: {"title": v[0], "unit": v[1], "higher_is_better": v[2]} for k, v in METRICS.items()}
        doc["images"] = bench_reads(args, work, src, logs, read_images, size, reps, runtime, qcowfs_bin, info)
    if do_writes:
        print(f"\nWrite benchmark: a fresh copy of the template image per side and run; fio data fixed by "
              f"--randseed={WRITE_SEED}; every job ends with fsync; after each run: unmount, qemu-img check, "
              "qemu-img compare qcowfs vs qsd vs raw")
        sys.stdout.flush()
        wres, wnotes = bench_writes(args, work, src, work / "rawref", logs, size, reps, qcowfs_bin)
        print_rows(f"writes ({human(size)} disks, 64 KiB clusters; qcowfs default options, qsd writable=on)",
                   [(k, j["title"], j["unit"], True) for k, j in WRITE_JOBS.items()], wres, reps, wnotes, width=38)
        if any(r["qsd"].get("wrong_data_reps") for r in wres.values()):
            print("\nAll write results passed qemu-img check; qemu-img compare found qcowfs = raw-host after every "
                  "run, and qsd = both except where marked !.")
        else:
            print("\nAll write results passed qemu-img check, and qemu-img compare found qcowfs = qsd = raw-host "
                  "after every run.")
        doc["write_jobs"] = {k: {kk: vv for kk, vv in j.items()} for k, j in WRITE_JOBS.items()}
        doc["writes"] = {"metrics": wres, "notes": wnotes}

    print("\nSpeed of qcowfs relative to qemu-storage-daemon (>1 = qcowfs faster, times inverted):")
    if do_reads:
        results = doc["images"]
        keys = [k for k in METRICS if any(k in results[n]["metrics"] for n in results)]
        print(f"  {'image':<10}" + "".join(f" {k:>8}" for k in keys))
        for name, r in results.items():
            cells = []
            for k in keys:
                ratio = r["metrics"].get(k, {}).get("ratio")
                if ratio and not METRICS[k][2]:
                    ratio = 1 / ratio
                cells.append(f" {ratio:>7.2f}x" if ratio else f" {'-':>8}")
            print(f"  {name:<10}" + "".join(cells))
    if do_writes:
        wres = doc["writes"]["metrics"]
        keys = [k for k in WRITE_JOBS if k in wres]
        print(f"  {'writes':<10}" + "".join(f" {k:>8}" for k in keys))
        print(f"  {'':<10}" + "".join(
            (f" {wres[k]['ratio']:>7.2f}x" if wres[k]["ratio"] else f" {'-':>8}")
            + ("!" if wres[k]["qsd"].get("wrong_data_reps") else "") for k in keys))
    info["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"\n  load average at start {info['loadavg_start']}, at end {info['loadavg_end']}; "
          f"total {time.time() - t_start:.0f}s")

    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


def bench_reads(args, work: Path, src: Path, logs: Path, images: list[dict], size: int, reps: int, runtime: int,
                qcowfs_bin: str, info: dict) -> dict:
    qmnt = work / "mnt-qcowfs"
    procs = {"qcowfs": mount_qcowfs(qcowfs_bin, src, qmnt, logs)}
    mounts = {"qcowfs": qmnt}
    qsdmnt = work / "mnt-qsd"
    qsdmnt.mkdir()
    for i, d in enumerate(images):
        d["paths"] = {"qcowfs": qmnt / f"{d['name']}.raw", "qsd": qsdmnt / f"{d['name']}.raw", "raw": d["raw"]}
        what = f"qemu-storage-daemon ({d['name']})"
        procs[what] = mount_qsd(d["file"], d["paths"]["qsd"], logs, args.qsd_aio, i)
        mounts[what] = d["paths"]["qsd"]
        if not d["paths"]["qcowfs"].exists():
            listing = ", ".join(sorted(p.name for p in qmnt.iterdir()))
            raise BenchError(f"qcowfs does not show {d['paths']['qcowfs'].name}; mount has: {listing}")
        for t in ("qcowfs", "qsd"):
            st = d["paths"][t].stat().st_size
            if st != size:
                raise BenchError(f"{t} shows {d['name']}.raw with size {st}, expected {size}")

    info["read_ahead_kb"] = {"qcowfs": read_ahead_kb(images[0]["paths"]["qcowfs"]),
                             "qsd": read_ahead_kb(images[0]["paths"]["qsd"]),
                             "raw": read_ahead_kb(images[0]["raw"])}
    direct_ok = {t: all(direct_io_works(d["paths"][t]) for d in images) for t in TARGETS}

    print(f"\nRead benchmark: random-read runtime {runtime}s; read_ahead_kb qcowfs {info['read_ahead_kb']['qcowfs']}, "
          f"qsd {info['read_ahead_kb']['qsd']}, host disk {info['read_ahead_kb']['raw']}")
    sys.stdout.flush()

    ctx = {"work": work, "runtime": runtime}
    results = {}
    for d in images:
        res, notes = {}, []
        for key in METRICS:
            if key == "rand16" and not (direct_ok["qcowfs"] and direct_ok["qsd"]):
                bad = [t for t in ("qcowfs", "qsd") if not direct_ok[t]]
                notes.append(f"libaio O_DIRECT QD16 skipped: O_DIRECT open/read fails on {', '.join(bad)}")
                continue
            samples = {t: [] for t in TARGETS}
            for rep in range(reps):
                # Alternate which FUSE mount goes first so slow drift hits both alike.
                order = ("qcowfs", "qsd", "raw") if rep % 2 == 0 else ("qsd", "qcowfs", "raw")
                for t in order:
                    if key == "rand16" and not direct_ok[t]:
                        continue
                    check_alive(procs)
                    drop_caches()
                    v = measure(key, t, d["paths"][t], d, ctx)
                    samples[t].append(v)
                    log(f"{d['name']:<9} {key:<6} rep {rep + 1}/{reps} {t:<6} {v:10.2f} {METRICS[key][1]}")
            r = {t: {"samples": samples[t], "median": statistics.median(samples[t]) if samples[t] else None}
                 for t in TARGETS}
            q, s = r["qcowfs"]["median"], r["qsd"]["median"]
            r["ratio"] = q / s if q and s else None
            res[key] = r
        check_alive(procs)
        results[d["name"]] = {"desc": d["desc"], "qcow2_bytes": d["qcow2_bytes"], "sha256": d["sha256"],
                              "metrics": res, "notes": notes}
        print_table(d, res, reps, notes)
        sys.stdout.flush()

    print("\nAll reads matched the qemu-img convert -O raw reference (sha256 checked on every sha256sum run).")
    # The read mounts go before the write benchmark starts its own daemons.
    stop_all(procs, mounts)
    return results

if __name__ == "__main__":
    sys.exit(main())
