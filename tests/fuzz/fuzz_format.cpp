// libFuzzer target: every format/ parser (the bitmap directory's and the image probe too) over a whole image file,
// with serialize-and-reparse round trips where a serializer exists.
//
// The input is an image file (seeds: tests/fuzz/corpus/). Each structure is parsed where the
// header says it lies: header + extensions + backing name from cluster 0, L1 entries, the L2
// tables they name, refcount table and blocks, the snapshot table, the bitmap directory. Parsers
// may reject anything (std::system_error with EIO or ENOTSUP); what they accept must survive
// serialize -> parse unchanged, and serializing again must give the same bytes.
// An input without the qcow2 magic is one structure (snapshot table, extension area, bitmap
// directory) in a fixed header, see structure() (seeds: corpus/struct-*).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "fuzz_support.hpp"
#include "qcowfs/format/bitmaps.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/probe.hpp"
#include "qcowfs/format/snapshot.hpp"

using namespace qcowfs;
using namespace qcowfs::format;
using fuzz::expect_errno;

namespace {

/// Entries looked at per input across all tables, so that one input stays fast.
constexpr uint64_t kEntryBudget = 1 << 16;

using Bytes = std::span<const std::byte>;

/// [offset, offset + len) of the file, clipped to its end (empty when outside).
Bytes window(Bytes file, uint64_t offset, uint64_t len) {
    if (offset >= file.size()) return {};
    return file.subspan(offset, std::min<uint64_t>(len, file.size() - offset));
}

/// The first field in which two headers differ ("" if none; backing_file_offset is not compared:
/// a rewrite may move the name).
std::string header_diff(const Header& a, const Header& b) {
#define QCOWFS_FIELD(f) \
    if (a.f != b.f) return #f " " + std::to_string(static_cast<uint64_t>(a.f)) + " -> " + std::to_string(static_cast<uint64_t>(b.f));
    QCOWFS_FIELD(version) QCOWFS_FIELD(backing_file_size) QCOWFS_FIELD(cluster_bits) QCOWFS_FIELD(size)
    QCOWFS_FIELD(crypt_method) QCOWFS_FIELD(l1_size) QCOWFS_FIELD(l1_table_offset) QCOWFS_FIELD(refcount_table_offset)
    QCOWFS_FIELD(refcount_table_clusters) QCOWFS_FIELD(nb_snapshots) QCOWFS_FIELD(snapshots_offset)
    QCOWFS_FIELD(incompatible_features) QCOWFS_FIELD(compatible_features) QCOWFS_FIELD(autoclear_features)
    QCOWFS_FIELD(refcount_order) QCOWFS_FIELD(header_length) QCOWFS_FIELD(compression_type)
#undef QCOWFS_FIELD
    return "";
}

bool same_extensions(const Extensions& a, const Extensions& b) {
    if (a.backing_format != b.backing_format || a.data_file != b.data_file ||
        a.has_crypto_header != b.has_crypto_header || a.bitmaps.has_value() != b.bitmaps.has_value())
        return false;
    if (a.bitmaps && (a.bitmaps->nb_bitmaps != b.bitmaps->nb_bitmaps ||
                      a.bitmaps->bitmap_directory_size != b.bitmaps->bitmap_directory_size ||
                      a.bitmaps->bitmap_directory_offset != b.bitmaps->bitmap_directory_offset))
        return false;
    if (a.feature_names.size() != b.feature_names.size() || a.unknown.size() != b.unknown.size()) return false;
    for (size_t i = 0; i < a.feature_names.size(); ++i) {
        const auto &x = a.feature_names[i], &y = b.feature_names[i];
        if (x.type != y.type || x.bit != y.bit || x.name != y.name) return false;
    }
    for (size_t i = 0; i < a.unknown.size(); ++i)
        if (a.unknown[i].type != b.unknown[i].type || a.unknown[i].data != b.unknown[i].data) return false;
    return true;
}

/// Header, extensions and backing name: parse -> serialize -> parse gives the same metadata, and
/// a second serialize the same bytes. A serializer may only refuse what does not fit in cluster 0.
void header_round_trip(const ImageMetadata& m, uint64_t file_size) {
    std::vector<std::byte> c0;
    try {
        c0 = serialize_metadata(m);
    } catch (const std::system_error& e) {
        expect_errno(e, {EINVAL}, "serialize_metadata");
        FUZZ_EXPECT(std::string(e.what()).find("fit") != std::string::npos,
               std::string("serialize_metadata refused parsed metadata: ") + e.what());
        return;
    }
    FUZZ_EXPECT(c0.size() == m.header.cluster_size(), "serialized cluster 0 is not one cluster");
    ImageMetadata again;
    try {
        again = parse_metadata(c0, file_size);
    } catch (const std::system_error& e) {
        fuzz::violated(std::string("serialized metadata does not parse: ") + e.what());
    }
    std::string diff = header_diff(m.header, again.header);
    FUZZ_EXPECT(diff.empty(), "header field changed in a round trip: " + diff);
    FUZZ_EXPECT(same_extensions(m.extensions, again.extensions), "header extensions changed in a round trip");
    FUZZ_EXPECT(m.backing_file == again.backing_file, "backing file name changed in a round trip");
    FUZZ_EXPECT(serialize_metadata(again) == c0, "serializing the reparsed metadata gives other bytes");
}

/// L1 entry: what decodes encodes back to the same 64 bits.
void l1_round_trip(uint64_t raw, uint32_t cluster_bits) {
    L1Entry e;
    try {
        e = decode_l1(raw, cluster_bits);
    } catch (const std::system_error& ex) {
        expect_errno(ex, {EIO}, "decode_l1");
        return;
    }
    FUZZ_EXPECT(encode_l1(e) == raw, "L1 entry " + hex(raw) + " does not encode back");
}

/// L2 entry: decodes, every subcluster has a type, and the entry encodes back to the same bits.
void l2_round_trip(uint64_t raw, uint64_t bitmap, const Header& h) {
    const ClusterGeometry g = h.geometry();
    L2Entry e;
    try {
        e = decode_l2(raw, bitmap, g, h.version, h.has_external_data_file());
    } catch (const std::system_error& ex) {
        expect_errno(ex, {EIO}, "decode_l2");
        return;
    }
    for (uint32_t sc = 0; sc < g.subclusters_per_cluster(); ++sc) {
        try {
            (void)subcluster_type(e, sc, g);
        } catch (const std::system_error& ex) {
            fuzz::violated("subcluster_type of a decoded L2 entry " + hex(raw) + "/" + hex(bitmap) + ": " + ex.what());
        }
    }
    uint64_t back = 0;
    try {
        back = e.compressed ? encode_l2_compressed(e.host_offset, e.compressed_size, h.cluster_bits)
                            : encode_l2_standard(e.host_offset, e.copied, e.zero_flag);
    } catch (const std::system_error& ex) {
        fuzz::violated("decoded L2 entry " + hex(raw) + " does not encode: " + ex.what());
    }
    FUZZ_EXPECT(back == raw, "L2 entry " + hex(raw) + " encodes back as " + hex(back));
}

/// Refcount block: every entry reads, writing the value read changes no byte, and writing another
/// value changes that entry only.
void refcount_round_trip(Bytes block_in, uint32_t order, uint64_t& budget) {
    std::vector<std::byte> block(block_in.begin(), block_in.end());
    const uint64_t entries = (uint64_t{block.size()} * 8) >> order;
    const uint64_t max = max_refcount(order);
    for (uint64_t i = 0; i < entries && budget > 0; ++i, --budget) {
        uint64_t v = get_refcount(block, order, i);
        FUZZ_EXPECT(v <= max, "refcount above the width's maximum");
        set_refcount(block, order, i, v);
        FUZZ_EXPECT(get_refcount(block, order, i) == v, "rewriting a refcount changed it");
        uint64_t other = max - v;
        set_refcount(block, order, i, other);
        FUZZ_EXPECT(get_refcount(block, order, i) == other, "a refcount written does not read back");
        if (i > 0) FUZZ_EXPECT(get_refcount(block, order, i - 1) == get_refcount(block_in, order, i - 1), "neighbour changed");
        if (i + 1 < entries)
            FUZZ_EXPECT(get_refcount(block, order, i + 1) == get_refcount(block_in, order, i + 1), "neighbour changed");
        set_refcount(block, order, i, v);
    }
    FUZZ_EXPECT(std::equal(block.begin(), block.end(), block_in.begin()), "writing refcounts back changed the block");
    bool out_of_range = false;
    try {
        (void)get_refcount(block, order, entries);
    } catch (const std::system_error&) {
        out_of_range = true;
    }
    FUZZ_EXPECT(out_of_range, "get_refcount accepted an index past the block");
}

bool same_snapshot(const Snapshot& a, const Snapshot& b) {
    return a.l1_table_offset == b.l1_table_offset && a.l1_size == b.l1_size && a.id == b.id && a.name == b.name &&
           a.date_sec == b.date_sec && a.date_nsec == b.date_nsec && a.vm_clock_nsec == b.vm_clock_nsec &&
           a.vm_state_size == b.vm_state_size && a.disk_size == b.disk_size;
}

/// Snapshot table: parse -> serialize -> parse gives the same snapshots; serializing again the same
/// bytes; the size walk agrees with the serialized length.
void snapshot_round_trip(Bytes table, const Header& h, uint64_t file_size) {
    if (h.nb_snapshots == 0) return;
    std::vector<Snapshot> snaps;
    try {
        snaps = parse_snapshot_table(table, h, file_size);
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO}, "parse_snapshot_table");
        return;
    }
    FUZZ_EXPECT(snaps.size() == h.nb_snapshots, "parse_snapshot_table returned the wrong number of entries");
    uint64_t walked = snapshot_table_bytes_needed(table, h);
    FUZZ_EXPECT(walked <= table.size(), "snapshot table size beyond the bytes given");
    std::vector<std::byte> bytes = serialize_snapshot_table(snaps, h.version);
    std::vector<Snapshot> again;
    try {
        again = parse_snapshot_table(bytes, h, file_size);
    } catch (const std::system_error& e) {
        fuzz::violated(std::string("serialized snapshot table does not parse: ") + e.what());
    }
    FUZZ_EXPECT(again.size() == snaps.size(), "snapshot count changed in a round trip");
    for (size_t i = 0; i < snaps.size(); ++i)
        FUZZ_EXPECT(same_snapshot(snaps[i], again[i]), "snapshot " + std::to_string(i) + " changed in a round trip");
    FUZZ_EXPECT(serialize_snapshot_table(again, h.version) == bytes, "serializing the reparsed table gives other bytes");
    FUZZ_EXPECT(snapshot_table_bytes_needed(bytes, h) == bytes.size(), "size walk disagrees with the serialized table");
}

