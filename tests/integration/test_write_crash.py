#!/usr/bin/env python3
"""Crash safety of the write path.

Each round mounts one image, lets journaling writer processes do random writes (and punch/zero
ranges, and grow the disk) with fsync/fdatasync at random points, and SIGKILLs the daemon at a
random moment: after a random delay, while an fsync is in flight, during heavy allocation
(512-byte clusters: L2 tables and refcount blocks, refcount table growth), or while it writes
everything back at unmount. Then:

- `qemu-img check` reports nothing but leaked clusters (exit 0 or 3, no ERROR line, no
  corruption). A lazy_refcounts image left dirty may have refcounts that are off — that is what
  the dirty bit says — so there only refcount errors are tolerated and a copy must be repaired
  completely by `qemu-img check -r all`;
- everything written before each writer's last successful fsync reads back (qemu-img convert),
  the bytes of later operations hold the old or the new value, and snapshots and backing files
  are untouched;
- a remount reads the same bytes as qemu-img, writes again (a dirty image must have its
  refcounts rebuilt before that), unmounts cleanly and leaves a clean image: no dirty bit, no
  corruption, and no more leaked clusters than the crash left (none at all after a rebuild).

Each round is a test (test_round_03_snapshot_delay, ...): `-k round_03` runs one. H5_ROUNDS=N
runs only the first N rounds, H5_ONLY=3,7 only those; H5_SEED=S changes all seeds.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import journal as J  # noqa: E402

KiB, MiB = H.KiB, H.MiB
T = H.TestRun("write_crash", deadline=800)
BASE_SEED = int(os.environ.get("H5_SEED", "20261121"))

VARIANTS = {
    # size: initial virtual size; nw: writer processes; chunk: ownership stripe (bytes, not
    # cluster aligned on purpose: neighbouring writers share clusters)
    "plain": dict(size=64 * MiB, opts="cluster_size=65536", nw=3, sizes="normal", punch=0.05),
    "backing": dict(size=48 * MiB, opts=None, nw=3, sizes="normal", punch=0.03, backing=True),
    "snapshot": dict(size=48 * MiB, opts=None, nw=3, sizes="normal", punch=0.05, snapshot="s1"),
    "lazy": dict(size=64 * MiB, opts="compat=1.1,lazy_refcounts=on", nw=3, sizes="normal",
                 punch=0.05, lazy=True),
    "c512": dict(size=24 * MiB, opts="cluster_size=512", nw=3, sizes="small", punch=0.02),
    "grow": dict(size=16 * MiB, max_size=64 * MiB, opts=None, nw=2, sizes="normal", punch=0.0,
                 grow=True),
}

ROUNDS = [
    ("plain", "delay"), ("plain", "fsync"),
    ("backing", "delay"),
    ("snapshot", "delay"), ("snapshot", "fsync"),
    ("lazy", "delay"), ("lazy", "fsync"),
    ("c512", "delay"), ("c512", "alloc"),
    ("grow", "delay"),
    ("plain", "unmount"), ("lazy", "unmount"),
    ("backing", "fsync"), ("grow", "fsync"), ("c512", "fsync"), ("snapshot", "unmount"),
    ("plain", "delay"), ("c512", "alloc"),
]
if os.environ.get("H5_ROUNDS"):
    ROUNDS = ROUNDS[:int(os.environ["H5_ROUNDS"])]


def prefill(img, size, seed):
    rnd = random.Random(seed)
    cmds = []
    off = 0
    while off < size:
        n = rnd.randrange(64 * KiB, 2 * MiB)
        if off + n > size:
            n = size - off
        n -= n % 512
        if n and rnd.random() < 0.6:
            pat = rnd.randrange(1, 256)
            c0 = (off + 64 * KiB - 1) // (64 * KiB) * (64 * KiB)
            c1 = (off + n) // (64 * KiB) * (64 * KiB)
            if rnd.random() < 0.25 and c1 > c0:
                # compressed clusters (qemu-io -c wants whole clusters)
                cmds.append("write -c -P 0x%02x %d %d" % (pat, c0, c1 - c0))
            else:
                cmds.append("write -P 0x%02x %d %d" % (pat, off, n))
        off += n + rnd.randrange(0, 1 * MiB) // 512 * 512
    if cmds:
        H.qemu_io(img, *cmds)


def build(work, v, seed):
    src = os.path.join(work, "src")
    os.makedirs(src)
    img = os.path.join(src, "disk.qcow2")
    extra = {}
    if v.get("backing"):
        base = os.path.join(src, "base.qcow2")
        H.create(base, v["size"], v["opts"])
        prefill(base, v["size"], seed)
        H.create(img, v["size"], v["opts"], backing="base.qcow2", cwd=src)
        H.qemu_io(img, "write -P 0x77 %d 4096" % (3 * MiB + 1024), "write -P 0x78 %d 65536" % (9 * MiB))
        extra["base"] = base
        extra["base_sha"] = H.sha256_file(base)
    else:
        H.create(img, v["size"], v["opts"])
    if v.get("snapshot"):
        prefill(img, v["size"], seed)
        H.qemu_img("snapshot", "-c", v["snapshot"], img)
        H.qemu_io(img, "write -P 0x99 %d 100000" % (5 * MiB))
        extra["snap_ref"] = H.to_raw(img, os.path.join(work, "snap.ref"), snapshot=v["snapshot"])
        extra["snap_sha"] = H.sha256_file(extra["snap_ref"])
    initial = None
    if v.get("backing") or v.get("snapshot"):
        initial = H.read_raw(img, os.path.join(work, "initial.raw"))
    c = H.qcheck(img)
    if not c.clean():
        raise RuntimeError("the fresh image is not clean: " + c.summary())
    return src, img, initial, extra


def wait_exit(procs, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            return True
        time.sleep(0.01)
    return False


def run_round(idx, variant, mode):
    v = VARIANTS[variant]
    seed = BASE_SEED + 7 * idx
    rnd = random.Random(seed)
    name = "r%d %s/%s" % (idx, variant, mode)
    print("---- round %s (seed %d)" % (name, seed), flush=True)
    failed_before = T.failed
    work = H.tempdir("crash")
    src, img, initial, extra = build(work, v, seed)
    size = v["size"]
    max_size = v.get("max_size", size)
    lazy = bool(v.get("lazy"))

    m = H.Mount(src)
    m.start()
    view = m.path("disk.raw")
    cfgs = []
    for w in range(v["nw"]):
        cfgs.append(dict(path=view, journal=os.path.join(work, "journal.%d" % w), wid=w, nw=v["nw"],
                         chunk=200000, init_size=size, seed=seed, sizes=v["sizes"],
                         punch=v["punch"], grow=bool(v.get("grow")), max_size=max_size,
                         sync_every=[2, 6] if mode == "fsync" else [3, 15],
                         ops=60 if mode == "unmount" else 0, final_sync=False))
    if mode == "unmount":
        for c in cfgs:
            c["sizes"] = "big"      # lots of cached data for the write-back at close/unmount
            c["sync_every"] = [20, 40]
    if mode == "fsync":
        for c in cfgs:
            c["sizes"] = "big" if c["wid"] == 0 else c["sizes"]
    procs = [J.start_writer(c) for c in cfgs]
    umount_proc = None
    how = ""
    # the clock starts once every writer has the file open (python start-up is not the point)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(p.poll() is not None for p in procs):
        if all(J.Journal(c["journal"], c).opened for c in cfgs):
            break
        time.sleep(0.005)
    if mode in ("delay", "alloc"):
        d = rnd.uniform(0.05, 2.5) if mode == "delay" else rnd.uniform(1.0, 3.0)
        wait_exit(procs, d)
        how = "after %.2fs" % d
    elif mode == "fsync":
        warm = rnd.uniform(0.3, 1.5)
        wait_exit(procs, warm)
        deadline = time.monotonic() + 8
        how = "after %.2fs warm-up, no fsync caught in flight" % warm
        while time.monotonic() < deadline and not all(p.poll() is not None for p in procs):
            js = [J.Journal(c["journal"], c) for c in cfgs]
            hit = [j.cfg["wid"] for j in js if j.in_fsync()]
            if hit:
                how = "while writer(s) %s were in fsync" % hit
                break
            time.sleep(0.001)
    elif mode == "unmount":
        # kill while the last handles are closed (their cached data written back), or if that
        # is over too soon, a moment into the unmount
        deadline = time.monotonic() + 120
        caught = None
        while time.monotonic() < deadline and not all(p.poll() is not None for p in procs):
            js = [J.Journal(c["journal"], c) for c in cfgs]
            hit = [j.cfg["wid"] for j in js if j.closing and not j.ended]
            if hit and rnd.random() < 0.5:
                caught = hit
                break
            time.sleep(0.001)
        if caught:
            how = "while writer(s) %s were in close()" % caught
        else:
            if not wait_exit(procs, 120):
                T.check("%s: writers finish their 60 operations" % name, False, "still running after 120s")
            d = rnd.uniform(0.0, 0.015)
            umount_proc = subprocess.Popen(["fusermount3", "-u", m.mnt], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            time.sleep(d)
            how = "%.3fs into the unmount" % d
    alive = m.alive()
    clean_exit = mode == "unmount" and not alive and m.proc.poll() == 0
    T.check("%s: daemon alive until the kill" % name, alive or mode == "unmount",
            "exit %s; log tail: %s" % (m.proc.poll(), m.log_text()[-1500:]))
    t_kill = time.monotonic()
    host_size = os.path.getsize(img)
    if m.alive():
        os.kill(m.proc.pid, signal.SIGKILL)
    else:
        how += " (the daemon had already exited with %s)" % m.proc.poll()
    print("  killed %s; host file %d bytes" % (how, host_size), flush=True)
    try:
        m.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if umount_proc:
        umount_proc.wait()
    log1 = m.log_text()
    m.force_cleanup()

    journals = [J.Journal(c["journal"], c) for c in cfgs]
    for p, j in zip(procs, journals):
        out = H.dec(p.stdout.read()) if p.stdout else ""
        print("  writer %d: %d ops issued, last fsync covers ops < %d, %d fsyncs ok, errors %s%s" % (
            j.cfg["wid"], len(j.ops), j.sync_point(), len(j.synced),
            [(s, H.errname(e), w) for s, e, t, w in j.errors],
            ("; output: " + out.strip()[-500:]) if out.strip() else ""), flush=True)
    genuine = [(j.cfg["wid"], s, H.errname(e), w, "%.3fs before the kill" % (t_kill - t))
               for j in journals for s, e, t, w in j.errors if t < t_kill]
    T.check("%s: no open/write/fsync/fallocate/truncate error before the kill" % name, not genuine,
            "%s; log tail: %s" % (genuine[:6], log1[-1500:]))
    T.check("%s: writers got to write" % name, any(j.opened for j in journals) and
            sum(len(j.ops) for j in journals) > 0, "no writer opened the file")

    # ---- the image as the crash left it
    f = H.features(img)
    dirty = bool(f["inc"] & H.INCOMPAT_DIRTY)
    print("  header after the crash: incompatible 0x%x compatible 0x%x autoclear 0x%x" % (
        f["inc"], f["compat"], f["autoclear"]), flush=True)
    T.check("%s: corrupt bit not set by the crash" % name, not f["inc"] & H.INCOMPAT_CORRUPT, f)
    if dirty and not lazy:
        T.check("%s: dirty bit only on lazy_refcounts images" % name, False,
                "incompatible features 0x%x on an image without lazy_refcounts" % f["inc"])
    c = H.qcheck(img)
    print("  " + c.summary(), flush=True)
    if clean_exit:
        # the unmount finished before the kill: closing must have left the image clean
        T.check("%s: unmount finished first: image clean (check exit 0, no leaks, no dirty bit)" % name,
                c.clean() and not dirty, c.summary() + "; incompatible 0x%x" % f["inc"])
    leaks_before = None
    if lazy and dirty:
        bad = c.non_refcount_errors()
        T.check("%s: dirty lazy image: qemu-img check finds only refcount inconsistencies" % name,
                c.js is not None and c.check_errors == 0 and not bad, c.summary())
        cp = os.path.join(work, "repair-copy.qcow2")
        shutil.copyfile(img, cp)
        r = H.qcheck(cp, "all")
        T.check("%s: dirty lazy image: `qemu-img check -r all` on a copy repairs everything (exit 0)" % name,
                r.rc == 0, r.summary())
        os.unlink(cp)
    else:
        T.check("%s: qemu-img check: exit 0 or 3, nothing but leaked clusters" % name, c.leaks_only(),
                c.summary())
        leaks_before = c.leaks
    after_raw = os.path.join(work, "after.raw")
    actual = H.read_raw(img, after_raw)
    model = J.Model(initial, size, max_size, journals)
    probs = model.verify(actual)
    T.check("%s: everything fsynced reads back (qemu-img convert)" % name, not probs,
            "%s [%d ops required, %d issued after the last fsyncs]" % (
                "; ".join(probs), model.n_required, model.n_alt))
    print("  model: %d ops required, %d later ops optional; virtual size %d" % (
        model.n_required, model.n_alt, len(actual)), flush=True)
    if "snap_sha" in extra:
        got = H.sha256_file(H.to_raw(img, os.path.join(work, "snap.now"), snapshot=v["snapshot"]))
        T.check("%s: snapshot %s unchanged" % (name, v["snapshot"]), got == extra["snap_sha"],
                "sha %s, expected %s" % (got[:16], extra["snap_sha"][:16]))
    if "base_sha" in extra:
        got = H.sha256_file(extra["base"])
        T.check("%s: backing file unchanged" % name, got == extra["base_sha"], "sha changed")

    # ---- remount: read, write again, clean unmount
    j2path = os.path.join(work, "journal.after")
    cfg2 = dict(path=None, journal=j2path, wid=0, nw=1, chunk=200000, init_size=len(actual),
                seed=seed + 1000, sizes=v["sizes"], punch=v["punch"], grow=False,
                max_size=len(actual), sync_every=[5, 20], ops=60, final_sync=True)
    log2 = ""
    try:
        with H.Mount(src) as m2:
            cfg2["path"] = m2.path("disk.raw")
            T.check_compare("%s: remounted qcowfs reads what qemu-img convert reads" % name,
                            m2.path("disk.raw"), after_raw, nreads=40,
                            cluster_size=H.cluster_size(img))
            if "snap_ref" in extra:
                T.check_compare("%s: snapshot view reads the snapshot" % name,
                                m2.path("disk@%s.raw" % v["snapshot"]), extra["snap_ref"], nreads=20)
            p = J.start_writer(cfg2)
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            j2 = J.Journal(j2path, cfg2)
            T.check("%s: writing again after the crash works (60 ops, fsync, close)" % name,
                    p.returncode == 0 and j2.ended and not j2.errors,
                    "exit %s, errors %s, output %s; log tail %s" % (
                        p.returncode, [(s, H.errname(e), w) for s, e, t, w in j2.errors],
                        H.dec(p.stdout.read()).strip()[-300:], m2.log_text()[-1500:]))
            if lazy and dirty:
                print("  lazy image was dirty at mount: qcowfs must have rebuilt its refcounts "
                      "before that write", flush=True)
            log2 = m2.log_text()
    except H.MountError as e:
        T.check("%s: remount and clean unmount (exit 0)" % name, False, str(e))
        return
    f2 = H.features(img)
    T.check("%s: after the clean unmount the dirty bit is clear" % name,
            not f2["inc"] & H.INCOMPAT_DIRTY, "incompatible 0x%x" % f2["inc"])
    T.check("%s: after the clean unmount the corrupt bit is clear" % name,
            not f2["inc"] & H.INCOMPAT_CORRUPT, "incompatible 0x%x" % f2["inc"])
    c2 = H.qcheck(img)
    print("  after remount+write+unmount: " + c2.summary(), flush=True)
    if lazy and dirty:
        T.check("%s: dirty image rebuilt before its first write: check exit 0, no leaks" % name,
                c2.clean(), c2.summary())
    else:
        T.check("%s: after remount+write+unmount: check exit 0/3, nothing but leaks" % name,
                c2.leaks_only(), c2.summary())
        if c2.leaks is not None and leaks_before is not None:
            T.check("%s: the clean close adds no leaked clusters (%d after the crash, %d now)" % (
                name, leaks_before, c2.leaks), c2.leaks <= leaks_before, c2.summary())
            if c2.leaks:
                print("  NOTE: %d leaked clusters from the crash remain after a clean remount cycle"
                      % c2.leaks, flush=True)
    final = H.read_raw(img, os.path.join(work, "final.raw"))
    m2model = J.Model(actual, len(actual), len(actual), [J.Journal(j2path, cfg2)])
    probs = m2model.verify(final)
    T.check("%s: the writes after the remount read back exactly" % name,
            not probs and m2model.n_alt == 0, "; ".join(probs) + " [%d later ops]" % m2model.n_alt)
    if "snap_sha" in extra:
        got = H.sha256_file(H.to_raw(img, os.path.join(work, "snap.final"), snapshot=v["snapshot"]))
        T.check("%s: snapshot %s still unchanged" % (name, v["snapshot"]), got == extra["snap_sha"],
                "sha %s, expected %s" % (got[:16], extra["snap_sha"][:16]))
    if "base_sha" in extra:
        T.check("%s: backing file still unchanged" % name, H.sha256_file(extra["base"]) == extra["base_sha"])
    if T.failed > failed_before:
        print("  qcowfs log (crashed mount): %s" % log1[-2500:], flush=True)
        print("  qcowfs log (remount): %s" % log2[-2500:], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return model.n_required


synced_rounds = []
ran_rounds = []
ONLY = {int(x) for x in os.environ.get("H5_ONLY", "").split(",") if x.strip()}


def crash_round(i, variant, mode):
    ran_rounds.append(i)
    if run_round(i, variant, mode):
        synced_rounds.append(i)


for i, (variant, mode) in enumerate(ROUNDS):
    if not ONLY or i in ONLY:
        T.add_test("test_round_%02d_%s_%s" % (i, variant, mode), crash_round, i, variant, mode)


@T.at_end
def enough_rounds_verified():
    T.check("fsynced data was there to verify in at least half of the rounds (%d of %d)" % (
        len(synced_rounds), len(ran_rounds)), 2 * len(synced_rounds) >= len(ran_rounds), synced_rounds)


T.run()
