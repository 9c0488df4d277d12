#!/usr/bin/env python3
"""Issue 9's side-by-side benchmark: qcowfs against qemu-storage-daemon's FUSE export, a FUSE ceiling,
and (on the read jobs) qemu-nbd + nbdfuse and libqcow's qcowmount, in one run.

Not part of the test suite. Run it through contrib/bench/run.sh (installs the tools), as root.

Targets:
  qcowfs     qcowfs (default options, -o allow_dir=/) on the image's directory
  qsd        qemu-storage-daemon --export type=fuse (QEMU's defaults: aio=threads, cache=writeback)
  ceiling    ceiling.c, a minimal multi-threaded libfuse passthrough of the raw file (compiled here):
             the fastest a FUSE daemon serves these bytes, with no image format in between
  nbdfuse    qemu-nbd --read-only on a unix socket + nbdfuse (read jobs only)
  qcowmount  libqcow's qcowmount (read jobs only; images it cannot open are marked n/a)

Jobs (fio with O_DIRECT on the exposed file, host page cache warm, like the issue's table):
  read:  seq read 1M QD8, 4k random read QD32 and QD1 (psync), 1M seq read of a zstd image,
         sha256sum of the whole disk, `cp --sparse=always` of a mostly empty large disk
  write: seq write 1M QD8 into an empty image, 4k random write QD32 into an empty image,
         copy-on-write (4k random write QD32 over a backing file), 70/30 random read/write mix
         (4k QD32) on a full image, dd of the whole disk into an empty image, and
         mkfs.ext4 + untar + read-back on a loop device over the exposed file

Every write run starts from a fresh copy of its template and a fresh daemon; afterwards the daemon is
stopped, `qemu-img check` must pass and `qemu-img compare` must find the result identical to the
same job run on a raw file on the host (fio's data and offsets are fixed by its seed). Every
sha256sum must match the data, every sparse copy must compare equal to the raw disk, and the
read-back of the untarred tree must match the tree. Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (the shared helpers: mounts, cleanup, checks)
from bench import CLEANUP, MiB, GiB, BenchError, log, run, human, parse_size  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 20240611
READ_TARGETS = ("qcowfs", "qsd", "ceiling", "nbdfuse", "qcowmount")
WRITE_TARGETS = ("qcowfs", "qsd", "ceiling")

# key: title, unit ("MiB/s", "IOPS" higher is better; "s" lower is better), goals (speed ratio to qsd,
# fraction of the ceiling; None = no goal), kind.
JOBS = {
    "rseq": ("seq read 1M QD8", "MiB/s", (2.5, 0.60), "read"),
    "rr32": ("4k rand read QD32", "IOPS", (2.0, None), "read"),
    "rr1": ("4k rand read QD1 psync", "IOPS", (1.3, None), "read"),
    "zstd": ("zstd image seq read 1M QD8", "MiB/s", (1.5, None), "read"),
    "sha": ("sha256sum whole disk", "s", (1.0, None), "read"),
    "cp": ("cp --sparse=always", "s", (1.0, None), "read"),
    "wseq": ("seq write 1M QD8, empty", "MiB/s", (1.0, 0.80), "write"),
    "wr32": ("4k rand write QD32, empty", "IOPS", (1.5, None), "write"),
    "cow": ("copy-on-write 4k QD32", "IOPS", (2.0, None), "write"),
    "mix": ("4k rand 70/30 r/w QD32", "IOPS", (None, None), "write"),
    "dd": ("dd whole disk, empty", "s", (1.0, None), "write"),
    "fs": ("mkfs+untar+read-back", "s", (1.0, None), "write"),
}
# fio parameters of the fio jobs. Reads are time-based; writes write a fixed amount (a fraction of
# the disk), so every side ends with the same bytes.
FIO = {
    "rseq": dict(rw="read", bs="1M", engine="libaio", depth=8),
    "rr32": dict(rw="randread", bs="4k", engine="libaio", depth=32),
    "rr1": dict(rw="randread", bs="4k", engine="psync", depth=1),
    "zstd": dict(rw="read", bs="1M", engine="libaio", depth=8),
    "wseq": dict(rw="write", bs="1M", engine="libaio", depth=8, io=1.0, template="empty"),
    "wr32": dict(rw="randwrite", bs="4k", engine="libaio", depth=32, io=1 / 16, template="empty"),
    "cow": dict(rw="randwrite", bs="4k", engine="libaio", depth=32, io=1 / 16, template="cow"),
    "mix": dict(rw="randrw", bs="4k", engine="libaio", depth=32, io=1 / 8, template="full", mix=70),
}


# ----------------------------------------------------------------------------------------------
# Small helpers

def warm(path: Path) -> None:
    """Reads the data extents of a host file into the page cache (holes are skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                n = len(os.pread(fd, min(8 * MiB, hole - pos), pos))
                if n == 0:
                    break
                pos += n
    finally:
        os.close(fd)


def drop_file_cache(path: Path) -> None:
    """Drops the kernel's page cache of an exposed file, so buffered jobs start cold on the FUSE side
    while the host files behind it stay warm."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_write_bytes(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over every regular file's relative path and content, in sorted order."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file() or p.parent == root and name == "lost+found":
                continue
            h.update(str(p.relative_to(root)).encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(4 * MiB):
                    h.update(chunk)
    return h.hexdigest()


def fio(path: Path, out: Path, spec: dict, *, direct: bool, size: int, runtime: int | None, write: bool) -> dict:
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={spec['rw']}", f"--bs={spec['bs']}",
           f"--ioengine={spec['engine']}", f"--iodepth={spec['depth']}", f"--direct={int(direct)}",
           "--output-format=json", f"--output={out}"]
    if write:
        io = int(size * spec["io"])
        io -= io % parse_size(spec["bs"])
        cmd += [f"--size={size}", f"--io_size={io}", "--randrepeat=1", f"--randseed={SEED}", "--refill_buffers=1",
                "--scramble_buffers=0", "--fallocate=none", "--allow_file_create=0", "--end_fsync=1"]
        if "mix" in spec:
            cmd.append(f"--rwmixread={spec['mix']}")
    else:
        cmd += ["--readonly", f"--runtime={runtime}", "--time_based"]
    job = B.run_fio(cmd, path, out)
    if write and job["write"]["io_bytes"] + job["read"]["io_bytes"] != io:
        raise BenchError(f"fio moved {job['write']['io_bytes'] + job['read']['io_bytes']} bytes on {path}, "
                         f"expected {io}: {' '.join(cmd)}")
    return job


def fio_value(job: dict, unit: str, key: str) -> float:
    if unit == "MiB/s":
        return (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / MiB
    return job["read"]["iops"] + job["write"]["iops"]


def timed(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"{what}: {' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


# ----------------------------------------------------------------------------------------------
# Mounts. Each returns (main process, exposed file, mount point); everything is in CLEANUP.

class Mount:
    def __init__(self, target: str, proc: subprocess.Popen, path: Path, mnt: Path, extra=None):
        self.target, self.proc, self.path, self.mnt, self.extra = target, proc, path, mnt, extra or []

    def stop(self) -> None:
        if self.target == "qcowfs":
            B.stop_qcowfs(self.proc, self.mnt)
        elif self.target == "qsd":
            B.stop_qsd(self.proc, self.mnt)
        elif self.target == "ceiling":
            B.stop_qcowfs(self.proc, self.mnt)  # unmount, then it exits by itself with status 0
        else:
            # nbdfuse, qcowmount: unmount and wait; their exit status is not ours to judge.
            subprocess.run(["fusermount3", "-u", str(self.mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            B.forget(self.proc, self.mnt)
        for p in self.extra:
            p.terminate()
            p.wait(timeout=60)
            if p in CLEANUP.procs:
                CLEANUP.procs.remove(p)


def spawn(cmd: list[str], logfile: Path) -> subprocess.Popen:
    with open(logfile, "a") as lf:
        lf.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(map(str, cmd))}\n")
        lf.flush()
        p = subprocess.Popen(list(map(str, cmd)), stdout=lf, stderr=lf, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    CLEANUP.procs.append(p)
    return p


def mount_target(ctx: dict, target: str, qcow2: Path, raw: Path, mnt: Path, writable: bool) -> Mount:
    """Serves qcow2 (or raw, for the ceiling) at mnt. qcowfs mounts qcow2's directory, which must hold
    only qcow2 images the run may open."""
    logs = ctx["logs"]
    tag = mnt.name
    if target == "qcowfs":
        p = B.mount_qcowfs(ctx["qcowfs_bin"], qcow2.parent, mnt, logs, f"qcowfs-{tag}.log")
        return Mount(target, p, mnt / (qcow2.stem + ".raw"), mnt)
    if target == "qsd":
        p = B.mount_qsd(qcow2, mnt, logs, "threads", tag, writable=writable)
        return Mount(target, p, mnt, mnt)
    mnt.mkdir(exist_ok=True)
    logfile = logs / f"{target}-{tag}.log"
    if target == "ceiling":
        p = spawn([ctx["ceiling_bin"], raw, mnt, "-f"], logfile)
        CLEANUP.mounts.append(mnt)
        B.wait_mounted(mnt, p, "ceiling", logfile)
        return Mount(target, p, mnt / "disk.raw", mnt)
    if target == "nbdfuse":
        sock = ctx["work"] / f"nbd-{tag}.sock"
        q = spawn(["qemu-nbd", "--read-only", "--persistent", "--shared=16", "--cache=writeback", "--aio=threads",
                   "-f", "qcow2", f"--socket={sock}", qcow2], logs / f"qemu-nbd-{tag}.log")
        end = time.monotonic() + 30
        while not sock.exists():
            if q.poll() is not None or time.monotonic() > end:
                raise BenchError(f"qemu-nbd did not create {sock} (exit {q.poll()}); see {logs}")
            time.sleep(0.05)
        p = spawn(["nbdfuse", "-r", mnt, "--unix", sock], logfile)
        CLEANUP.mounts.append(mnt)
        B.wait_mounted(mnt, p, "nbdfuse", logfile)
        return Mount(target, p, mnt / "nbd", mnt, [q])
    if target == "qcowmount":
        p = spawn(["qcowmount", "-v", qcow2, mnt], logfile)
        CLEANUP.mounts.append(mnt)
        B.wait_mounted(mnt, p, "qcowmount", logfile, timeout=15)
        return Mount(target, p, mnt / "qcow1", mnt)
    raise ValueError(target)


# ----------------------------------------------------------------------------------------------
# Images

def make_sparse(path: Path, vsize: int, data: int) -> None:
    """A qcow2 of vsize holding `data` bytes in 1 MiB pieces spread evenly (random bytes per piece
    would be slow with qemu-io; each piece gets its own pattern byte)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(path), str(vsize)])
    n = data // MiB
    step = vsize // n
    step -= step % MiB
    cmds = "".join(f"write -q -P {(i % 255) + 1} {i * step} {MiB}\n" for i in range(n))
    r = subprocess.run(["qemu-io", str(path)], input=cmds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or "error" in r.stdout.lower() or r.stderr.strip():
        raise BenchError(f"qemu-io on {path} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def make_tree(root: Path, total: int) -> None:
    """A deterministic source tree for the untar job: files of 1 KiB..256 KiB, 64 per directory."""
    rnd = random.Random(SEED)
    written, i = 0, 0
    blob = os.urandom(256 * 1024)
    text = b"qcowfs bench untar filler: the quick brown fox jumps over the lazy dog.\n" * 4000
    while written < total:
        d = root / f"d{i // 64:04d}"
        d.mkdir(parents=True, exist_ok=True)
        n = int(2 ** rnd.uniform(10, 18))
        half = n // 2
        (d / f"f{i:06d}").write_bytes(blob[rnd.randrange(0, len(blob) - half):][:half] + text[: n - half])
        written += n
        i += 1


def prepare(ctx: dict, size: int, sparse_v: int, sparse_d: int, fs_size: int, tree_bytes: int) -> dict:
    work = ctx["work"]
    img = {}
    srcd = work / "src"
    srcd.mkdir()
    (work / "zsrc").mkdir()
    (work / "ssrc").mkdir()
    raw = work / "data.raw"
    log(f"generating {human(size)} of half-compressible data")
    B.make_data(raw, size)
    img["data_sha"] = sha256_file(raw)
    img["raw"] = raw
    img["full"] = srcd / "full.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=64k", str(raw), str(img["full"])])
    img["zstd"] = work / "zsrc" / "zstd.qcow2"
    log("zstd-compressed copy")
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=64k,compression_type=zstd", str(raw),
         str(img["zstd"])])
    log(f"sparse: {human(sparse_v)} disk holding {human(sparse_d)}")
    img["sparse"] = work / "ssrc" / "sparse.qcow2"
    make_sparse(img["sparse"], sparse_v, sparse_d)
    img["sparse_raw"] = work / "sparse.raw"
    run(["qemu-img", "convert", "-O", "raw", str(img["sparse"]), str(img["sparse_raw"])])
    # Write templates: empty qcow2 (+ an empty raw), a copy-on-write overlay over full.qcow2 (by
    # absolute path), the full image, and an empty image for the file system job.
    tpl = work / "tpl"
    tpl.mkdir()
    img["empty"] = tpl / "empty.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(img["empty"]), str(size)])
    img["empty_raw"] = tpl / "empty.raw"
    with open(img["empty_raw"], "wb") as f:
        f.truncate(size)
    img["cow"] = tpl / "cow.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", str(img["full"]), "-F", "qcow2",
         str(img["cow"])])
    img["fs"] = tpl / "fs.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(img["fs"]), str(fs_size)])
    img["fs_raw"] = tpl / "fs.raw"
    with open(img["fs_raw"], "wb") as f:
        f.truncate(fs_size)
    log(f"source tree of {human(tree_bytes)} and its tarball for the untar job")
    tree = work / "tree"
    make_tree(tree, tree_bytes)
    img["tree_sha"] = tree_digest(tree)
    img["tar"] = work / "tree.tar"
    run(["tar", "-C", str(tree), "-cf", str(img["tar"]), "."])
    shutil.rmtree(tree)
    return img