/// Bitmap directory: what parses is laid out as parsed — entries back to back (8-aligned), each
/// field where the parser read it, the name bytes in place, and exactly nb_bitmaps of them.
void bitmap_directory_check(Bytes dir, const ImageMetadata& m, uint64_t file_size) {
    if (!m.extensions.bitmaps) return;
    const auto& ext = *m.extensions.bitmaps;
    std::vector<BitmapDirectoryEntry> entries;
    try {
        entries = parse_bitmap_directory(dir, m, file_size);
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO}, "parse_bitmap_directory");
        return;
    }
    if (!(m.header.autoclear_features & kAutoclearBitmaps)) {
        FUZZ_EXPECT(entries.empty(), "bitmap directory parsed though the autoclear bit is clear");
        return;
    }
    FUZZ_EXPECT(entries.size() == ext.nb_bitmaps, "bitmap directory entry count differs from the extension");
    size_t at = 0;
    for (const auto& e : entries) {
        FUZZ_EXPECT(e.position == at, "bitmap directory entries are not back to back");
        // The entry as serialize_bitmap_directory writes it: header fields, extra data, name.
        const std::vector<std::byte> again = serialize_bitmap_directory({e});
        const size_t used = 24 + e.extra_data_size + e.name.size();
        FUZZ_EXPECT(at + used <= dir.size() && std::memcmp(again.data(), dir.data() + at, used) == 0,
               "bitmap directory entry does not re-encode to the bytes parsed");
        FUZZ_EXPECT(e.table_offset % m.header.cluster_size() == 0 && e.table_offset + uint64_t{e.table_size} * 8 <= file_size,
               "bitmap table accepted outside the file or unaligned");
        at = (at + used + 7) & ~size_t{7};
    }
    FUZZ_EXPECT(at == dir.size(), "bitmap directory has bytes after its last entry");
}

