#!/usr/bin/env python3
"""The command line: --help/--version, errors for bad directories, daemon mode, unmounting by
fusermount3/umount/SIGTERM/SIGINT, -o ro, -o allow_other, -d, --log."""

import errno
import os
import shutil
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

MiB = H.MiB
T = H.TestRun("cli", deadline=300)
BIN = H.qcowfs_bin()

work = H.tempdir("cli")
SRC = os.path.join(work, "src")
os.makedirs(SRC)


@T.fixture
def images():
    global REF
    H.create(os.path.join(SRC, "one.qcow2"), 2 * MiB)
    H.qemu_io(os.path.join(SRC, "one.qcow2"), "write -P 0x61 0 1M", "write -P 0x62 1500000 3000")
    REF = H.to_raw(os.path.join(SRC, "one.qcow2"), os.path.join(work, "one.ref"))


def pids_for(mnt):
    p = subprocess.run(["pgrep", "-f", mnt], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return [int(x) for x in p.stdout.split()]


def kill_strays(mnt):
    """Cleans up after a qcowfs that should not have mounted or not have stayed."""
    if H.is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    for pid in pids_for(mnt):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def run_bin(args, timeout=15, cwd=None):
    """Runs qcowfs with output to files (a daemon may keep inherited fds). Returns
    (exit code or None on timeout, stdout, stderr)."""
    d = H.tempdir("out")
    out, err = os.path.join(d, "out"), os.path.join(d, "err")
    cmd = [BIN] + args
    print("  $ " + H.fmt_cmd(cmd), flush=True)
    with open(out, "wb") as fo, open(err, "wb") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=cwd)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = None
    return code, open(out, "rb").read().decode("utf-8", "replace"), \
        open(err, "rb").read().decode("utf-8", "replace")


