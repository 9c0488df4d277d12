#!/usr/bin/env python3
"""QEMU's image locks, both ways: qcowfs cannot open an image that QEMU writes (EBUSY, one log
line, listing and stat still work), QEMU cannot write an image that qcowfs has open (QEMU's own
"Failed to get "write" lock"), qemu-img info works beside a qcowfs reader, backing and data files
are locked as QEMU locks them, and -o force_share reads a locked image read-only without locks."""

import errno
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import trusthelp as TH  # noqa: E402

MiB = H.MiB
T = H.TestRun("locks", deadline=300)

work = H.tempdir("locks")
SRC = os.path.join(work, "src")
os.makedirs(SRC)


def S(name):
    return os.path.join(SRC, name)


def closed_by_qcowfs(img, timeout=15):
    """Release is asynchronous: wait until qcowfs holds no lock bytes on img."""
    ok, _ = H.wait_for(lambda: not TH.lock_bytes(img), timeout=timeout, interval=0.1)
    return ok


@T.fixture
def images():
    H.create(S("vm.qcow2"), 4 * MiB)
    H.qemu_io(S("vm.qcow2"), "write -P 0x21 0 1M")
    H.create(S("base.qcow2"), 4 * MiB)
    H.qemu_io(S("base.qcow2"), "write -P 0x31 0 2M")
    H.create(S("top.qcow2"), 4 * MiB, backing="base.qcow2", cwd=SRC)
    os.makedirs(os.path.join(SRC, "data"))
    H.create(S("ext.qcow2"), 4 * MiB, "data_file=%s,data_file_raw=on" % os.path.join(SRC, "data", "ext.raw"))
    H.qemu_io(S("ext.qcow2"), "write -P 0x41 0 1M")


@T.test
def test_qemu_first():
    images()
    with H.Mount(SRC) as m:
        holder = TH.QemuHolder(S("vm.qcow2"))
        try:
            T.check("vm.raw still listed while QEMU writes it", "vm.raw" in os.listdir(m.mnt))
            T.check("stat works", os.stat(m.path("vm.raw")).st_size == 4 * MiB)
            T.check("open for reading: EBUSY", H.open_errno(m.path("vm.raw"), os.O_RDONLY) == errno.EBUSY)
            T.check("open for writing: EBUSY", H.open_errno(m.path("vm.raw"), os.O_RDWR) == errno.EBUSY)
            log = m.log_text()
            T.check("one log line names the image and the lock",
                    len([l for l in log.splitlines() if "vm.qcow2" in l]) == 1 and "lock" in log, log[-800:])
            T.check("other images still open", H.open_errno(m.path("base.raw"), os.O_RDONLY) == 0)
        finally:
            holder.stop()
        T.check("once QEMU is gone, vm.raw opens for writing", H.open_errno(m.path("vm.raw"), os.O_RDWR) == 0)

        # qemu-io read-only beside: qcowfs may read, not write.
        holder = TH.QemuHolder(S("vm.qcow2"), read_only=True)
        try:
            T.check("QEMU reading: qcowfs reads", H.open_errno(m.path("vm.raw"), os.O_RDONLY) == 0)
            T.check("QEMU reading: qcowfs write open EBUSY", H.open_errno(m.path("vm.raw"), os.O_RDWR) == errno.EBUSY)
        finally:
            holder.stop()


