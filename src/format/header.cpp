// Parses, validates and serializes the qcow2 header, its extensions and the backing file name.
#include "qcowfs/format/header.hpp"

#include <algorithm>
#include <cstring>

#include "detail.hpp"
#include "qcowfs/format/error.hpp"

namespace qcowfs::format {

uint16_t load_be16(const std::byte* p) {
    return static_cast<uint16_t>(std::to_integer<uint16_t>(p[0]) << 8 | std::to_integer<uint16_t>(p[1]));
}
uint32_t load_be32(const std::byte* p) { return uint32_t{load_be16(p)} << 16 | load_be16(p + 2); }
uint64_t load_be64(const std::byte* p) { return uint64_t{load_be32(p)} << 32 | load_be32(p + 4); }

void store_be16(std::byte* p, uint16_t v) {
    p[0] = static_cast<std::byte>(v >> 8);
    p[1] = static_cast<std::byte>(v);
}
void store_be32(std::byte* p, uint32_t v) {
    store_be16(p, static_cast<uint16_t>(v >> 16));
    store_be16(p + 2, static_cast<uint16_t>(v));
}
void store_be64(std::byte* p, uint64_t v) {
    store_be32(p, static_cast<uint32_t>(v >> 32));
    store_be32(p + 4, static_cast<uint32_t>(v));
}

bool has_qcow2_magic(std::span<const std::byte> bytes) {
    return bytes.size() >= 4 && load_be32(bytes.data()) == kMagic;
}

namespace {

using detail::aligned;
using detail::hex;
using detail::inside;
using detail::round_up8;

constexpr size_t kCompressionTypeOffset = 104;
constexpr uint32_t kMaxStringExtension = 4095;  // PATH_MAX - 1: backing format and data file names
constexpr size_t kFeatureNameEntry = 48;
constexpr size_t kFeatureNameLength = 46;
constexpr size_t kBitmapsExtensionSize = 24;
constexpr size_t kCryptoExtensionSize = 16;
constexpr uint32_t kMaxBitmaps = 65535;
constexpr uint64_t kMaxBitmapDirectoryBytes = 1024 * uint64_t{kMaxBitmaps};
constexpr uint32_t kCryptLuks = 2;
constexpr uint32_t kMinExtendedL2ClusterBits = 14;
constexpr uint64_t kSnapshotEntryMinSize = 40;

std::string bit_list(uint64_t bits) {
    std::string s;
    for (uint32_t i = 0; i < 64; ++i)
        if (bits >> i & 1) s += (s.empty() ? "" : ",") + std::to_string(i);
    return s;
}

void check_magic_and_version(std::span<const std::byte> b) {
    if (b.size() < kV2HeaderLength)
        corrupt("qcow2 header truncated: " + std::to_string(b.size()) + " bytes, need at least 72");
    if (!has_qcow2_magic(b)) corrupt("bad qcow2 magic " + hex(load_be32(b.data())));
    uint32_t version = load_be32(b.data() + 4);
    if (version == 1) fail(ENOTSUP, "qcow version 1 images are not supported (only qcow2 versions 2 and 3)");
    if (version != 2 && version != 3)
        corrupt("invalid qcow2 version " + std::to_string(version) + " (valid: 2, 3)");
    if (version == 3 && b.size() < kV3MinHeaderLength)
        corrupt("qcow2 v3 header truncated: " + std::to_string(b.size()) + " bytes, need at least 104");
}

/// Calls f(offset, field) for each fixed header field up to the header length, at its byte offset:
/// the one layout that parsing and serializing share. v3 adds the fields from offset 72.
template <class H, class F>
void for_each_field(H& h, F&& f) {
    f(4, h.version), f(8, h.backing_file_offset), f(16, h.backing_file_size), f(20, h.cluster_bits);
    f(24, h.size), f(32, h.crypt_method), f(36, h.l1_size), f(40, h.l1_table_offset);
    f(48, h.refcount_table_offset), f(56, h.refcount_table_clusters), f(60, h.nb_snapshots);
    f(64, h.snapshots_offset);
    if (h.version == 2) return;
    f(72, h.incompatible_features), f(80, h.compatible_features), f(88, h.autoclear_features);
    f(96, h.refcount_order);
}

Header read_fields(const std::byte* p) {
    Header h;
    h.version = load_be32(p + 4);  // decides which fields follow
    for_each_field(h, [p](size_t at, auto& field) {
        if constexpr (sizeof field == 8)
            field = load_be64(p + at);
        else
            field = load_be32(p + at);
    });
    // Without a backing file the name length means nothing (QEMU ignores it): keep it 0 so that a
    // header rewrite round-trips.
    if (h.backing_file_offset == 0) h.backing_file_size = 0;
    if (h.version == 2) {
        h.refcount_order = 4;
        h.header_length = kV2HeaderLength;
        return h;
    }
    h.header_length = load_be32(p + 100);
    return h;
}

void check_unknown_features(const Header& h) {
    uint64_t unknown = h.incompatible_features & ~kIncompatKnown;
    if (unknown)
        fail(ENOTSUP, "unsupported incompatible qcow2 features " + hex(unknown) + " (bits " + bit_list(unknown) + ")");
}

void check_cluster_bits(const Header& h) {
    if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits)
        corrupt("invalid cluster_bits " + std::to_string(h.cluster_bits) + " (valid: 9..21)");
    if (h.extended_l2() && h.cluster_bits < kMinExtendedL2ClusterBits)
        corrupt("extended L2 entries need cluster_bits >= 14, image has " + std::to_string(h.cluster_bits));
}

void check_header_length(const Header& h) {
    if (h.version == 2) return;
    if (h.header_length < kV3MinHeaderLength || h.header_length % 8 != 0)
        corrupt("invalid header_length " + std::to_string(h.header_length) + " (must be >= 104 and a multiple of 8)");
    if (h.header_length > h.cluster_size())
        corrupt("header_length " + std::to_string(h.header_length) + " exceeds the cluster size " +
                std::to_string(h.cluster_size()));
}

void read_compression_type(Header& h, std::span<const std::byte> b) {
    uint8_t raw = 0;
    if (h.header_length > kCompressionTypeOffset) {
        if (b.size() <= kCompressionTypeOffset)
            corrupt("qcow2 header truncated: " + std::to_string(b.size()) + " bytes, header_length is " +
                    std::to_string(h.header_length));
        raw = std::to_integer<uint8_t>(b[kCompressionTypeOffset]);
    }
    bool bit = h.incompatible_features & kIncompatCompressionType;
    if (bit && raw == 0) corrupt("compression type bit set but compression_type field is zlib (0) or absent");
    if (!bit && raw != 0)
        corrupt("compression_type " + std::to_string(raw) + " without the compression type feature bit");
    if (raw > static_cast<uint8_t>(CompressionType::zstd))
        fail(ENOTSUP, "unsupported compression type " + std::to_string(raw));
    h.compression_type = static_cast<CompressionType>(raw);
}

void check_simple_fields(const Header& h) {
    if (h.refcount_order > 6) corrupt("invalid refcount_order " + std::to_string(h.refcount_order) + " (valid: 0..6)");
    if (h.crypt_method > kCryptLuks) corrupt("invalid crypt_method " + std::to_string(h.crypt_method));
    if (h.data_file_raw() && !h.has_external_data_file())
        corrupt("raw external data bit set without the external data file bit");
    if (h.has_external_data_file() && h.nb_snapshots != 0)
        corrupt("internal snapshots (" + std::to_string(h.nb_snapshots) + ") in an image with an external data file");
}

void check_l1_table(const Header& h, uint64_t file_size) {
    if (!aligned(h.l1_table_offset, h.cluster_bits))
        corrupt("L1 table offset " + hex(h.l1_table_offset) + " is not cluster aligned");
    uint64_t bytes = uint64_t{h.l1_size} * 8;
    if (bytes > kMaxL1Bytes)
        corrupt("L1 table of " + std::to_string(h.l1_size) + " entries exceeds the 32 MiB limit");
    uint64_t needed = h.geometry().l1_entries_for(h.size);
    if (h.l1_size < needed)
        corrupt("L1 table of " + std::to_string(h.l1_size) + " entries is too small for a virtual size of " +
                std::to_string(h.size) + " bytes (needs " + std::to_string(needed) + ")");
    if (h.l1_size == 0) return;
    if (h.l1_table_offset == 0) corrupt("L1 table at offset 0 overlaps the header");
    if (!inside(h.l1_table_offset, bytes, file_size))
        corrupt("L1 table at " + hex(h.l1_table_offset) + " (" + std::to_string(bytes) +
                " bytes) lies beyond the end of the file (" + std::to_string(file_size) + " bytes)");
}

void check_snapshot_table(const Header& h, uint64_t file_size) {
    if (h.nb_snapshots > kMaxSnapshots)
        corrupt("too many snapshots: " + std::to_string(h.nb_snapshots) + " (limit 65536)");
    if (!aligned(h.snapshots_offset, h.cluster_bits))
        corrupt("snapshot table offset " + hex(h.snapshots_offset) + " is not cluster aligned");
    if (h.nb_snapshots == 0) return;
    if (h.snapshots_offset == 0) corrupt("snapshot table at offset 0 overlaps the header");
    if (!inside(h.snapshots_offset, h.nb_snapshots * kSnapshotEntryMinSize, file_size))
        corrupt("snapshot table at " + hex(h.snapshots_offset) + " with " + std::to_string(h.nb_snapshots) +
                " entries lies beyond the end of the file (" + std::to_string(file_size) + " bytes)");
}

}  // namespace

