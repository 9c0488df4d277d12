"""Helpers for the qcowfs-stream integration test: the binary, piped runs, and a hand-made qcow2
writer that puts tables after the data they map (qemu-img never lays an image out this way on
purpose; qemu-img check and convert accept it)."""

import math
import os
import random
import signal
import struct
import subprocess
import threading
import time
import zlib

import harness as H


def stream_bin():
    """qcowfs-stream beside the qcowfs binary under test (same build directory)."""
    p = os.environ.get("QCOWFS_STREAM_BIN")
    if p:
        return p
    return os.path.join(os.path.dirname(os.path.abspath(H.qcowfs_bin())), "qcowfs-stream")


class Result:
    def __init__(self, code, err, seconds):
        self.code = code
        self.err = err
        self.seconds = seconds

    def __repr__(self):
        return "exit %s after %.2fs: %s" % (self.code, self.seconds, H.clip_text(self.err))


def sh(script, timeout=300):
    """Runs a bash pipeline with pipefail; returns Result (stderr text)."""
    t0 = time.monotonic()
    p = subprocess.run(["bash", "-o", "pipefail", "-c", script], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout)
    return Result(p.returncode, p.stderr.decode("utf-8", "replace"), time.monotonic() - t0)


def q(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


def decode_pipe(img, out, args=""):
    """cat IMG | qcowfs-stream decode ARGS - - | cat > OUT: a pipe at both ends."""
    return sh("cat %s | %s decode %s - - | cat > %s" % (q(img), q(stream_bin()), args, q(out)))


def decode_file(img, out, args=""):
    """cat IMG | qcowfs-stream decode ARGS - OUT: a pipe in, a sparse file out."""
    return sh("cat %s | %s decode %s - %s" % (q(img), q(stream_bin()), args, q(out)))


def decode_fed(img, out, pipe_out=False, endless=False, args="", timeout=60):
    """IMG, written by a thread of this process into a pipe, into `qcowfs-stream decode ARGS -
    OUT` (pipe_out: `- - | cat > OUT`). `endless`: zeros follow IMG for as long as the decoder
    reads, so that it never sees the end of its input: it can only stop by itself. Returns a
    Result with .fed, the bytes written (what the decoder read, plus at most the pipe's buffer);
    code None if the decoder had not finished after `timeout` seconds (it is killed then)."""
    with open(img, "rb") as f:
        data = f.read()
    script = "%s decode %s - %s" % (q(stream_bin()), args, "- | cat > %s" % q(out) if pipe_out else q(out))
    r, w = os.pipe()
    t0 = time.monotonic()
    p = subprocess.Popen(["bash", "-o", "pipefail", "-c", script], stdin=r, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    os.close(r)  # only the decoder's end stays open: its exit breaks the pipe
    fed = [0]

    def feed():
        zeros = memoryview(bytes(1 << 20))
        try:
            view = memoryview(data)
            while view:
                n = os.write(w, view)
                fed[0] += n
                view = view[n:]
            while endless:
                fed[0] += os.write(w, zeros)
        except OSError:  # EPIPE: the decoder has exited
            pass
        finally:
            os.close(w)

    th = threading.Thread(target=feed, daemon=True)
    th.start()
    try:
        _, err = p.communicate(timeout=timeout)
        code = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        code = None
    th.join()
    res = Result(code, err.decode("utf-8", "replace"), time.monotonic() - t0)
    res.fed = fed[0]
    return res


def allocated(path):
    return os.stat(path).st_blocks * 512


def files_equal(a, b, chunk=4 * H.MiB):
    """None if equal, else a description of the first difference."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return "sizes differ: %d vs %d" % (sa, sb)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                for i in range(min(len(x), len(y))):
                    if x[i] != y[i]:
                        return "first difference at offset %d" % (off + i)
                return "lengths differ near %d" % off
            if not x:
                return None
            off += len(x)


# ------------------------------------------------------------------------------------------
# hand-made images


def _deflate(data):
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def build_image(path, size, cs, writes, order=("data", "l2", "l1"), seed=0):
    """Writes a valid qcow2 v3 image (16-bit refcounts, one refcount block) of virtual `size`
    with cluster size `cs`. `writes` maps a guest cluster index to its bytes (cs long) or to
    ("c", bytes) for a zlib-compressed cluster. `order` lays the kinds out after the header,
    refcount table and block: "data" (normal clusters in shuffled order, then the packed
    compressed ones), "l2" (the L2 tables), "l1" (the L1 table). Returns a dict of host offsets:
    {"l1": off, "l2": {l1_index: off}, "data": {guest_cluster: off}, "comp": {guest_cluster: off}}."""
    l2e = cs // 8
    n_l1 = max(1, math.ceil(size / (cs * l2e)))
    l1_clusters = math.ceil(n_l1 * 8 / cs)
    normal = sorted(g for g, v in writes.items() if not isinstance(v, tuple))
    comp = sorted(g for g, v in writes.items() if isinstance(v, tuple))
    random.Random(seed).shuffle(normal)
    blobs = {g: _deflate(writes[g][1]) for g in comp}
    l2_indexes = sorted({g // l2e for g in writes})

    nxt = [3]  # cluster 0 header, 1 refcount table, 2 refcount block

    def alloc(n):
        r = nxt[0]
        nxt[0] += n
        return r * cs

    where = {"data": {}, "comp": {}, "l2": {}, "l1": None}
    comp_area = None
    for kind in order:
        if kind == "data":
            for g in normal:
                where["data"][g] = alloc(1)
            if comp:
                start = nxt[0] * cs
                off = start
                for g in comp:
                    where["comp"][g] = off
                    off += len(blobs[g])
                comp_area = (start, off)
                alloc(math.ceil((off - start) / cs))
        elif kind == "l2":
            for i in l2_indexes:
                where["l2"][i] = alloc(1)
        elif kind == "l1":
            where["l1"] = alloc(l1_clusters)
    total = nxt[0]
    if total > cs // 2:
        raise ValueError("image needs more than one refcount block")

    refs = [1] * total
    x = 62 - (int(math.log2(cs)) - 8)
    l2 = {i: bytearray(cs) for i in l2_indexes}
    if comp_area:
        for c in range(comp_area[0] // cs, math.ceil(comp_area[1] / cs)):
            refs[c] = 0
    for g in normal:
        struct.pack_into(">Q", l2[g // l2e], (g % l2e) * 8, where["data"][g] | (1 << 63))
    for g in comp:
        off = where["comp"][g]
        nb = (off % 512 + len(blobs[g]) + 511) // 512 - 1
        struct.pack_into(">Q", l2[g // l2e], (g % l2e) * 8, (1 << 62) | (nb << x) | off)
        end = off - off % 512 + (nb + 1) * 512
        for c in range(off // cs, (end - 1) // cs + 1):
            refs[c] += 1

    img = bytearray(total * cs)
    hdr = struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649fb, 3, 0, 0, int(math.log2(cs)), size, 0,
                      n_l1, where["l1"], cs, 1, 0, 0, 0, 0, 0, 4, 104)
    img[0:len(hdr)] = hdr
    struct.pack_into(">Q", img, cs, 2 * cs)
    for c, r in enumerate(refs):
        struct.pack_into(">H", img, 2 * cs + 2 * c, r)
    for i, off in where["l2"].items():
        struct.pack_into(">Q", img, where["l1"] + 8 * i, off | (1 << 63))
        img[off:off + cs] = l2[i]
    for g in normal:
        img[where["data"][g]:where["data"][g] + cs] = writes[g]
    for g in comp:
        img[where["comp"][g]:where["comp"][g] + len(blobs[g])] = blobs[g]
    with open(path, "wb") as f:
        f.write(img)
    return where
