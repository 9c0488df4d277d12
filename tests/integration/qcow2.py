"""Reading and patching a qcow2 host file byte by byte: header fields, feature bits, L1/L2 and
refcount entries, header extensions, persistent bitmaps and the snapshot table (for tests that
corrupt images or look at what qcowfs left on disk)."""

import struct

QCOW2_MAGIC = b"QFI\xfb"
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
COMPAT_LAZY = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
L2_OFFSET_MASK = 0x00fffffffffffe00
COPIED = 1 << 63

HDR_FIELDS = {
    # name: (offset, struct format)
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
}


def read_field(path, name):
    off, f = HDR_FIELDS[name]
    with open(path, "rb") as fh:
        fh.seek(off)
        return struct.unpack(f, fh.read(struct.calcsize(f)))[0]


def write_field(path, name, value):
    off, f = HDR_FIELDS[name]
    patch(path, off, struct.pack(f, value))


def patch(path, offset, data):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def read_bytes(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def read_u64(path, offset):
    return struct.unpack(">Q", read_bytes(path, offset, 8))[0]


def cluster_size(path):
    return 1 << read_field(path, "cluster_bits")


def features(path):
    return dict(inc=read_field(path, "incompatible_features"),
                compat=read_field(path, "compatible_features"),
                autoclear=read_field(path, "autoclear_features"))


def is_dirty(path):
    return bool(read_field(path, "incompatible_features") & INCOMPAT_DIRTY)


def is_corrupt(path):
    return bool(read_field(path, "incompatible_features") & INCOMPAT_CORRUPT)


def header_bits(img):
    """(dirty, corrupt) from a v3 header's incompatible features; (False, False) for v2, which
    has no such field."""
    if read_field(img, "version") < 3:
        return False, False
    return is_dirty(img), is_corrupt(img)


def l1_entry_offset(path, index):
    return read_field(path, "l1_table_offset") + 8 * index


def l2_table_offset(path, guest_off):
    """Host offset of the L2 table that maps guest_off (0: none)."""
    cs = cluster_size(path)
    l1i = guest_off // (cs * (cs // 8))
    return read_u64(path, l1_entry_offset(path, l1i)) & L2_OFFSET_MASK


def l2_entry_offset(path, guest_offset):
    """Host file offset of the L2 entry for guest_offset (standard L2, no extended L2)."""
    cs = cluster_size(path)
    l2_off = l2_table_offset(path, guest_offset)
    if l2_off == 0:
        raise ValueError("no L2 table for guest offset %d" % guest_offset)
    return l2_off + 8 * ((guest_offset // cs) % (cs // 8))


def refcount_entry(path, host_off):
    """(file offset of the refcount entry for the host cluster at host_off, width in bits)."""
    cs = cluster_size(path)
    bits = 1 << read_field(path, "refcount_order")
    per_block = cs * 8 // bits
    idx = host_off // cs
    rt = read_field(path, "refcount_table_offset")
    rb = read_u64(path, rt + 8 * (idx // per_block)) & ~(cs - 1)
    if rb == 0:
        raise ValueError("no refcount block for host offset 0x%x" % host_off)
    if bits < 8:
        raise ValueError("refcount width %d not handled" % bits)
    return rb + (idx % per_block) * bits // 8, bits


_REFCOUNT_FORMATS = {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}


def set_refcount(path, host_off, value):
    off, bits = refcount_entry(path, host_off)
    patch(path, off, struct.pack(_REFCOUNT_FORMATS[bits], value))


def get_refcount(path, host_off):
    off, bits = refcount_entry(path, host_off)
    return struct.unpack(_REFCOUNT_FORMATS[bits], read_bytes(path, off, bits // 8))[0]


def header_extensions(path):
    """[(file_offset_of_ext_header, type, length)] of a v3 (or v2) image."""
    version = read_field(path, "version")
    start = read_field(path, "header_length") if version >= 3 else 72
    cs = cluster_size(path)
    res = []
    with open(path, "rb") as fh:
        off = start
        while off + 8 <= cs:
            fh.seek(off)
            t, ln = struct.unpack(">II", fh.read(8))
            res.append((off, t, ln))
            if t == 0:
                break
            off += 8 + ((ln + 7) & ~7)
    return res


def bitmaps(path):
    """Persistent bitmaps of a qcow2 file: [dict(name, flags, in_use, auto, gran_bits,
    table_offset, table_size)], [] if there is no bitmaps extension."""
    res = []
    for off, t, ln in header_extensions(path):
        if t != 0x23852875:
            continue
        d = read_bytes(path, off + 8, ln)
        nb, _res, dsz, doff = struct.unpack(">IIQQ", d[:24])
        dirb = read_bytes(path, doff, dsz)
        p = 0
        for _ in range(nb):
            bto, bts, flags, typ, gbits, nsz, xsz = struct.unpack(">QIIBBHI", dirb[p:p + 24])
            name = dirb[p + 24 + xsz:p + 24 + xsz + nsz].decode("utf-8", "replace")
            res.append(dict(name=name, flags=flags, in_use=bool(flags & 1), auto=bool(flags & 2),
                            gran_bits=gbits, table_offset=bto, table_size=bts))
            p += (24 + xsz + nsz + 7) & ~7
    return res


def bitmap_bit(path, bm, guest_off):
    """Value (0/1) of the persistent bitmap's bit for guest_off, read from the file."""
    cs = cluster_size(path)
    bit = guest_off >> bm["gran_bits"]
    bits_per_cluster = cs * 8
    ti = bit // bits_per_cluster
    if ti >= bm["table_size"]:
        raise ValueError("bit %d beyond the bitmap table" % bit)
    e = read_u64(path, bm["table_offset"] + 8 * ti)
    data_off = e & L2_OFFSET_MASK
    if data_off == 0:
        return e & 1
    b = bit % bits_per_cluster
    byte = read_bytes(path, data_off + b // 8, 1)[0]
    return (byte >> (b % 8)) & 1


def snapshot_table(img):
    """The internal snapshot table: [{id, name, l1_offset, l1_size, disk_size}] (disk_size None
    when the entry has no such extra data, as in old v2 images)."""
    n = read_field(img, "nb_snapshots")
    off = read_field(img, "snapshots_offset")
    res = []
    with open(img, "rb") as f:
        for _ in range(n):
            f.seek(off)
            h = f.read(40)
            (l1_off, l1_size, id_len, name_len, _ds, _dn, _vmc, _vms,
             extra_len) = struct.unpack(">QIHHIIQII", h)
            extra = f.read(extra_len)
            disk_size = struct.unpack(">Q", extra[8:16])[0] if extra_len >= 16 else None
            sid = f.read(id_len).decode("utf-8", "replace")
            name = f.read(name_len).decode("utf-8", "replace")
            res.append({"id": sid, "name": name, "l1_offset": l1_off, "l1_size": l1_size,
                        "disk_size": disk_size})
            off += (40 + extra_len + id_len + name_len + 7) // 8 * 8
    return res