void check_refcount_table(uint64_t offset, uint32_t clusters, uint32_t cluster_bits, uint64_t file_size) {
    if (clusters == 0) corrupt("image has no refcount table (refcount_table_clusters is 0)");
    uint64_t bytes = uint64_t{clusters} << cluster_bits;
    if (bytes > kMaxRefcountTableBytes)
        corrupt("refcount table of " + std::to_string(clusters) + " clusters exceeds the 8 MiB limit");
    if (offset == 0 || !aligned(offset, cluster_bits)) corrupt("invalid refcount table offset " + hex(offset));
    if (!inside(offset, bytes, file_size))
        corrupt("refcount table at " + hex(offset) + " (" + std::to_string(bytes) +
                " bytes) lies beyond the end of the file (" + std::to_string(file_size) + " bytes)");
}

Header parse_header(std::span<const std::byte> bytes, uint64_t file_size) {
    check_magic_and_version(bytes);
    Header h = read_fields(bytes.data());
    check_unknown_features(h);
    check_cluster_bits(h);
    check_header_length(h);
    read_compression_type(h, bytes);
    check_simple_fields(h);
    check_l1_table(h, file_size);
    check_refcount_table(h.refcount_table_offset, h.refcount_table_clusters, h.cluster_bits, file_size);
    check_snapshot_table(h, file_size);
    return h;
}

