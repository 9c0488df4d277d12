"""The qcow2 variants the read tests compare with qemu-img (test_read_variants.py through a mount,
test_stream.py through qcowfs-stream), each made once by the same qemu-img/qemu-io commands:
versions, cluster sizes, refcount widths, zero and compressed (zlib, zstd) clusters, extended
L2, backing chains (qcow2, raw, relative, shorter), external data files, preallocation modes,
odd virtual sizes, internal snapshots and the dirty bit.

    c = ReadVariants(work_dir)              # the images go to work_dir/src (c.src)
    for group in GROUPS: c.build(group)     # makes the images of that group, once
    c.variants                              # [Variant] of the groups built, in order
"""

import os

import harness as H

KiB, MiB = H.KiB, H.MiB

GROUPS = []      # group names, in order
_BUILDERS = {}   # group name -> function(ReadVariants)


class Variant:
    """One file to compare: `image` (its `snapshot`, if any) is shown as `view` under the
    mount; `backing` is the image's direct backing file (for qcowfs-stream's --backing);
    `stream` is False for what qcowfs-stream does not decode (external data files) or does
    not need twice."""

    def __init__(self, group, name, image, snapshot, cs, view, cwd, backing, stream):
        self.group, self.name, self.image, self.snapshot = group, name, image, snapshot
        self.cs, self.view, self.cwd, self.backing = cs, view, cwd, backing
        self.stream = stream and snapshot is None


class ReadVariants:
    def __init__(self, work):
        self.src = os.path.join(work, "src")
        os.makedirs(self.src)
        self.work = work
        self.variants = []
        self._built = {}
        self._group = None
        self._varied = {}

    def img(self, name):
        return os.path.join(self.src, name)

    def varied(self, big=False):
        """A raw file of varied data: 4 MiB (8 MiB if big), made once."""
        if big not in self._varied:
            p = os.path.join(self.work, "varied-big.bin" if big else "varied.bin")
            self._varied[big] = H.write_varied_raw(p, 8 * MiB if big else 4 * MiB,
                                                   seed=8 if big else 7)
        return self._varied[big]

    def add(self, name, img, snapshot=None, cs=64 * KiB, view=None, cwd=None, backing=None,
            stream=True):
        rel = os.path.relpath(img, self.src)
        d, base = os.path.split(rel)
        for suf in (".qcow2", ".qcow"):
            if base.endswith(suf):
                base = base[: -len(suf)]
                break
        if view is None:
            view = base + ("@" + snapshot if snapshot else "") + ".raw"
            view = os.path.join(d, view)
        self.variants.append(Variant(self._group, name, img, snapshot, cs, view, cwd, backing,
                                     stream))

    def build(self, group):
        """Makes the images of `group` (once); returns its variants. Raises what qemu-img
        raised."""
        if group not in self._built:
            self._built[group] = None
            self._group = group
            _BUILDERS[group](self)
            self._built[group] = [v for v in self.variants if v.group == group]
        if self._built[group] is None:
            raise RuntimeError("building %s failed earlier" % group)
        return self._built[group]


def build(name, fn):
    """Registers fn(ReadVariants) as the builder of group `name`."""
    GROUPS.append(name)
    _BUILDERS[name] = fn


def std_writes(cs):
    """Varied writes: patterns (aligned and unaligned), zeroes with and without unmap, a
    compressed cluster, a discard. Offsets fit a 4 MiB image (8 MiB for 2 MiB clusters)."""
    c = max(cs, 64 * KiB)
    return [
        "write -P 0x5a 4k 100k",
        "write -P 0xa5 %d %d" % (7 * c + 12345, c + 70003),  # unaligned, 3 clusters
        "write -P 0x11 %d %d" % (c, c),          # will be zeroed below
        "write -z %d 4k" % c,                    # partial zero inside an allocated cluster
        "write -z %d %d" % (2 * c, c),           # zero cluster on an unallocated cluster
        "write -P 0x22 %d %d" % (3 * c, c),
        "write -z -u %d %d" % (3 * c, c),        # zero with unmap
        "write -c -P 0x33 %d %d" % (4 * c, cs),  # one compressed cluster
        "write -P 0x44 %d %d" % (5 * c, 2 * c),
        "discard %d %d" % (5 * c, c),            # discard an allocated cluster
        "write -P 0x66 %d 1000" % (6 * c + 7),
    ]


# ---- versions, cluster sizes, refcount widths -----------------------------------------------

