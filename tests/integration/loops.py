"""Loop devices for the tests that put a file system on an exposed disk: a skip (77) when the
machine cannot attach one, and attach/mount bookkeeping that is undone at the end."""

import os
import shutil
import subprocess
import sys

from mounts import cleanup, is_mounted
from procs import run
from runner import SKIP


def skip(reason):
    print("SKIP: %s" % reason, flush=True)
    cleanup()
    sys.exit(SKIP)


def require_loop_devices(workdir, tools=("losetup", "mkfs.ext4", "mount", "umount")):
    """Skips the test unless the tools exist and a loop device can be attached (to a probe file
    in workdir)."""
    for tool in tools:
        if shutil.which(tool) is None:
            skip("%s missing" % tool)
    if not os.path.exists("/dev/loop-control"):
        skip("no /dev/loop-control")
    probe = os.path.join(workdir, "probe.img")
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
    p = subprocess.run(["losetup", "-f", "--show", probe], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if p.returncode != 0:
        skip("losetup not possible: %s" % p.stderr.decode().strip())
    subprocess.run(["losetup", "-d", p.stdout.decode().strip()])
    os.unlink(probe)


class LoopDevices:
    """The loop devices attached and the block-device mounts made, so cleanup() can undo what a
    failed step left behind."""

    def __init__(self):
        self.loops = []
        self.mounted = []

    def attach(self, path, ro=False, direct=False):
        cmd = ["losetup", "-f", "--show"] + (["-r"] if ro else []) + (
            ["--direct-io=on"] if direct else []) + [path]
        dev = run(cmd).out.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev):
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    def mount(self, dev, d, ro=False):
        os.makedirs(d, exist_ok=True)
        run(["mount"] + (["-o", "ro"] if ro else []) + [dev, d])
        self.mounted.append(d)
        return d

    def umount(self, d):
        run(["umount", d], timeout=300)
        self.mounted.remove(d)

    def ext4_with(self, raw, size, tree, mnt_dir):
        """Makes raw (size bytes) an ext4 file system holding a copy of the directory tree, and
        leaves it mounted at mnt_dir on a loop device; returns (device, mnt_dir)."""
        with open(raw, "wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", raw])
        dev = self.attach(raw)
        d = self.mount(dev, mnt_dir)
        run(["cp", "-a", tree + "/.", d + "/"])
        return dev, d

    def cleanup(self):
        for d in reversed(self.mounted):
            subprocess.run(["umount", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if is_mounted(d):
                subprocess.run(["umount", "-l", d], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        self.mounted.clear()
        for dev in reversed(self.loops):
            subprocess.run(["losetup", "-d", dev], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.loops.clear()
