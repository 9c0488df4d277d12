#!/usr/bin/env python3
"""Side-by-side read benchmark: qcowfs vs. qemu-storage-daemon's FUSE export (vs. a raw file).

Not part of the test suite. Run it through contrib/bench/run.sh (which installs the tools and
builds qcowfs), as root: it drops the page cache and mounts FUSE filesystems.

For every test image it mounts the image directory once with qcowfs and each image with its own
`qemu-storage-daemon --export type=fuse`, checks that both show exactly the bytes of
`qemu-img convert -O raw`, and then measures, alternating the two mounts and dropping the page
cache before every run:

  * cold sha256sum of the whole file (seconds, lower is better; doubles as the correctness check)
  * sequential read, fio bs=1M psync buffered (MiB/s)
  * random 4 KiB read, fio psync buffered, queue depth 1 (IOPS)
  * random 4 KiB read, fio libaio O_DIRECT, queue depth 16 (IOPS; skipped if O_DIRECT fails)

The same jobs on the raw conversion on the host disk give the upper bound. Each value is the
median of --reps runs. Standard library only.
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
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
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
    }


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


def make_images(src: Path, work: Path, size: int) -> list[dict]:
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

    log("zstd: the same, every cluster zstd-compressed")
    z = img("zstd", "64 KiB clusters, zstd-compressed")
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=64k,compression_type=zstd",
         str(data), str(z["file"])])

    log("chain: top -> mid -> base, top and mid each hold 25% of clusters")
    base, mid = src / "chain-base.qcow2", src / "chain-mid.qcow2"
    shutil.copyfile(full["file"], base)
    top = img("chain-top", "top(25%) -> mid(25%) -> base(100%), 64 KiB clusters")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", base.name, "-F", "qcow2", str(mid)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", mid.name, "-F", "qcow2",
         str(top["file"])])
    n = size // (64 * 1024)
    order = list(range(n))
    random.Random(20240611).shuffle(order)
    qemu_io_writes(mid, order[n // 4 : n // 2], 64 * 1024)
    qemu_io_writes(top["file"], order[: n // 4], 64 * 1024)

    log("xl2: extended_l2=on, 2 MiB clusters, fully written")
    x = img("xl2", "extended_l2=on, 2 MiB clusters, fully written")
    run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", str(data), str(x["file"])])
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

def mount_qcowfs(qcowfs_bin: str, src: Path, mnt: Path, logdir: Path) -> subprocess.Popen:
    logfile = logdir / "qcowfs.log"
    mnt.mkdir()
    with open(logfile, "w") as lf:
        p = subprocess.Popen([qcowfs_bin, "-f", src.as_posix(), mnt.as_posix()], stdout=lf, stderr=lf,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    CLEANUP.procs.append(p)
    CLEANUP.mounts.append(mnt)
    wait_mounted(mnt, p, "qcowfs", logfile)
    return p


def mount_qsd(image: Path, mntfile: Path, logdir: Path, aio: str, idx: int) -> subprocess.Popen:
    for part in (str(image), str(mntfile)):
        if "," in part:
            raise BenchError(f"path contains a comma, which qemu option syntax would need escaped: {part}")
    mntfile.touch()
    logfile = logdir / f"qsd-{idx}.log"
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=file,node-name=file0,filename={image},aio={aio},read-only=on",
           "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,read-only=on",
           "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={mntfile},writable=off"]
    with open(logfile, "w") as lf:
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


# ----------------------------------------------------------------------------------------------
# Measurements

def fio(path: Path, out: Path, *, rw: str, bs: str, engine: str, direct: bool, iodepth: int = 1,
        runtime: int | None = None) -> dict:
    cmd = ["fio", "--name=bench", f"--filename={path}", "--readonly", f"--rw={rw}", f"--bs={bs}",
           f"--ioengine={engine}", f"--direct={int(direct)}", f"--iodepth={iodepth}",
           "--output-format=json", f"--output={out}"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = json.loads(out.read_text())["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        job = None
    if r.returncode != 0 or job is None or job.get("error", 0) != 0:
        err = job.get("error") if job else "?"
        raise BenchError(f"fio failed on {path} (exit {r.returncode}, job error {err}): {' '.join(cmd)}\n"
                         f"{r.stderr[-2000:]}{r.stdout[-2000:]}")
    return job["read"]


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


def print_table(image: dict, res: dict, reps: int, notes: list[str]) -> None:
    print(f"\n== {image['name']}.raw: {image['desc']} ({human(image['size'])} virtual, "
          f"{image['qcow2_bytes'] / MiB:.0f} MiB qcow2) ==")
    head = f"{'metric':<30} {'unit':<6}"
    for t in TARGETS:
        head += f" {TARGET_TITLES[t]:>14}"
    head += f" {'qcowfs/qsd':>11}  better"
    print(head)
    print("-" * len(head))
    for key, (title, unit, higher) in METRICS.items():
        r = res.get(key)
        if r is None:
            continue
        line = f"{title:<30} {unit:<6}"
        for t in TARGETS:
            med = r[t]["median"]
            cell = fmt_val(med, unit)
            if reps > 1 and med is not None:
                cell += f" ±{spread(r[t]['samples']):.0f}%"
            line += f" {cell:>14}"
        ratio = r.get("ratio")
        line += f" {('%.2fx' % ratio) if ratio else '-':>11}  {'higher' if higher else 'lower'}"
        print(line)
    for n in notes:
        print(f"  note: {n}")


# ----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", help="virtual size of each test image (default 1G; 128M with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small images, 1 repetition, short fio runs")
    ap.add_argument("--reps", type=int, help="repetitions per measurement, median taken (default 3; 1 with --quick)")
    ap.add_argument("--runtime", type=int, help="seconds per random-read fio job (default 10; 2 with --quick)")
    ap.add_argument("--qsd-aio", default="threads", choices=["threads", "native", "io_uring"],
                    help="aio= of qemu-storage-daemon's file node (default threads, QEMU's default)")
    ap.add_argument("--only", help="comma-separated image names to run (full,zstd,chain-top,xl2)")
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

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(CLEANUP)

    work = Path(tempfile.mkdtemp(prefix="qcowfs-bench.", dir="/tmp"))
    if not args.keep:
        CLEANUP.dirs.append(work)
    else:
        log(f"keeping {work}")
    try:
        return bench(args, work, size, reps, runtime, qcowfs_bin)
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
    src, logs = work / "src", work / "logs"
    src.mkdir()
    logs.mkdir()
    t_start = time.time()
    images = make_images(src, work, size)
    for d in images:
        d["size"] = size
    if args.only:
        wanted = set(args.only.split(","))
        images = [d for d in images if d["name"] in wanted]
        if not images:
            raise BenchError(f"--only {args.only}: no such image")

    qmnt = work / "mnt-qcowfs"
    procs = {"qcowfs": mount_qcowfs(qcowfs_bin, src, qmnt, logs)}
    qsdmnt = work / "mnt-qsd"
    qsdmnt.mkdir()
    for i, d in enumerate(images):
        d["paths"] = {"qcowfs": qmnt / f"{d['name']}.raw", "qsd": qsdmnt / f"{d['name']}.raw", "raw": d["raw"]}
        procs[f"qemu-storage-daemon ({d['name']})"] = mount_qsd(d["file"], d["paths"]["qsd"], logs, args.qsd_aio, i)
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
    info["qsd_aio"] = args.qsd_aio
    direct_ok = {t: all(direct_io_works(d["paths"][t]) for d in images) for t in TARGETS}

    print("qcowfs vs qemu-storage-daemon FUSE export: read benchmark")
    for k in ("nproc", "cpu", "memory", "kernel", "loadavg_start", "qemu", "qemu_img", "fio", "qcowfs", "qcowfs_bin", "source_tree"):
        print(f"  {k:<14} {info[k]}")
    print(f"  {'read_ahead_kb':<14} qcowfs {info['read_ahead_kb']['qcowfs']}, qsd {info['read_ahead_kb']['qsd']}, "
          f"host disk {info['read_ahead_kb']['raw']}")
    print(f"  {'settings':<14} image size {human(size)}, median of {reps} rep(s), random-read runtime {runtime}s, "
          f"qsd aio={args.qsd_aio}, page cache dropped before every run")
    print("  ratio qcowfs/qsd: for MiB/s and IOPS higher is better (>1 = qcowfs faster); "
          "for seconds lower is better (<1 = qcowfs faster)")
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
    # One line per image: qcowfs speed relative to qsd, >1 always meaning qcowfs is faster.
    print("\nSpeed of qcowfs relative to qemu-storage-daemon (>1 = qcowfs faster, times inverted):")
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
    info["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"\n  load average at start {info['loadavg_start']}, at end {info['loadavg_end']}; "
          f"total {time.time() - t_start:.0f}s")

    if args.json:
        doc = {"machine": info, "size": size, "reps": reps, "runtime": runtime,
               "metrics": {k: {"title": v[0], "unit": v[1], "higher_is_better": v[2]} for k, v in METRICS.items()},
               "images": results}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