/// L1 table, the L2 tables it names, and the refcount table and blocks.
void tables(Bytes file, const Header& h) {
    uint64_t budget = kEntryBudget;
    const ClusterGeometry g = h.geometry();
    Bytes l1 = window(file, h.l1_table_offset, uint64_t{h.l1_size} * 8);
    for (size_t i = 0; i + 8 <= l1.size() && budget > 0; i += 8, --budget) {
        uint64_t raw = load_be64(l1.data() + i);
        l1_round_trip(raw, h.cluster_bits);
        Bytes l2 = window(file, raw & kL1OffsetMask, g.cluster_size());
        if ((raw & kL1OffsetMask) == 0) continue;
        for (size_t j = 0; j + g.l2_entry_size() <= l2.size() && budget > 0; j += g.l2_entry_size(), --budget)
            l2_round_trip(load_be64(l2.data() + j), g.extended_l2 ? load_be64(l2.data() + j + 8) : 0, h);
    }
    FUZZ_EXPECT(refcount_block_entries(h.cluster_bits, h.refcount_order) == (g.cluster_size() * 8) >> h.refcount_order,
           "refcount_block_entries disagrees with the block size");
    Bytes rt = window(file, h.refcount_table_offset, uint64_t{h.refcount_table_clusters} << h.cluster_bits);
    for (size_t i = 0; i + 8 <= rt.size() && budget > 0; i += 8) {
        uint64_t block = load_be64(rt.data() + i) & kRefcountTableOffsetMask;
        if (block == 0) continue;
        refcount_round_trip(window(file, block, g.cluster_size()), h.refcount_order, budget);
    }
}