namespace {

/// Bytes [at, at + len) of cluster 0, or EIO if the caller passed fewer bytes.
std::span<const std::byte> slice(std::span<const std::byte> c0, uint64_t at, uint64_t len, const char* what) {
    if (!inside(at, len, c0.size()))
        corrupt(std::string("cluster 0 truncated: ") + what + " at " + hex(at) + " (" + std::to_string(len) +
                " bytes) is past the " + std::to_string(c0.size()) + " bytes available");
    return c0.subspan(at, len);
}

std::string to_name(std::span<const std::byte> data, const char* what) {
    std::string s(reinterpret_cast<const char*>(data.data()), data.size());
    if (s.find('\0') != std::string::npos) corrupt(std::string(what) + " contains a NUL byte");
    return s;
}

/// Where the extension area ends: at the backing file name, or at the end of cluster 0.
uint64_t check_backing_location(const Header& h) {
    if (h.backing_file_offset == 0) return h.cluster_size();
    if (h.backing_file_offset < h.header_length || h.backing_file_offset > h.cluster_size())
        corrupt("backing file name offset " + hex(h.backing_file_offset) + " is outside cluster 0 after the header");
    if (h.backing_file_size > kMaxBackingNameLength)
        corrupt("backing file name too long: " + std::to_string(h.backing_file_size) + " bytes (limit 1023)");
    if (!inside(h.backing_file_offset, h.backing_file_size, h.cluster_size()))
        corrupt("backing file name at " + hex(h.backing_file_offset) + " (" + std::to_string(h.backing_file_size) +
                " bytes) extends past cluster 0");
    return h.backing_file_offset;
}

std::string string_extension(std::span<const std::byte> data, const std::optional<std::string>& old, const char* what) {
    if (old) corrupt(std::string("duplicate ") + what + " header extension");
    if (data.size() > kMaxStringExtension)
        corrupt(std::string(what) + " header extension too long: " + std::to_string(data.size()) + " bytes");
    return to_name(data, what);
}

void parse_feature_names(Extensions& x, std::span<const std::byte> data) {
    if (!x.feature_names.empty()) corrupt("duplicate feature name table header extension");
    if (data.size() % kFeatureNameEntry != 0)
        corrupt("feature name table length " + std::to_string(data.size()) + " is not a multiple of 48");
    for (size_t at = 0; at < data.size(); at += kFeatureNameEntry) {
        const char* name = reinterpret_cast<const char*>(data.data() + at + 2);
        x.feature_names.push_back(FeatureName{std::to_integer<uint8_t>(data[at]),
                                              std::to_integer<uint8_t>(data[at + 1]),
                                              std::string(name, strnlen(name, kFeatureNameLength))});
    }
}

void parse_bitmaps(Extensions& x, const Header& h, std::span<const std::byte> data) {
    if (x.bitmaps) corrupt("duplicate bitmaps header extension");
    if (data.size() != kBitmapsExtensionSize)
        corrupt("bitmaps header extension has length " + std::to_string(data.size()) + ", expected 24");
    BitmapsExtension b{load_be32(data.data()), load_be64(data.data() + 8), load_be64(data.data() + 16)};
    x.bitmaps = b;
    if (!(h.autoclear_features & kAutoclearBitmaps)) return;  // inconsistent: ignored, kept for rewrites
    if (b.nb_bitmaps == 0 || b.nb_bitmaps > kMaxBitmaps)
        corrupt("bitmaps header extension has invalid nb_bitmaps " + std::to_string(b.nb_bitmaps));
    if (load_be32(data.data() + 4) != 0) corrupt("bitmaps header extension reserved field is not zero");
    if (!aligned(b.bitmap_directory_offset, h.cluster_bits))
        corrupt("bitmap directory offset " + hex(b.bitmap_directory_offset) + " is not cluster aligned");
    if (b.bitmap_directory_size > kMaxBitmapDirectoryBytes)
        corrupt("bitmap directory size " + std::to_string(b.bitmap_directory_size) + " is too large");
}

void parse_crypto(Extensions& x, const Header& h, std::span<const std::byte> data) {
    if (x.has_crypto_header) corrupt("duplicate full disk encryption header extension");
    if (h.crypt_method != kCryptLuks)
        corrupt("full disk encryption header extension with crypt_method " + std::to_string(h.crypt_method));
    if (data.size() != kCryptoExtensionSize)
        corrupt("full disk encryption header extension has length " + std::to_string(data.size()) + ", expected 16");
    x.has_crypto_header = true;
    // The payload is kept verbatim so that a header rewrite preserves it.
    x.unknown.push_back(UnknownExtension{kExtCrypto, {data.begin(), data.end()}});
}

void parse_extension(Extensions& x, const Header& h, uint32_t type, std::span<const std::byte> data) {
    switch (type) {
        case kExtBackingFormat: x.backing_format = string_extension(data, x.backing_format, "backing format"); break;
        case kExtDataFile: x.data_file = string_extension(data, x.data_file, "external data file name"); break;
        case kExtFeatureNames: parse_feature_names(x, data); break;
        case kExtBitmaps: parse_bitmaps(x, h, data); break;
        case kExtCrypto: parse_crypto(x, h, data); break;
        default: x.unknown.push_back(UnknownExtension{type, {data.begin(), data.end()}}); break;
    }
}

Extensions parse_extensions(std::span<const std::byte> c0, const Header& h, uint64_t end) {
    Extensions x;
    uint64_t at = h.header_length;
    while (at < end) {
        if (end - at < 8) corrupt("header extension at " + hex(at) + " is cut off by " + hex(end));
        std::span<const std::byte> head = slice(c0, at, 8, "header extension");
        uint32_t type = load_be32(head.data());
        uint32_t len = load_be32(head.data() + 4);
        if (type == kExtEnd) break;
        if (len > end - at - 8)
            corrupt("header extension " + hex(type) + " at " + hex(at) + " has length " + std::to_string(len) +
                    " reaching past " + hex(end));
        parse_extension(x, h, type, slice(c0, at + 8, len, "header extension data"));
        at += 8 + round_up8(len);
    }
    return x;
}

void check_consistency(const ImageMetadata& m) {
    const Header& h = m.header;
    if (h.crypt_method == kCryptLuks && !m.extensions.has_crypto_header)
        corrupt("LUKS encryption without a full disk encryption header extension");
    if (m.extensions.data_file && !h.has_external_data_file())
        corrupt("external data file name extension without the external data file bit");
    if (h.data_file_raw() && !m.backing_file.empty())
        corrupt("raw external data file together with a backing file");
}

}  // namespace