# ----------------------------------------------------------------------------------------------
# Read jobs

def bench_reads(ctx: dict, img: dict, reps: int, runtime: int, targets: list[str],
                keys: list[str]) -> tuple[dict, list[str]]:
    work, notes = ctx["work"], []
    sets = {"full": (img["full"], img["raw"]), "zstd": (img["zstd"], img["raw"]),
            "sparse": (img["sparse"], img["sparse_raw"])}
    mounts: dict[tuple[str, str], Mount | None] = {}
    for t in targets:
        for name, (q, r) in sets.items():
            if name == "sparse" and t in ("nbdfuse", "qcowmount"):
                continue  # neither finds holes (no SEEK_DATA): a 64 GiB read, minutes per run
            try:
                m = mount_target(ctx, t, q, r, work / f"r-{t}-{name}", writable=False)
                size = m.path.stat().st_size
                want = os.stat(r).st_size
                if size != want:
                    raise BenchError(f"{t} shows {name} as {m.path} with size {size}, expected {want}")
            except BenchError as e:
                if t in ("qcowmount", "nbdfuse"):
                    lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith("===")]
                    why = next((x for x in lines if "unsupported" in x.lower()), lines[-1] if lines else "?")
                    notes.append(f"{t} cannot serve the {name} image: {why.strip()[:160]}")
                    m = None
                else:
                    raise
            mounts[(t, name)] = m
    direct = {k: (B.direct_io_works(m.path) if m else False) for k, m in mounts.items()}
    for (t, name), ok in list(direct.items()):
        if mounts[(t, name)] and not ok:
            notes.append(f"{t}: O_DIRECT fails on the {name} image, its fio jobs run buffered (fio invalidates "
                         "the file's cache first)")
    results: dict = {}
    for key in keys:
        name = {"zstd": "zstd", "cp": "sparse"}.get(key, "full")
        unit = JOBS[key][1]
        samples = {t: [] for t in targets}
        if key == "cp":
            # One untimed copy first: on a VM whose host backs guest memory lazily, the first
            # copy into /dev/shm after a while touches fresh guest pages and took 10-13 s where
            # every later one took 1-3 s, whichever target went first.
            first = next((mounts[(t, name)] for t in targets if mounts.get((t, name))), None)
            if first is not None:
                dest = cp_dest_dir(work) / "cp-warmup.raw"
                run(["cp", "--sparse=always", str(first.path), str(dest)])
                dest.unlink()
        for rep in range(reps):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for t in order:
                m = mounts.get((t, name))
                if m is None:
                    continue
                if m.proc.poll() is not None:
                    raise BenchError(f"{t} ({name}) exited with status {m.proc.returncode}")
                warm(sets[name][1] if t == "ceiling" else sets[name][0])
                try:
                    v = read_job(key, t, m, direct[(t, name)], img, work, runtime)
                except BenchError as e:
                    if t not in ("nbdfuse", "qcowmount"):
                        raise
                    notes.append(f"{t} failed on {JOBS[key][0]}, dropped for the {name} image: "
                                 f"{str(e).splitlines()[0][:200]}")
                    mounts[(t, name)] = None
                    continue
                samples[t].append(v)
                log(f"read  {key:<5} rep {rep + 1}/{reps} {t:<9} {v:10.2f} {unit}")
        results[key] = {t: samples[t] for t in targets}
    for m in mounts.values():
        if m:
            m.stop()
    return results, notes