@T.test
def test_qcowfs_first():
    images()
    with H.Mount(SRC) as m:
        fd = os.open(m.path("vm.raw"), os.O_RDWR)
        try:
            os.pwrite(fd, b"\x77" * 65536, 0)
            os.fsync(fd)
            ok, text = TH.qemu_write(S("vm.qcow2"))
            T.check("qemu-io write refused while qcowfs writes", not ok and 'Failed to get "write" lock' in text,
                    text)
            p = H.run(["qemu-img", "info", S("vm.qcow2")], check=False)
            T.check("qemu-img info refused while qcowfs writes (as beside a VM)", p.returncode != 0, p.err)
        finally:
            os.close(fd)
        T.check("qcowfs releases its locks after the last close", closed_by_qcowfs(S("vm.qcow2")))
        ok, text = TH.qemu_write(S("vm.qcow2"), pattern=0x66, offset=MiB)
        T.check("qemu-io writes once qcowfs closed the image", ok, text)

        fd = os.open(m.path("vm.raw"), os.O_RDONLY)
        try:
            p = H.run(["qemu-img", "info", S("vm.qcow2")], check=False)
            T.check("qemu-img info works beside a qcowfs reader", p.returncode == 0, p.err)
            ok, text = TH.qemu_write(S("vm.qcow2"))
            T.check("qemu-io write refused beside a qcowfs reader", not ok and "lock" in text, text)
            T.check("reader holds read locks only", TH.lock_bytes(S("vm.qcow2")) == {100, 201, 203},
                    TH.lock_bytes(S("vm.qcow2")))
            fd2 = os.open(m.path("vm.raw"), os.O_RDWR)
            T.check("a writer adds write and resize", TH.lock_bytes(S("vm.qcow2")) == {100, 101, 103, 201, 203},
                    TH.lock_bytes(S("vm.qcow2")))
            os.close(fd2)
        finally:
            os.close(fd)
        T.check("closed again", closed_by_qcowfs(S("vm.qcow2")))

        # Backing files: read, writes not shared.
        fd = os.open(m.path("top.raw"), os.O_RDWR)
        try:
            os.pread(fd, 4096, 0)
            ok, text = TH.qemu_write(S("base.qcow2"))
            T.check("qemu-io cannot write the backing file of an image qcowfs has open", not ok and "lock" in text,
                    text)
            p = H.run(["qemu-img", "info", S("base.qcow2")], check=False)
            T.check("qemu-img info of that backing file works", p.returncode == 0, p.err)
        finally:
            os.close(fd)
        # External data file: locked for writing with the image.
        fd = os.open(m.path("ext.raw"), os.O_RDWR)
        try:
            data = os.path.join(SRC, "data", "ext.raw")
            ok, text = TH.qemu_write(data, fmt="raw")
            T.check("qemu-io cannot write the data file of an image qcowfs writes", not ok and "lock" in text, text)
        finally:
            os.close(fd)
        T.check("data file closed", closed_by_qcowfs(os.path.join(SRC, "data", "ext.raw")))
    H.check_clean(S("vm.qcow2"))
    T.check("vm.qcow2 clean after both wrote in turn", True)
    ref = os.path.join(work, "vm.ref")
    H.to_raw(S("vm.qcow2"), ref)
    with open(ref, "rb") as f:
        head = f.read(2 * MiB)
    T.check("both writes are in the image", head[:65536] == b"\x77" * 65536 and head[MiB:MiB + 65536] == b"\x66" * 65536)


@T.test
def test_force_share():
    images()
    holder = TH.QemuHolder(S("vm.qcow2"))
    try:
        with H.Mount(SRC, args=["-o", "force_share"]) as m:
            ref = os.path.join(work, "vm-U.ref")
            H.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", S("vm.qcow2"), ref])
            T.check_compare("force_share reads the image QEMU holds", m.path("vm.raw"), ref, nreads=10)
            T.check("force_share: writes refused", H.open_errno(m.path("vm.raw"), os.O_RDWR) in (errno.EROFS, errno.EACCES))
            os.close(os.open(m.path("vm.raw"), os.O_RDONLY))
            fd = os.open(m.path("vm.raw"), os.O_RDONLY)
            held = TH.lock_bytes(S("vm.qcow2"))
            os.close(fd)
            T.check("force_share: no locks taken (only QEMU's)", held == {100, 101, 103, 201, 203},
                    held)
            T.check("force_share: log says so", "force_share" in m.log_text())
    finally:
        holder.stop()


@T.test
def test_reopen_right_after_close():
    """A handle closed and the image opened again at once, from threads that the daemon serves on
    different workers: the new open never meets the closing image's own locks (EBUSY), because
    the last handle's close drops the image, file and locks before a new open can begin."""
    images()
    with H.Mount(SRC) as m:
        path = m.path("vm.raw")
        failures = []

        def cycle(n):
            for i in range(n):
                try:
                    fd = os.open(path, os.O_RDWR)
                    if i % 3 == 0:
                        os.pwrite(fd, b"\x21" * 4096, 4096 * (i % 64))
                    os.close(fd)
                except OSError as e:
                    failures.append(e.errno)

        threads = [threading.Thread(target=cycle, args=(150,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        T.check("450 opens for writing right after closes: none fails", not failures,
                "errnos: %s" % sorted(set(failures)))
        T.check("no lock conflict logged", "Failed to get" not in m.log_text(), m.log_text()[-800:])
    rc, out = H.check_clean(S("vm.qcow2"))
    T.check("vm.qcow2: qemu-img check clean", rc == 0, H.clip_text(out))


T.run()