ImageMetadata parse_metadata(std::span<const std::byte> cluster0, uint64_t file_size) {
    ImageMetadata m;
    m.header = parse_header(cluster0, file_size);
    uint64_t ext_end = check_backing_location(m.header);
    m.extensions = parse_extensions(cluster0, m.header, ext_end);
    if (m.header.backing_file_offset != 0)
        m.backing_file = to_name(slice(cluster0, m.header.backing_file_offset, m.header.backing_file_size,
                                       "backing file name"),
                                 "backing file name");
    check_consistency(m);
    return m;
}

namespace {

/// Appends header extensions to a cluster-0 buffer, refusing to overflow it.
struct ExtensionWriter {
    std::vector<std::byte>& out;
    size_t at;

    void put(uint32_t type, std::span<const std::byte> data) {
        if (data.size() > UINT32_MAX || !inside(at, 8 + round_up8(data.size()), out.size()))
            fail(EINVAL, "header extensions do not fit in cluster 0 (" + std::to_string(out.size()) + " bytes)");
        store_be32(out.data() + at, type);
        store_be32(out.data() + at + 4, static_cast<uint32_t>(data.size()));
        std::copy(data.begin(), data.end(), out.begin() + static_cast<ptrdiff_t>(at + 8));
        at += 8 + round_up8(data.size());
    }
    void put_string(uint32_t type, const std::optional<std::string>& s) {
        if (s) put(type, std::as_bytes(std::span(s->data(), s->size())));
    }
};

void check_serializable(const Header& h) {
    if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits)
        fail(EINVAL, "cannot serialize cluster_bits " + std::to_string(h.cluster_bits));
    if (h.version == 3) {
        if (h.header_length < kV3MinHeaderLength || h.header_length % 8 != 0 || h.header_length > h.cluster_size())
            fail(EINVAL, "cannot serialize header_length " + std::to_string(h.header_length));
        return;
    }
    if (h.version != 2) fail(EINVAL, "cannot serialize qcow2 version " + std::to_string(h.version));
    if (h.refcount_order != 4)
        fail(EINVAL, "version 2 images need refcount_order 4, not " + std::to_string(h.refcount_order));
    if (h.incompatible_features || h.compatible_features || h.autoclear_features ||
        h.compression_type != CompressionType::zlib)
        fail(EINVAL, "version 2 images cannot carry feature bits or a compression type");
}