/// The image probe over the whole file: it asks only for bytes inside the file, in few reads,
/// and what it accepts has the header parse_header finds.
void probe_check(Bytes file, const Header& h) {
    ImageProbe probe(file.size());
    int reads = 0;
    try {
        while (auto r = probe.next()) {
            FUZZ_EXPECT(r->offset <= file.size() && r->length <= file.size() - r->offset,
                        "the probe asks for bytes past the end of the file");
            FUZZ_EXPECT(++reads <= 64, "the probe asks for more than 64 reads");
            probe.feed(window(file, r->offset, r->length));
        }
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, ENOTSUP}, "ImageProbe");
        return;
    }
    ProbedImage found = probe.take();
    FUZZ_EXPECT(header_diff(h, found.meta.header).empty(), "the probe and parse_header disagree: " + header_diff(h, found.meta.header));
    FUZZ_EXPECT(found.problem != ProbeProblem::none || found.snapshots.size() == h.nb_snapshots,
                "the probe found the wrong number of snapshots");
}

/// A whole image file: each structure where the header says it lies.
void image(Bytes file) {
    Header h;
    try {
        h = parse_header(file, file.size());
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, ENOTSUP}, "parse_header");
        return;
    }
    probe_check(file, h);
    tables(file, h);
    snapshot_round_trip(window(file, h.snapshots_offset, kMaxSnapshotTableBytes), h, file.size());

    ImageMetadata m;
    try {
        m = parse_metadata(file.first(std::min<uint64_t>(file.size(), h.cluster_size())), file.size());
    } catch (const std::system_error& e) {
        expect_errno(e, {EIO, ENOTSUP}, "parse_metadata");
        return;
    }
    FUZZ_EXPECT(header_diff(h, m.header).empty() && h.backing_file_offset == m.header.backing_file_offset,
                "parse_metadata and parse_header disagree: " + header_diff(h, m.header));
    header_round_trip(m, file.size());
    if (m.extensions.bitmaps) {
        const auto& ext = *m.extensions.bitmaps;
        bitmap_directory_check(window(file, ext.bitmap_directory_offset, std::min<uint64_t>(ext.bitmap_directory_size, 1 << 26)),
                               m, file.size());
    }
}