def v(name, opts, cs=64 * KiB, size=4 * MiB):
    def fn(c):
        p = c.img(name + ".qcow2")
        H.create(p, size, opts)
        H.qemu_io(p, *std_writes(cs))
        c.add(name, p, cs=cs)
    build(name, fn)


v("v2", "compat=0.10")
v("v3", "compat=1.1")
v("cs512", "cluster_size=512", cs=512)
v("cs4k", "cluster_size=4k", cs=4 * KiB)
v("cs64k", "cluster_size=64k")
v("cs2m", "cluster_size=2M", cs=2 * MiB, size=24 * MiB)
for bits in (1, 2, 4, 8, 16, 32, 64):
    v("refcount%d" % bits, "compat=1.1,refcount_bits=%d" % bits)


# ---- zero clusters --------------------------------------------------------------------------

def zeros(c):
    p = c.img("zeros.qcow2")
    H.create(p, 4 * MiB, "compat=1.1")
    H.qemu_io(p, "write -P 0x77 0 4M", "write -z 64k 64k", "write -z -u 256k 192k",
              "write -z 1000000 5000", "write -z -u 3M 1M")
    c.add("zero clusters", p)


build("zeros", zeros)


# ---- compression ----------------------------------------------------------------------------

def compressed(name, opts, big=False, cs=64 * KiB):
    def fn(c):
        p = c.img(name + ".qcow2")
        H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, c.varied(big), p)
        c.add(name, p, cs=cs)
    build(name, fn)


compressed("cmp-zlib", "compression_type=zlib")
compressed("cmp-zstd", "compression_type=zstd")
compressed("cmp-zlib-4k", "compression_type=zlib,cluster_size=4k", cs=4 * KiB)
compressed("cmp-zstd-512", "compression_type=zstd,cluster_size=512", cs=512)
compressed("cmp-zstd-2m", "compression_type=zstd,cluster_size=2M", big=True, cs=2 * MiB)


def plain_from_raw(c):
    p = c.img("plain.qcow2")
    H.qemu_img("convert", "-f", "raw", "-O", "qcow2", c.varied(), p)
    c.add("uncompressed copy of varied data", p)


build("plain", plain_from_raw)


def zstd_qemu_io(c):
    p = c.img("zstd-io.qcow2")
    H.create(p, 4 * MiB, "compression_type=zstd")
    H.qemu_io(p, "write -c -P 0x12 0 128k", "write -c -P 0x34 1M 64k", "write -P 0x56 1M 100",
              "write -c -P 0x78 3M 1M")
    c.add("zstd via qemu-io write -c", p)


build("zstd-io", zstd_qemu_io)


def compressed_mixed(c):
    # compressed clusters from real data, then partly overwritten (copy-on-write of compressed
    # clusters) and partly zeroed
    p = c.img("cmp-mixed.qcow2")
    H.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", c.varied(), p)
    H.qemu_io(p, "write -P 0x99 100000 3000", "write -z 1M 64k", "write -z -u 2M 100k",
              "discard 3M 64k")
    c.add("compressed then overwritten", p)


build("cmp-mixed", compressed_mixed)


# ---- extended L2 ----------------------------------------------------------------------------

def ext_l2_writes(cs):
    sc = cs // 32
    return [
        "write -P 0x01 0 %d" % sc,                          # subcluster 0 only
        "write -P 0x02 %d %d" % (3 * sc + 100, 2 * sc),     # unaligned, spans subclusters
        "write -z %d %d" % (cs + 5 * sc, sc),               # zero subcluster, unallocated cluster
        "write -P 0x03 %d %d" % (2 * cs, cs),               # full cluster
        "write -z %d %d" % (2 * cs + 7 * sc, 3 * sc),       # zero subclusters in allocated cluster
        "write -z -u %d %d" % (2 * cs + 20 * sc, sc),
        "write -P 0x04 %d %d" % (3 * cs + 31 * sc, 2 * sc),  # spans a cluster boundary
        "write -c -P 0x05 %d %d" % (5 * cs, cs),            # compressed cluster
        "discard %d %d" % (2 * cs + 12 * sc, sc),
    ]


def ext_l2(name, cs, size):
    def fn(c):
        p = c.img(name + ".qcow2")
        H.create(p, size, "extended_l2=on,cluster_size=%d" % cs)
        H.qemu_io(p, *ext_l2_writes(cs))
        c.add(name, p, cs=cs)
    build(name, fn)


ext_l2("extl2-64k", 64 * KiB, 4 * MiB)
ext_l2("extl2-2m", 2 * MiB, 16 * MiB)