/// header_length as written: room for the compression type field when it is not zlib.
uint32_t written_header_length(const Header& h) {
    if (h.version == 2) return kV2HeaderLength;
    if (h.compression_type != CompressionType::zlib) return std::max<uint32_t>(h.header_length, 112);
    return h.header_length;
}

void write_fixed(std::byte* p, const Header& h, uint32_t header_length) {
    store_be32(p, kMagic);
    for_each_field(h, [p](size_t at, auto field) {
        if constexpr (sizeof field == 8)
            store_be64(p + at, field);
        else
            store_be32(p + at, field);
    });
    if (h.version == 2) return;
    store_be32(p + 100, header_length);
    if (header_length > kCompressionTypeOffset) p[kCompressionTypeOffset] = static_cast<std::byte>(h.compression_type);
}

void write_extensions(ExtensionWriter& w, const Extensions& x) {
    w.put_string(kExtBackingFormat, x.backing_format);
    w.put_string(kExtDataFile, x.data_file);
    if (!x.feature_names.empty()) {
        std::vector<std::byte> table(x.feature_names.size() * kFeatureNameEntry);
        for (size_t i = 0; i < x.feature_names.size(); ++i) {
            std::byte* e = table.data() + i * kFeatureNameEntry;
            const FeatureName& f = x.feature_names[i];
            e[0] = static_cast<std::byte>(f.type);
            e[1] = static_cast<std::byte>(f.bit);
            std::memcpy(e + 2, f.name.data(), std::min(f.name.size(), kFeatureNameLength));
        }
        w.put(kExtFeatureNames, table);
    }
    if (x.bitmaps) {
        std::byte b[kBitmapsExtensionSize] = {};
        store_be32(b, x.bitmaps->nb_bitmaps);
        store_be64(b + 8, x.bitmaps->bitmap_directory_size);
        store_be64(b + 16, x.bitmaps->bitmap_directory_offset);
        w.put(kExtBitmaps, b);
    }
    for (const UnknownExtension& u : x.unknown) {
        if (u.type == kExtEnd) fail(EINVAL, "an extension of type 0 would end the extension area early");
        w.put(u.type, u.data);
    }
    w.put(kExtEnd, {});
}

}  // namespace