def run_bin_wrapped(cmd, timeout=15):
    """Like run_bin for a command line that runs qcowfs itself."""
    print("  $ " + H.fmt_cmd(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def expect_error(what, args, mnt, mounts_before=0):
    code, out, err = run_bin(args, timeout=10)
    lines = [l for l in err.splitlines() if l.strip()]
    T.check("%s: non-zero exit" % what, code not in (0, None), "exit %s" % code)
    T.check("%s: exactly one stderr line starting with 'qcowfs: '" % what,
            len(lines) == 1 and lines[0].startswith("qcowfs: "), "stderr %r" % err[:500])
    T.check("%s: nothing mounted" % what, H.mount_count(mnt) == mounts_before,
            "%d mounts at %s" % (H.mount_count(mnt), mnt))
    if H.mount_count(mnt) > mounts_before:
        subprocess.run(["fusermount3", "-u", mnt])
    if code is None or code == 0:
        kill_strays(mnt)


# ---- --help, --version -------------------------------------------------------------------------


@T.test
def test_help_version():
    for opt in ("--help", "--version"):
        code, out, err = run_bin([opt], timeout=10)
        T.check("%s exits 0" % opt, code == 0, "exit %s, stderr %r" % (code, err[:300]))
        T.check("%s prints something" % opt, (out + err).strip() != "", "no output")
    code, out, err = run_bin(["--version"], timeout=10)
    T.check("--version mentions a version number", re.search(r"\d+\.\d+", out + err) is not None,
            (out + err)[:200])
    code, out, err = run_bin(["--help"], timeout=10)
    T.check("--help mentions SOURCE_DIR/MOUNTPOINT usage", "qcowfs" in (out + err).lower(),
            (out + err)[:200])


# ---- errors ----------------------------------------------------------------------------------


@T.test
def test_errors():
    images()
    mnt = H.tempdir("mnt")
    missing = os.path.join(work, "does-not-exist")
    expect_error("missing SOURCE_DIR (-f)", ["-f", missing, mnt], mnt)
    expect_error("missing SOURCE_DIR (daemon)", [missing, mnt], mnt)
    expect_error("missing mountpoint (-f)", ["-f", SRC, missing], missing)
    expect_error("missing mountpoint (daemon)", [SRC, missing], missing)
    notdir = os.path.join(work, "afile")
    open(notdir, "w").close()
    expect_error("SOURCE_DIR is a regular file", ["-f", notdir, mnt], mnt)
    for bad in ("5", "86400001", "abc", "100ms", ""):
        expect_error("-o scan_interval=%s" % bad, ["-f", "-o", "scan_interval=" + bad, SRC, mnt], mnt)
    # No /dev/fuse: an empty /dev in a private mount namespace (nothing outside it changes).
    if shutil.which("unshare"):
        code, out, err = run_bin_wrapped(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                          'mount -t tmpfs none /dev && exec "$0" -f "$1" "$2"', BIN, SRC, mnt])
        lines = [l for l in err.splitlines() if l.strip()]
        T.check("no /dev/fuse: non-zero exit", code not in (0, None), "exit %s" % code)
        T.check("no /dev/fuse: one line naming /dev/fuse",
                len(lines) == 1 and lines[0].startswith("qcowfs: ") and "/dev/fuse" in lines[0], err[:300])
        T.check("no /dev/fuse: nothing mounted", H.mount_count(mnt) == 0, "mounted")
    try:
        with H.Mount(SRC) as m:
            expect_error("busy mountpoint (-f)", ["-f", SRC, m.mnt], m.mnt, mounts_before=1)
            expect_error("busy mountpoint (daemon)", [SRC, m.mnt], m.mnt, mounts_before=1)
            T.check("first mount still serves after the refused second one",
                    H.listdir_safe(m.mnt) == ["one.raw"], H.listdir_safe(m.mnt))
    except H.MountError as e:
        T.check("busy mountpoint: first mount", False, str(e))


# ---- daemon mode -----------------------------------------------------------------------------


@T.test
def test_daemon_mode():
    images()
    mnt = H.tempdir("mnt")
    log = os.path.join(H.tempdir("log"), "d.log")
    t0 = time.monotonic()
    code, out, err = run_bin(["--log=%s" % log, SRC, mnt], timeout=20)
    dt = time.monotonic() - t0
    # no sleep here: the mount must be live when the command returns
    listing = H.listdir_safe(mnt)
    mounted = H.is_mounted(mnt)
    T.check("daemon: returns exit 0", code == 0, "exit %s after %.1fs, stderr %r" % (code, dt, err[:300]))
    T.check("daemon: mounted when the command returns", mounted)
    T.check("daemon: os.listdir right after return shows the image", listing == ["one.raw"], listing)
    try:
        if mounted:
            T.check_compare("daemon: one.raw reads correctly", os.path.join(mnt, "one.raw"), REF,
                            nreads=30)
        pids = pids_for(mnt)
        T.check("daemon: a qcowfs process is running (pgrep -f MNT)", len(pids) >= 1, pids)
        p = H.run(["fusermount3", "-u", mnt], check=False)
        T.check("daemon: fusermount3 -u succeeds", p.returncode == 0, p.err)
        ok, dt = H.wait_for(lambda: not pids_for(mnt), timeout=10)
        T.check("daemon: process exits after fusermount3 -u", ok, "still running: %s" % pids_for(mnt))
        T.check("daemon: not mounted any more", not H.is_mounted(mnt))
    finally:
        kill_strays(mnt)


@T.test
def test_daemon_relative_paths():
    images()
    mnt = H.tempdir("mnt")
    code, out, err = run_bin(["--log=d.log", "src", os.path.relpath(mnt, work)], timeout=20, cwd=work)
    try:
        T.check("daemon (relative paths): exit 0", code == 0, "exit %s, stderr %r" % (code, err[:300]))
        listing = H.listdir_safe(mnt)
        T.check("daemon (relative paths): SOURCE_DIR resolved before daemonizing",
                listing == ["one.raw"], listing)
        if listing == ["one.raw"]:
            T.check_compare("daemon (relative paths): reads", os.path.join(mnt, "one.raw"), REF,
                            nreads=10)
        p = H.run(["fusermount3", "-u", mnt], check=False)
        ok, _ = H.wait_for(lambda: not pids_for(mnt), timeout=10)
        T.check("daemon (relative paths): exits after unmount", ok and p.returncode == 0)
    finally:
        kill_strays(mnt)


# ---- unmount by signal / umount ------------------------------------------------------------
def unmount_by(how):
    images()
    m = H.Mount(SRC)
    try:
        m.start()
        T.check_compare("%s: read before" % how, m.path("one.raw"), REF, nreads=5, whole=False)
        if how == "SIGTERM":
            m.proc.send_signal(signal.SIGTERM)
        elif how == "SIGINT":
            m.proc.send_signal(signal.SIGINT)
        elif how == "umount":
            H.run(["umount", m.mnt])
        else:
            H.run(["fusermount3", "-u", m.mnt])
        try:
            code = m.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            code = "still running after 20 s"
        T.check("%s: foreground process exits 0" % how, code == 0, "exit %s; output %s" % (
            code, m.output_text()[-500:]))
        ok, _ = H.wait_for(lambda: not H.is_mounted(m.mnt), timeout=2)
        T.check("%s: unmounted" % how, ok)
    finally:
        m.force_cleanup()


for how in ("SIGTERM", "SIGINT", "umount", "fusermount3 -u"):
    T.add_test("test_unmount_by_%s" % how.split()[0].lower(), unmount_by, how)


# ---- SIGTERM while reads are in flight -------------------------------------------------------


@T.test
def test_sigterm_under_load():
    images()
    import threading
    ref = open(REF, "rb").read()
    m = H.Mount(SRC)
    try:
        m.start()
        stop = threading.Event()
        results = {"ok": 0, "wrong": 0, "errors": 0}
        lock = threading.Lock()

        def reader(seed):
            import random
            rnd = random.Random(seed)
            try:
                fd = os.open(m.path("one.raw"), os.O_RDONLY)
            except OSError:
                with lock:
                    results["errors"] += 1
                return
            try:
                while not stop.is_set():
                    off = rnd.randrange(0, max(1, len(ref) - 1))
                    n = rnd.randrange(1, 1 << 20)
                    try:
                        data = os.pread(fd, n, off)
                    except OSError:
                        with lock:
                            results["errors"] += 1
                        break  # unmounted under us: the kernel ends the rest
                    with lock:
                        results["ok" if data == ref[off:off + n] else "wrong"] += 1
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        m.proc.send_signal(signal.SIGTERM)
        try:
            code = m.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            code = "still running after 20 s"
        stop.set()
        for t in threads:
            t.join(timeout=10)
        T.check("SIGTERM under load: exits 0", code == 0, "exit %s" % code)
        T.check("SIGTERM under load: no reader hangs", not any(t.is_alive() for t in threads), "a read never returned")
        T.check("SIGTERM under load: reads happened", results["ok"] > 0, results)
        T.check("SIGTERM under load: no read returned wrong bytes", results["wrong"] == 0, results)
        ok, _ = H.wait_for(lambda: not H.is_mounted(m.mnt), timeout=2)
        T.check("SIGTERM under load: unmounted", ok)
    finally:
        m.force_cleanup()


# ---- -o ro, -o allow_other ------------------------------------------------------------------


@T.test
def test_read_only():
    images()
    try:
        with H.Mount(SRC, args=["-o", "ro"]) as m:
            e = H.mountinfo_entry(m.mnt)
            T.check("-o ro: mount is read-only in mountinfo",
                    e is not None and "ro" in e["mount_options"].split(","), e)
            T.check("-o ro: fstype is fuse", e is not None and e["fstype"].startswith("fuse"), e)
            T.check_compare("-o ro: reads", m.path("one.raw"), REF, nreads=20)
            try:
                os.close(os.open(m.path("one.raw"), os.O_RDWR))
                T.check("-o ro: open O_RDWR fails", False, "succeeded")
            except OSError as ex:
                T.check("-o ro: open O_RDWR fails with EROFS/EACCES",
                        ex.errno in (errno.EROFS, errno.EACCES), H.errname(ex.errno))
    except H.MountError as ex:
        T.check("-o ro: mount/unmount", False, str(ex))


@T.test
def test_allow_other():
    images()
    try:
        with H.Mount(SRC, args=["-o", "allow_other"]) as m:
            e = H.mountinfo_entry(m.mnt)
            T.check("-o allow_other passed to FUSE", e is not None and
                    "allow_other" in e["super_options"], e)
            T.check("-o allow_other: listing", H.listdir_safe(m.mnt) == ["one.raw"])
    except H.MountError as ex:
        T.check("-o allow_other: mount/unmount", False, str(ex))


# ---- -d and --log -----------------------------------------------------------------------------


@T.test
def test_debug():
    images()
    log = os.path.join(H.tempdir("log"), "debug.log")
    with open(log, "w") as f:
        f.write("previous line\n")
    try:
        with H.Mount(SRC, args=["-d"], log=log) as m:
            with open(m.path("one.raw"), "rb") as f:
                f.read(4096)
            os.listdir(m.mnt)
            time.sleep(0.2)
            text = m.log_text() + "\n" + m.output_text()
        T.check("-d: log output non-empty", text.strip() not in ("", "previous line"), text[:300])
        T.check("-d: mentions a read or lookup",
                re.search(r"read|lookup", text, re.IGNORECASE) is not None, text[-500:])
        T.check("--log appends (earlier content kept)",
                open(log).read().startswith("previous line\n"), open(log).read()[:200])
    except H.MountError as ex:
        T.check("-d: mount/unmount", False, str(ex))


@T.test
def test_foreground_logs_to_stderr():
    images()
    d = H.tempdir("log")
    mnt = H.tempdir("mnt")
    errf = os.path.join(d, "stderr")
    with open(errf, "wb") as fe:
        p = subprocess.Popen([BIN, "-f", "-d", SRC, mnt], stdout=subprocess.DEVNULL, stderr=fe)
    try:
        ok, _ = H.wait_for(lambda: H.is_mounted(mnt), timeout=10)
        T.check("-f -d: mounted", ok)
        if ok:
            with open(os.path.join(mnt, "one.raw"), "rb") as f:
                f.read(100)
            H.run(["fusermount3", "-u", mnt])
        code = p.wait(timeout=20)
        T.check("-f -d: exit 0", code == 0, code)
        text = open(errf, "rb").read().decode("utf-8", "replace")
        T.check("-f -d: requests logged to stderr",
                re.search(r"read|lookup", text, re.IGNORECASE) is not None, text[-300:])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        kill_strays(mnt)


# ---- mountpoint inside SOURCE_DIR -------------------------------------------------------------


@T.test
def test_mountpoint_inside_source():
    images()
    inner = os.path.join(SRC, "inner-mnt")
    os.makedirs(inner)
    try:
        with H.Mount(SRC, mnt=inner) as m:
            r = H.run([sys.executable, "-c", "import os,sys; print(sorted(os.listdir(sys.argv[1])))",
                       m.mnt], check=False, timeout=10)
            T.check("mountpoint inside SOURCE_DIR: listing works (no self-recursion/deadlock)",
                    r.returncode == 0 and "one.raw" in r.out, r.out + r.err)
            time.sleep(1.2)  # one rescan period
            T.check("mountpoint inside SOURCE_DIR: still alive after a rescan", m.alive())
            T.check_compare("mountpoint inside SOURCE_DIR: reads", m.path("one.raw"), REF, nreads=10)
    except (H.MountError, H.CmdError) as ex:
        T.check("mountpoint inside SOURCE_DIR", False, str(ex))
    finally:
        kill_strays(inner)


T.run()