def ext_l2_backed(c):
    base = c.img("extl2-base.qcow2")
    H.create(base, 4 * MiB)
    H.qemu_io(base, "write -P 0xbb 0 4M")
    top = c.img("extl2-top.qcow2")
    H.create(top, 4 * MiB, "extended_l2=on,cluster_size=64k", backing="extl2-base.qcow2", cwd=c.src)
    H.qemu_io(top, *ext_l2_writes(64 * KiB))
    c.add("extended L2 over a backing file", top, backing=base)
    c.add("extended L2 base", base)


build("extl2-backed", ext_l2_backed)


# ---- backing files --------------------------------------------------------------------------

def chain(c):
    prev = None
    for i in range(4):
        p = c.img("chain%d.qcow2" % i)
        H.create(p, 4 * MiB, backing=os.path.basename(prev) if prev else None, cwd=c.src)
        H.qemu_io(p, "write -P 0x%02x %d 300k" % (0x10 + i, i * 700 * KiB + 1234),
                  "write -z %d 64k" % ((3 - i) * 900 * KiB),
                  "write -P 0x%02x 3M 4k" % (0x50 + i))
        prev = p
        c.add("chain depth %d" % i, p, backing=prev)


build("chain", chain)


def no_backing_format(c):
    # the backing format extension replaced by an unknown (ignorable) extension type: the backing
    # file's format must be probed, and the unknown extension skipped
    base = c.img("nbf-base.qcow2")
    H.create(base, 4 * MiB)
    H.qemu_io(base, "write -P 0x17 0 4M")
    top = c.img("nbf-top.qcow2")
    H.create(top, 4 * MiB, backing="nbf-base.qcow2", cwd=c.src)
    H.qemu_io(top, "write -P 0x18 1M 64k")
    off, typ, ln = H.header_extensions(top)[0]
    if typ != 0xe2792aca:
        raise RuntimeError("first extension is 0x%x, not the backing format" % typ)
    H.patch(top, off, b"\x7e\x57\xe5\x75")
    c.add("backing format extension absent, unknown extension present", top, backing=base)


build("no-backing-format", no_backing_format)


def raw_backing(c):
    base = os.path.join(c.src, "rawbase.bin")  # raw: not shown itself
    H.write_varied_raw(base, 4 * MiB, seed=3)
    p = c.img("rawbacked.qcow2")
    H.create(p, 4 * MiB, backing="rawbase.bin", backing_fmt="raw", cwd=c.src)
    H.qemu_io(p, "write -P 0x21 64k 64k", "write -z 1M 100k", "write -P 0x22 3000001 999")
    c.add("raw backing file", p, backing=base)


build("raw-backing", raw_backing)


def relative_backing(c):
    d = os.path.join(c.src, "rel")
    os.makedirs(d)
    H.create("rbase.qcow2", 4 * MiB, cwd=d)
    H.qemu_io("rbase.qcow2", "write -P 0x31 0 4M", cwd=d)
    H.create("rtop.qcow2", 4 * MiB, backing="rbase.qcow2", cwd=d)
    H.qemu_io("rtop.qcow2", "write -P 0x32 1M 64k", cwd=d)
    c.add("relative backing name (same dir)", os.path.join(d, "rtop.qcow2"), stream=False)
    # backing in a sibling directory, named relative to the image's directory
    bases = os.path.join(c.src, "bases")
    os.makedirs(bases)
    H.create("sib.qcow2", 4 * MiB, cwd=bases)
    H.qemu_io("sib.qcow2", "write -P 0x41 0 2M", cwd=bases)
    d2 = os.path.join(c.src, "rel2")
    os.makedirs(d2)
    H.create("stop.qcow2", 4 * MiB, backing="../bases/sib.qcow2", cwd=d2)
    H.qemu_io("stop.qcow2", "write -P 0x42 1536k 1M", cwd=d2)
    c.add("relative backing name (../bases)", os.path.join(d2, "stop.qcow2"),
          backing=os.path.join(bases, "sib.qcow2"))


build("relative-backing", relative_backing)


def short_backing(c):
    base = c.img("shortbase.qcow2")
    H.create(base, 1000000)  # qemu rounds to 1000448, not a cluster multiple
    H.qemu_io(base, "write -P 0x61 0 1000448")
    top = c.img("shorttop.qcow2")
    H.create(top, 4 * MiB, backing="shortbase.qcow2", cwd=c.src)
    H.qemu_io(top, "write -P 0x62 2M 64k", "write -P 0x63 500000 1000")
    c.add("backing file shorter than the overlay", top, backing=base)
    # and a qcow2 base shorter than the overlay with a raw backing in turn
    rb = os.path.join(c.src, "shortraw.bin")
    with open(rb, "wb") as f:
        f.write(b"\x7e" * 100000)
    top2 = c.img("shortrawtop.qcow2")
    H.create(top2, 1 * MiB, backing="shortraw.bin", backing_fmt="raw", cwd=c.src)
    c.add("raw backing file shorter than the overlay", top2, backing=rb)


