// The qcow2 header and its extensions: parse and validate (pure, no I/O), and serialize for rewrites.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/format/types.hpp"

namespace qcowfs::format {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3MinHeaderLength = 104;
/// Enough bytes to parse the fixed header of any version (v3 with the compression type field).
inline constexpr size_t kHeaderProbeBytes = 4096;
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;
inline constexpr uint32_t kMaxBackingNameLength = 1023;
/// Largest L1 table accepted, in bytes (QEMU's limit as well).
inline constexpr uint64_t kMaxL1Bytes = 32u << 20;
/// Largest refcount table accepted, in bytes.
inline constexpr uint64_t kMaxRefcountTableBytes = 8u << 20;
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64u << 20;

// The feature bits of the three header words, each word's bits a type of its own (they convert
// to uint64_t for masks).
/// Incompatible features: an image with a bit outside kIncompatKnown is not opened.
enum IncompatibleFeature : uint64_t {
    kIncompatDirty = 1u << 0, kIncompatCorrupt = 1u << 1, kIncompatDataFile = 1u << 2,
    kIncompatCompressionType = 1u << 3, kIncompatExtendedL2 = 1u << 4,
    kIncompatKnown = 0x1f,
};
enum CompatibleFeature : uint64_t { kCompatLazyRefcounts = 1u << 0 };
enum AutoclearFeature : uint64_t { kAutoclearBitmaps = 1u << 0, kAutoclearDataFileRaw = 1u << 1 };

/// Header extension types (the word before each extension's length).
enum ExtensionType : uint32_t {
    kExtEnd = 0x00000000,
    kExtBackingFormat = 0xe2792aca,
    kExtFeatureNames = 0x6803f857,
    kExtBitmaps = 0x23852875,
    kExtCrypto = 0x0537be77,
    kExtDataFile = 0x44415441,
};

enum class CompressionType : uint8_t { zlib = 0, zstd = 1 };

/// The fixed part of the header, as on disk (v2 fields are filled with their v3 defaults).
struct Header {
    uint32_t version = 3;
    uint64_t backing_file_offset = 0;
    uint32_t backing_file_size = 0;
    uint32_t cluster_bits = 16;
    uint64_t size = 0;  // virtual disk size in bytes
    uint32_t crypt_method = 0;
    uint32_t l1_size = 0;  // entries
    uint64_t l1_table_offset = 0;
    uint64_t refcount_table_offset = 0;
    uint32_t refcount_table_clusters = 0;
    uint32_t nb_snapshots = 0;
    uint64_t snapshots_offset = 0;
    uint64_t incompatible_features = 0;
    uint64_t compatible_features = 0;
    uint64_t autoclear_features = 0;
    uint32_t refcount_order = 4;
    uint32_t header_length = kV3MinHeaderLength;
    CompressionType compression_type = CompressionType::zlib;

    uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
    bool extended_l2() const { return incompatible_features & kIncompatExtendedL2; }
    bool has_external_data_file() const { return incompatible_features & kIncompatDataFile; }
    bool data_file_raw() const { return autoclear_features & kAutoclearDataFileRaw; }
    bool dirty() const { return incompatible_features & kIncompatDirty; }
    bool corrupt() const { return incompatible_features & kIncompatCorrupt; }
    ClusterGeometry geometry() const { return ClusterGeometry{cluster_bits, extended_l2()}; }
};

struct FeatureName {
    uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
    uint8_t bit = 0;
    std::string name;
};

struct BitmapsExtension {
    uint32_t nb_bitmaps = 0;
    uint64_t bitmap_directory_size = 0;
    uint64_t bitmap_directory_offset = 0;
};

struct UnknownExtension {
    uint32_t type = 0;
    std::vector<std::byte> data;
};

/// Everything found between the fixed header and the end-of-extensions marker.
struct Extensions {
    std::optional<std::string> backing_format;  // "qcow2", "raw", ...
    std::optional<std::string> data_file;       // external data file name
    std::optional<BitmapsExtension> bitmaps;
    bool has_crypto_header = false;
    std::vector<FeatureName> feature_names;
    std::vector<UnknownExtension> unknown;  // kept so a header rewrite preserves them
};

/// Header, extensions and backing file name: all that cluster 0 holds.
struct ImageMetadata {
    Header header;
    Extensions extensions;
    std::string backing_file;  // empty when the image has no backing file
};

/// Parses and validates the fixed header from the first bytes of an image (at least 72 bytes;
/// kHeaderProbeBytes is always enough). `file_size` is the size of the image file, used to check
/// that tables lie inside it. Checks: magic, version 2 or 3, header_length in range, cluster_bits
/// 9..21, refcount_order 0..6 (4 for v2), unknown incompatible bits, compression type, encryption
/// flag consistency, alignment and in-file position of the L1, refcount and snapshot tables, the
/// L1 table large enough for `size` and not above kMaxL1Bytes.
/// Throws std::system_error(EIO) naming the problem; ENOTSUP for valid but unsupported images
/// (unknown incompatible features). Encryption is reported through crypt_method, not an error.
Header parse_header(std::span<const std::byte> bytes, uint64_t file_size);

/// Checks a refcount table of `clusters` clusters at `offset`, as parse_header does and as a
/// writer does again for a table it moved: present, at most kMaxRefcountTableBytes, cluster
/// aligned and not at 0, inside a file of `file_size` bytes. Throws std::system_error(EIO).
void check_refcount_table(uint64_t offset, uint32_t clusters, uint32_t cluster_bits, uint64_t file_size);

/// Parses the header, its extensions and the backing file name from cluster 0 (pass
/// min(cluster_size, file_size) bytes; fewer is an error if the structures reach past them).
/// Throws std::system_error(EIO) for lengths out of range, names too long, a data-file bit without
/// consistency, etc.
ImageMetadata parse_metadata(std::span<const std::byte> cluster0, uint64_t file_size);

/// Serializes header + extensions + backing name into a cluster-0 image of `cluster_size` bytes
/// (round-trips with parse_metadata). The extensions are laid out afresh, with the backing name
/// right after them: for creating images, not for rewriting an existing one (see below).
std::vector<std::byte> serialize_metadata(const ImageMetadata& m);

/// The bytes of the fixed header that a writer changes, as `h` holds them: [0, 72) for version 2,
/// [0, 104) for version 3. backing_file_offset and backing_file_size are written as `h` has them
/// (as parsed), header_length too; the compression type byte, any longer header, the extensions
/// and the backing name are not part of it, so rewriting these bytes at offset 0 keeps every
/// layout another writer chose (a backing name anywhere in cluster 0, the pre-1.0 v2 name at
/// offset 72 without an end marker, an extension area that fills the cluster). Small enough for
/// one sector, so a torn write cannot mix two headers. Throws std::system_error(EINVAL) for a
/// header that cannot be written (as serialize_metadata).
std::vector<std::byte> serialize_fixed_header(const Header& h);

/// True if `bytes` starts with the qcow2 magic.
bool has_qcow2_magic(std::span<const std::byte> bytes);

/// Big-endian helpers used across format/.
uint16_t load_be16(const std::byte* p);
uint32_t load_be32(const std::byte* p);
uint64_t load_be64(const std::byte* p);
void store_be16(std::byte* p, uint16_t v);
void store_be32(std::byte* p, uint32_t v);
void store_be64(std::byte* p, uint64_t v);

}  // namespace qcowfs::format