/// A header that passes parse_header for a file of `file_size` bytes, for the structure modes.
Header template_header(uint32_t version, uint32_t cluster_bits, uint64_t file_size) {
    Header h;
    h.version = version;
    h.cluster_bits = cluster_bits;
    h.size = uint64_t{1} << 30;
    h.l1_size = static_cast<uint32_t>(h.geometry().l1_entries_for(h.size));
    h.l1_table_offset = uint64_t{1} << cluster_bits;
    h.refcount_table_offset = uint64_t{2} << cluster_bits;
    h.refcount_table_clusters = 1;
    h.header_length = version == 2 ? kV2HeaderLength : kV3MinHeaderLength;
    h.refcount_order = 4;
    (void)file_size;
    return h;
}

/// Structure modes: the input is one structure with a fixed header around it, so that mutations
/// reach deep into one parser instead of landing in an image's data clusters.
///   'S' version cluster_bits nb_snapshots(2) table...       snapshot table
///   'E' version cluster_bits backing_offset(2) backing_size(2) bytes...  cluster 0 after the header
///   'B' cluster_bits nb_bitmaps(2) disk_size_shift directory...   bitmap directory
void structure(Bytes in) {
    constexpr uint64_t kFileSize = uint64_t{1} << 40;
    auto byte = [&](size_t i) { return i < in.size() ? std::to_integer<uint32_t>(in[i]) : 0u; };
    auto cluster_bits = [&](size_t i) { return kMinClusterBits + byte(i) % (kMaxClusterBits - kMinClusterBits + 1); };
    auto version = [&](size_t i) { return byte(i) & 1 ? 3u : 2u; };
    switch (byte(0)) {
        case 'S': {
            Header h = template_header(version(1), cluster_bits(2), kFileSize);
            h.nb_snapshots = byte(3) << 8 | byte(4);
            h.snapshots_offset = uint64_t{3} << h.cluster_bits;
            snapshot_round_trip(in.size() > 5 ? in.subspan(5) : Bytes{}, h, kFileSize);
            break;
        }
        case 'E': {
            Header h = template_header(version(1), cluster_bits(2), kFileSize);
            if (h.version == 3) h.header_length = 112;
            Bytes area = in.size() > 7 ? in.subspan(7) : Bytes{};
            std::vector<std::byte> c0(h.header_length + area.size());
            std::copy(area.begin(), area.end(), c0.begin() + h.header_length);
            ImageMetadata shell;
            shell.header = h;
            std::vector<std::byte> fixed = serialize_metadata(shell);
            std::copy(fixed.begin(), fixed.begin() + h.header_length, c0.begin());
            uint32_t backing_offset = byte(3) << 8 | byte(4);
            store_be64(c0.data() + 8, backing_offset ? h.header_length + backing_offset : 0);
            store_be32(c0.data() + 16, byte(5) << 8 | byte(6));
            if (c0.size() > h.cluster_size()) c0.resize(h.cluster_size());
            ImageMetadata m;
            try {
                m = parse_metadata(c0, kFileSize);
            } catch (const std::system_error& e) {
                expect_errno(e, {EIO, ENOTSUP}, "parse_metadata");
                return;
            }
            header_round_trip(m, kFileSize);
            break;
        }
        case 'B': {
            ImageMetadata m;
            m.header = template_header(3, cluster_bits(1), kFileSize);
            m.header.autoclear_features = kAutoclearBitmaps;
            m.header.size = uint64_t{1} << (20 + byte(4) % 24);
            Bytes dir = in.size() > 5 ? in.subspan(5) : Bytes{};
            m.extensions.bitmaps = BitmapsExtension{byte(2) << 8 | byte(3), dir.size(), uint64_t{4} << m.header.cluster_bits};
            bitmap_directory_check(dir, m, kFileSize);
            break;
        }
        default:
            break;
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Bytes in(reinterpret_cast<const std::byte*>(data), size);
    if (has_qcow2_magic(in))
        image(in);
    else
        structure(in);
    return 0;
}