build("short-backing", short_backing)


# ---- external data file ---------------------------------------------------------------------

def data_files(c):
    # absolute data file names (qemu resolves a relative one against its cwd)
    p = c.img("ext.qcow2")
    H.create(p, 4 * MiB, "data_file=%s" % c.img("ext.data"))
    H.qemu_io(p, "write -P 0x71 0 1M", "write -P 0x72 2000000 3333", "write -z 512k 64k")
    c.add("external data file", p, stream=False)
    p = c.img("extraw.qcow2")
    H.create(p, 4 * MiB, "data_file=%s,data_file_raw=on" % c.img("extraw.data"))
    H.qemu_io(p, "write -P 0x73 64k 1M", "write -P 0x74 3M 4097")
    c.add("external data file, data_file_raw=on", p, stream=False)
    # a relative data file name, the image and the data file in the same directory: qemu (run
    # from that directory) and qcowfs (resolving against the image's directory) agree
    p = c.img("extrel.qcow2")
    H.create("extrel.qcow2", 4 * MiB, "data_file=extrel.data", cwd=c.src)
    H.qemu_io("extrel.qcow2", "write -P 0x75 1M 1M", "write -z 1536k 4k", cwd=c.src)
    c.add("external data file, relative name", p, cwd=c.src, stream=False)


build("data-file", data_files)


# ---- preallocation --------------------------------------------------------------------------

for mode in ("off", "metadata", "falloc", "full"):
    def fn(c, mode=mode):
        p = c.img("prealloc-%s.qcow2" % mode)
        H.create(p, 4 * MiB, "preallocation=%s" % mode)
        H.qemu_io(p, "write -P 0x81 100k 200k", "write -z 2M 64k")
        c.add("preallocation=%s" % mode, p)
    build("prealloc-" + mode, fn)


# ---- odd virtual sizes ----------------------------------------------------------------------

def odd_sizes(c):
    for name, size in (("odd1000000", 1000000), ("odd12345", 12345)):
        p = c.img(name + ".qcow2")
        H.create(p, size, "cluster_size=64k")
        vsize = H.info(p)["virtual-size"]
        H.qemu_io(p, "write -P 0x91 0 %d" % min(vsize, 5000),
                  "write -P 0x92 %d %d" % (vsize - 1000, 1000))
        c.add("virtual size %d (%d)" % (size, vsize), p)
    p = c.img("odd-cs4k.qcow2")
    H.create(p, 1000000, "cluster_size=4k")
    H.qemu_io(p, "write -P 0x93 0 1000448")
    c.add("virtual size 1000000, 4k clusters, full", p, cs=4 * KiB)


build("odd-sizes", odd_sizes)


# ---- internal snapshots ---------------------------------------------------------------------

def snapshots(c):
    for name, opts in (("snap", "compat=1.1"), ("snapv2", "compat=0.10")):
        p = c.img(name + ".qcow2")
        H.create(p, 4 * MiB, opts)
        H.qemu_io(p, "write -P 0xa1 0 1M", "write -P 0xa2 2M 64k")
        H.qemu_img("snapshot", "-c", "s1", p)
        H.qemu_io(p, "write -P 0xa3 512k 1M", "write -z 2M 64k", "write -c -P 0xa4 3M 64k")
        H.qemu_img("snapshot", "-c", "s2", p)
        H.qemu_io(p, "write -P 0xa5 0 4k", "discard 3M 64k", "write -P 0xa6 1000000 12345")
        c.add("%s current" % name, p)
        c.add("%s snapshot s1" % name, p, snapshot="s1")
        c.add("%s snapshot s2" % name, p, snapshot="s2")


build("snapshots", snapshots)


# ---- dirty bit ------------------------------------------------------------------------------

def dirty(c):
    p = c.img("dirty.qcow2")
    H.create(p, 4 * MiB, "compat=1.1,lazy_refcounts=on")
    H.qemu_io(p, "write -P 0xd1 0 1M", "write -P 0xd2 3M 12345")
    feats = H.read_field(p, "incompatible_features")
    H.write_field(p, "incompatible_features", feats | 1)
    c.add("dirty bit set", p)


build("dirty", dirty)