def cp_dest_dir(work: Path) -> Path:
    """/dev/shm when it is a tmpfs with room for the sparse copy's data, else the work directory."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 4 * 1024 * MiB and os.path.ismount(shm):
            d = shm / f"qcowfs-bench-{os.getpid()}"
            if not d.exists():
                d.mkdir()
                B.CLEANUP.dirs.append(d)
            return d
    except OSError:
        pass
    return work


def read_job(key: str, t: str, m: Mount, direct: bool, img: dict, work: Path, runtime: int) -> float:
    if key in FIO:
        job = fio(m.path, work / "fio.json", FIO[key], direct=direct, size=0, runtime=runtime, write=False)
        v = fio_value(job, JOBS[key][1], key)
    elif key == "sha":
        drop_file_cache(m.path)
        t0 = time.perf_counter()
        digest = sha256_file(m.path)
        v = time.perf_counter() - t0
        if digest != img["data_sha"]:
            raise BenchError(f"WRONG DATA from {t}: sha256 of {m.path} is {digest}, the data's is "
                             f"{img['data_sha']}; first difference: {B.first_difference(img['raw'], m.path)}")
    else:
        drop_file_cache(m.path)
        # The copy goes to memory when it can: written to the host disk, the previous run's
        # write-back and the dirty-page throttle decided the time (3-20 s for the same copy).
        dest = cp_dest_dir(work) / "cp-out.raw"
        subprocess.run(["sync"], check=False)
        v = timed(["cp", "--sparse=always", str(m.path), str(dest)], f"sparse cp from {t}")
        same, msg = B.qemu_img_compare(dest, "raw", img["sparse_raw"], "raw")
        dest.unlink()
        if not same:
            raise BenchError(f"WRONG DATA: cp --sparse=always from {t} differs from the disk: {msg}")
    return v


# ----------------------------------------------------------------------------------------------
# Write jobs

def fs_job(dev_file: Path, img: dict, work: Path) -> float:
    """mkfs.ext4 + mount + untar + umount, then a cold mount and read-back of every file."""
    mnt = work / "fsmnt"
    mnt.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    loop = run(["losetup", "--find", "--show", str(dev_file)]).stdout.strip()

    def detach(loop=loop):
        if mnt in B.mounted_paths():
            subprocess.run(["umount", str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["losetup", "-d", loop], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    CLEANUP.hooks.append(detach)
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop])
    run(["mount", loop, str(mnt)])
    run(["tar", "-C", str(mnt), "-xf", str(img["tar"])])
    run(["umount", str(mnt)])
    t1 = time.perf_counter()
    # Cold read-back: drop the loop device's and the exposed file's caches (not the host's).
    run(["blockdev", "--flushbufs", loop])
    drop_file_cache(dev_file)
    t2 = time.perf_counter()
    run(["mount", "-o", "ro", loop, str(mnt)])
    digest = tree_digest(mnt)
    run(["umount", str(mnt)])
    run(["losetup", "-d", loop])
    CLEANUP.hooks.remove(detach)
    t3 = time.perf_counter()
    if digest != img["tree_sha"]:
        raise BenchError(f"WRONG DATA: the tree read back from ext4 on {dev_file} differs from the one untarred")
    return (t1 - t0) + (t3 - t2)


def bench_writes(ctx: dict, img: dict, size: int, reps: int, keys: list[str]) -> tuple[dict, dict, list[str]]:
    work, notes = ctx["work"], []
    out = work / "fio.json"
    templates = {"empty": (img["empty"], img["empty_raw"]), "cow": (img["cow"], img["raw"]),
                 "full": (img["full"], img["raw"])}
    results, amp = {}, {}
    for key in keys:
        unit = JOBS[key][1]
        spec = FIO.get(key)
        tname = spec["template"] if spec else ("fs" if key == "fs" else "empty")
        tq, tr = (img["fs"], img["fs_raw"]) if tname == "fs" else templates[tname]
        vsize = os.stat(tr).st_size
        samples = {t: [] for t in WRITE_TARGETS}
        amp[key] = {t: [] for t in WRITE_TARGETS}
        ref = None
        for rep in range(reps):
            order = list(WRITE_TARGETS) if rep % 2 == 0 else list(reversed(WRITE_TARGETS))
            if key != "fs" and ref is None:
                # The reference: the same job on a raw file on the host disk, no FUSE.
                ref = work / f"ref-{key}.raw"
                run(["cp", "--sparse=always", str(tr), str(ref)])
                if spec:
                    fio(ref, out, spec, direct=True, size=vsize, runtime=None, write=True)
                else:
                    run(["dd", f"if={img['raw']}", f"of={ref}", "bs=1M", "conv=notrunc,fsync"])
            for t in order:
                d = work / f"w-{t}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
                f = d / ("disk.raw" if t == "ceiling" else "disk.qcow2")
                run(["cp", "--sparse=always", str(tr if t == "ceiling" else tq), str(f)])
                m = mount_target(ctx, t, f, f, work / f"wm-{t}", writable=True)
                if m.path.stat().st_size != vsize:
                    raise BenchError(f"{t} shows {m.path} with size {m.path.stat().st_size}, expected {vsize}")
                alloc0 = allocated(f)
                os.sync()
                warm(f)
                if tname == "cow" and t != "ceiling":
                    warm(img["full"])
                wb0 = proc_write_bytes(m.proc.pid)
                guest = None
                if spec:
                    job = fio(m.path, out, spec, direct=B.direct_write_open_works(m.path), size=vsize, runtime=None,
                              write=True)
                    v = fio_value(job, unit, key)
                    guest = job["write"]["io_bytes"]
                elif key == "dd":
                    v = timed(["dd", f"if={img['raw']}", f"of={m.path}", "bs=1M", "conv=notrunc,fsync"], f"dd to {t}")
                    guest = vsize
                else:
                    v = fs_job(m.path, img, work)
                wb1 = proc_write_bytes(m.proc.pid)
                m.stop()
                grown = allocated(f) - alloc0
                if guest and wb0 is not None and wb1 is not None:
                    amp[key][t].append(((wb1 - wb0) / guest, grown / guest))
                if t != "ceiling":
                    B.qemu_img_check(f, f"{t} ({key}, rep {rep + 1})")
                if ref is not None:
                    same, msg = B.qemu_img_compare(f, "raw" if t == "ceiling" else "qcow2", ref, "raw")
                    if not same and t == "qsd" and not ctx["strict_qsd"]:
                        # QEMU 7.2's FUSE export reads every request into one shared buffer, so concurrent
                        # writes can land with another request's data (upstream fix "fuse: Copy write
                        # buffer content before polling", 2025). Not ours: flag it and go on.
                        log(f"WARNING: {key} rep {rep + 1}: qsd's image differs from the raw reference ({msg})")
                        ctx["qsd_wrong"].setdefault(key, []).append(rep + 1)
                    elif not same:
                        raise BenchError(f"WRONG DATA after {key} on {t} (rep {rep + 1}): differs from the same job "
                                         f"on a raw host file: {msg}")
                samples[t].append(v)
                log(f"write {key:<5} rep {rep + 1}/{reps} {t:<9} {v:10.2f} {unit}")
                shutil.rmtree(d, ignore_errors=True)
        if ref is not None:
            ref.unlink()
        results[key] = samples
    if "fs" in keys:
        notes.append("mkfs+untar+read-back: ext4 images are never byte-identical (UUIDs, times), so instead of "
                     "qemu-img compare the read-back tree is checked against the untarred one")
    return results, amp, notes


# ----------------------------------------------------------------------------------------------
# Output

def speed(v: float, unit: str) -> float:
    return 1 / v if unit == "s" else v


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if unit == "s" else f"{v:.0f}"


def table(results: dict, targets: list[str], reps: int, qsd_wrong: dict) -> tuple[list[str], list[dict], int]:
    lines, rows, misses = [], [], 0
    head = f"{'job':<28} {'unit':<5}" + "".join(f" {t:>10}" for t in targets) + \
        f" {'x qsd':>7} {'goal':>6} {'% ceil':>7} {'goal':>6}  met"
    lines += [head, "-" * len(head)]
    for key, samples in results.items():
        title, unit, (gq, gc), _ = JOBS[key]
        med = {t: statistics.median(samples[t]) if samples.get(t) else None for t in targets}
        line = f"{title:<28} {unit:<5}"
        for t in targets:
            cell = fmt(med[t], unit)
            if reps > 1 and med[t]:
                cell += f"±{(max(samples[t]) - min(samples[t])) / 2 / med[t] * 100:.0f}%"
            if t == "qsd" and key in qsd_wrong:
                cell += "!"
            line += f" {cell:>10}"
        q = med.get("qcowfs")
        rq = speed(q, unit) / speed(med["qsd"], unit) if q and med.get("qsd") else None
        rc = speed(q, unit) / speed(med["ceiling"], unit) if q and med.get("ceiling") else None
        met = []
        if gq is not None and rq is not None:
            met.append(rq >= gq)
        if gc is not None and rc is not None:
            met.append(rc >= gc)
        verdict = "-" if not met else ("yes" if all(met) else "NO")
        misses += verdict == "NO"
        line += (f" {(f'{rq:.2f}x' if rq else '-'):>7} {(f'{gq:.1f}x' if gq else ''):>6}"
                 f" {(f'{rc * 100:.0f}%' if rc else '-'):>7} {(f'{gc * 100:.0f}%' if gc else ''):>6}  {verdict}")
        lines.append(line)
        rows.append({"job": key, "title": title, "unit": unit, "median": med, "samples": samples,
                     "ratio_qsd": rq, "ratio_ceiling": rc, "goal_qsd": gq, "goal_ceiling": gc, "met": verdict})
    return lines, rows, misses


def amp_table(amp: dict) -> list[str]:
    lines = [f"{'job':<28}" + "".join(f" {t:>18}" for t in WRITE_TARGETS),
             "-" * (28 + 19 * len(WRITE_TARGETS))]
    for key, per in amp.items():
        if not any(per.values()):
            continue
        line = f"{JOBS[key][0]:<28}"
        for t in WRITE_TARGETS:
            if per[t]:
                w = statistics.median(x[0] for x in per[t])
                g = statistics.median(x[1] for x in per[t])
                line += f" {f'{w:.2f} / {g:.2f}':>18}"
            else:
                line += f" {'-':>18}"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repetition, ~3 minutes")
    ap.add_argument("--size", help="disk size of the fio/sha256sum/dd jobs (default 2G; 128M with --quick)")
    ap.add_argument("--reps", type=int, help="repetitions, median taken (default 3; 1 with --quick)")
    ap.add_argument("--write-reps", type=int,
                    help="repetitions of each write job, median taken (default 5; 1 with --quick): the write jobs "
                         "spread most from run to run (contrib/bench/README.md, \"Noise\")")
    ap.add_argument("--runtime", type=int, help="seconds per read fio job (default 10; 2 with --quick)")
    ap.add_argument("--sparse", help="sparse cp disk: VIRTUAL:DATA (default 64G:1G; 4G:64M with --quick)")
    ap.add_argument("--fs", help="untar job: FS_SIZE:TAR_SIZE (default 4G:512M; 512M:32M with --quick)")
    ap.add_argument("--jobs", help=f"comma-separated jobs to run (default all: {','.join(JOBS)})")
    ap.add_argument("--targets", help=f"comma-separated read targets (default {','.join(READ_TARGETS)})")
    ap.add_argument("--no-idle", dest="idle", action="store_false",
                    help=f"skip the idle-memory measurement ({IDLE_IMAGES} images in the directory)")
    ap.add_argument("--json", metavar="FILE", help="also write every sample to FILE")
    ap.add_argument("--strict-qsd", action="store_true",
                    help="stop when qemu-storage-daemon's written image is wrong (default: mark it with !)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (images, logs)")
    args = ap.parse_args()

    q = args.quick
    size = parse_size(args.size or ("128M" if q else "2G"))
    size -= size % (2 * MiB)
    reps = args.reps or (1 if q else 3)
    wreps = args.write_reps or args.reps or (1 if q else 5)
    runtime = args.runtime or (2 if q else 10)
    sv, sd = (parse_size(x) for x in (args.sparse or ("4G:64M" if q else "64G:1G")).split(":"))
    fs_size, tar_size = (parse_size(x) for x in (args.fs or ("512M:32M" if q else "4G:512M")).split(":"))
    keys = args.jobs.split(",") if args.jobs else list(JOBS)
    bad = [k for k in keys if k not in JOBS]
    if bad:
        ap.error(f"unknown job(s) {','.join(bad)}; have {','.join(JOBS)}")
    targets = args.targets.split(",") if args.targets else list(READ_TARGETS)
    for t in ("qcowfs", "qsd", "ceiling"):
        if t not in targets:
            targets.insert(0, t)
    qcowfs_bin = os.environ.get("QCOWFS_BIN") or str(B.REPO / "build" / "qcowfs")
    if not os.access(qcowfs_bin, os.X_OK):
        ap.error(f"qcowfs binary {qcowfs_bin} is missing; build it or set QCOWFS_BIN")
    if os.geteuid() != 0:
        ap.error("must run as root (FUSE mounts, loop devices): sudo bash contrib/bench/run.sh")
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon", "fio", "fusermount3", "gcc", "pkg-config", "losetup",
                 "mkfs.ext4", "tar", "cp", "dd"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (run.sh installs it)")
    for tool in ("nbdfuse", "qemu-nbd", "qcowmount"):
        if not shutil.which(tool):
            for t in ({"qcowmount": "qcowmount"}.get(tool, "nbdfuse"),):
                if t in targets:
                    targets.remove(t)
                    log(f"{tool} not found: no {t} column (run.sh installs libnbd-bin and libqcow-utils)")

    def body(work: Path) -> int:
        (work / "logs").mkdir()
        return side(args, work, qcowfs_bin, size, (reps, wreps), runtime, (sv, sd), (fs_size, tar_size), keys, targets)
    return B.guarded("qcowfs-side.", args.keep, body)


IDLE_IMAGES = 1000
IDLE_GOAL_MIB = 32


def idle_memory(ctx: dict) -> dict:
    """Issue 9's memory goal: qcowfs's resident memory with IDLE_IMAGES images in its directory,
    after a listing, a stat of every file and a 4 KiB read of one of them, then idle for 2 s."""
    src = ctx["work"] / "idle-src"
    mnt = ctx["work"] / "idle-mnt"
    src.mkdir()
    one = src / "img0000.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(one), "1G"])
    run(["qemu-io", "-c", "write -P 0x5a 0 4k", str(one)])
    for i in range(1, IDLE_IMAGES):
        shutil.copyfile(one, src / f"img{i:04d}.qcow2")
    p = B.mount_qcowfs(ctx["qcowfs_bin"], src, mnt, ctx["logs"], "qcowfs-idle.log")
    try:
        end = time.monotonic() + 120
        while True:
            names = os.listdir(mnt)
            if len([n for n in names if n.endswith(".raw")]) >= IDLE_IMAGES:
                break
            if time.monotonic() > end:
                raise BenchError(f"qcowfs listed {len(names)} of {IDLE_IMAGES} images after 120 s")
            time.sleep(0.2)
        for n in names:
            os.stat(mnt / n)
        with open(mnt / "img0000.raw", "rb") as f:
            if f.read(4096) != b"\x5a" * 4096:
                raise BenchError("idle-memory image read back wrong")
        time.sleep(2)
        status = dict(line.split(":", 1) for line in open(f"/proc/{p.pid}/status") if ":" in line)
        kib = lambda k: int(status[k].split()[0])
        return {"images": IDLE_IMAGES, "rss_mib": kib("VmRSS") / 1024, "peak_mib": kib("VmHWM") / 1024,
                "goal_mib": IDLE_GOAL_MIB}
    finally:
        B.stop_qcowfs(p, mnt)
        shutil.rmtree(src, ignore_errors=True)


def side(args, work: Path, qcowfs_bin: str, size: int, all_reps: tuple[int, int], runtime: int, sparse: tuple[int, int],
         fs: tuple[int, int], keys: list[str], targets: list[str]) -> int:
    t_start = time.time()
    reps, wreps = all_reps
    info = B.machine_info(qcowfs_bin)
    info["nbdfuse"] = B.first_line(["nbdfuse", "--version"]) if "nbdfuse" in targets else "-"
    info["qcowmount"] = B.first_line(["qcowmount", "-V"]) if "qcowmount" in targets else "-"
    ceiling = work / "ceiling"
    log("compiling the FUSE ceiling (ceiling.c)")
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
    run(["gcc", "-O2", "-o", str(ceiling), str(HERE / "ceiling.c"), *flags])
    ctx = {"work": work, "logs": work / "logs", "qcowfs_bin": qcowfs_bin, "ceiling_bin": ceiling,
           "strict_qsd": args.strict_qsd, "qsd_wrong": {}}
    img = prepare(ctx, size, *sparse, *fs)

    print("qcowfs side-by-side benchmark (issue 9): qcowfs vs qemu-storage-daemon, a FUSE ceiling, nbdfuse, qcowmount")
    for k in ("nproc", "cpu", "memory", "kernel", "loadavg_start", "qemu", "fio", "nbdfuse", "qcowmount", "qcowfs",
              "qcowfs_bin", "source_tree", "page_reporting"):
        print(f"  {k:<14} {info[k]}")
    print(f"  {'settings':<14} disk {human(size)} (sparse cp: {human(sparse[0])} holding {human(sparse[1])}; "
          f"untar: {human(fs[1])} into a {human(fs[0])} ext4), median of {reps} (reads) and {wreps} (writes), "
          f"read fio jobs {runtime}s, "
          "O_DIRECT, host page cache warm")
    sys.stdout.flush()
    doc = {"machine": info, "size": size, "reps": reps, "write_reps": wreps, "runtime": runtime}
    rkeys = [k for k in keys if JOBS[k][3] == "read"]
    wkeys = [k for k in keys if JOBS[k][3] == "write"]
    allres, notes, amp = {}, [], {}
    if rkeys:
        rres, rnotes = bench_reads(ctx, img, reps, runtime, targets, rkeys)
        allres.update(rres)
        notes += rnotes
    if wkeys:
        wres, amp, wnotes = bench_writes(ctx, img, size, wreps, wkeys)
        allres.update(wres)
        notes += wnotes
    idle = idle_memory(ctx) if args.idle else None
    shown = [t for t in READ_TARGETS if t in targets]
    lines, rows, misses = table(allres, shown, min(reps, wreps) if wkeys else reps, ctx["qsd_wrong"])
    print("\n" + "\n".join(lines))
    print("\n  x qsd: qcowfs's speed over qsd's (times inverted: >1 = qcowfs faster); % ceil: qcowfs's speed as a "
          "share of the passthrough ceiling's")
    if ctx["qsd_wrong"]:
        bad = "; ".join(f"{JOBS[k][0]} (rep {','.join(map(str, r))})" for k, r in ctx["qsd_wrong"].items())
        notes.append(f"! qsd's image did NOT hold what fio wrote after: {bad}; qcowfs's and the ceiling's did. "
                     "QEMU 7.2's FUSE export reuses its request buffer while a write is in flight (upstream fix "
                     "\"fuse: Copy write buffer content before polling\"), so those qsd figures are not a fair "
                     "comparison")
    for n in notes:
        print(f"  note: {n}")
    if amp:
        print("\nHost bytes written per guest byte: daemon write_bytes (/proc/PID/io, start to end of the job, "
              "after its final fsync) / image file growth (allocated blocks after the daemon stopped)")
        print("\n".join(amp_table(amp)))
    if wkeys:
        print("\nEvery written image passed qemu-img check and compared identical to the same job on a raw host file"
              + (", except qsd's where marked !." if ctx["qsd_wrong"] else "."))
    if idle:
        ok = idle["rss_mib"] < idle["goal_mib"]
        misses += 0 if ok else 1
        print(f"\nIdle memory with {idle['images']} images in the directory (listed, stat'ed, one read): "
              f"{idle['rss_mib']:.1f} MiB resident, peak {idle['peak_mib']:.1f} MiB; "
              f"goal < {idle['goal_mib']} MiB: {'met' if ok else 'MISSED'}")
    info["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"\n  load average at start {info['loadavg_start']}, at end {info['loadavg_end']}; "
          f"total {time.time() - t_start:.0f}s; goals missed: {misses}")
    if args.json:
        doc.update(rows=rows, notes=notes, amplification=amp, idle_memory=idle)
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