std::vector<std::byte> serialize_metadata(const ImageMetadata& m) {
    Header h = m.header;
    check_serializable(h);
    if (m.backing_file.size() > kMaxBackingNameLength)
        fail(EINVAL, "backing file name too long: " + std::to_string(m.backing_file.size()) + " bytes (limit 1023)");
    std::vector<std::byte> out(h.cluster_size());
    uint32_t header_length = written_header_length(h);
    ExtensionWriter w{out, header_length};
    write_extensions(w, m.extensions);
    h.backing_file_offset = m.backing_file.empty() ? 0 : w.at;
    h.backing_file_size = static_cast<uint32_t>(m.backing_file.size());
    if (!inside(w.at, m.backing_file.size(), out.size()))
        fail(EINVAL, "backing file name does not fit in cluster 0");
    std::memcpy(out.data() + w.at, m.backing_file.data(), m.backing_file.size());
    write_fixed(out.data(), h, header_length);
    return out;
}

std::vector<std::byte> serialize_fixed_header(const Header& h) {
    check_serializable(h);
    std::vector<std::byte> out(kCompressionTypeOffset + 8);  // room for what write_fixed may touch
    write_fixed(out.data(), h, h.version == 2 ? kV2HeaderLength : h.header_length);
    out.resize(h.version == 2 ? kV2HeaderLength : kV3MinHeaderLength);  // the compression type byte never changes
    return out;
}

}  // namespace qcowfs::format
