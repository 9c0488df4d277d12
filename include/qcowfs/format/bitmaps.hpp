// Persistent dirty bitmaps: the bitmap directory and bitmap table entries, parsed and validated (pure, no I/O).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/format/header.hpp"

namespace qcowfs::format {

// Bitmap directory entry flags. Bit 2 (extra_data_compatible: unknown extra data may be
// ignored) is known too; qcowfs never needs to look at it.
inline constexpr uint32_t kBitmapInUse = 1u << 0;  // content may be stale: not to be trusted
inline constexpr uint32_t kBitmapAuto = 1u << 1;   // tracks every guest write while the image is open
inline constexpr uint32_t kBitmapKnownFlags = 0x7;
inline constexpr uint8_t kBitmapTypeDirty = 1;

/// One entry of the bitmap directory, as parsed (the name and extra data are not interpreted).
struct BitmapDirectoryEntry {
    uint64_t table_offset = 0;  // host offset of the bitmap table (cluster aligned)
    uint32_t table_size = 0;    // entries (8 bytes each) in the bitmap table
    uint32_t flags = 0;
    uint8_t type = 0;
    uint8_t granularity_bits = 0;
    uint32_t extra_data_size = 0;
    std::string name;
    std::vector<std::byte> extra_data;  // kept as found, for a rewrite of the directory
    size_t position = 0;  // byte offset of the entry inside the directory (flags are at position + 12)
};

/// The bitmaps extension if QEMU would use it (present and the autoclear bitmaps bit set), else nullptr.
const BitmapsExtension* active_bitmaps(const ImageMetadata& meta);

/// Checks where the directory of an active extension lies: not empty, cluster aligned, not at 0,
/// inside a file of `file_size` bytes. Throws std::system_error(EIO) naming the problem.
void check_bitmap_directory_location(const BitmapsExtension& ext, uint32_t cluster_bits, uint64_t file_size);

/// Parses and validates the bitmap directory bytes of an image whose bitmaps extension is in force
/// (empty result otherwise): exactly nb_bitmaps entries filling bitmap_directory_size; per entry:
/// table offset cluster-aligned, non-zero and its table inside `file_size`, table size 1..2^27
/// entries and at most 512 MiB of bitmap data, big enough for the disk unless the bitmap is in
/// use, no unknown flag bits, type 1 (dirty tracking), granularity 2^9..2^31, name 1..1023 bytes.
/// Throws std::system_error(EIO) naming the problem.
std::vector<BitmapDirectoryEntry> parse_bitmap_directory(std::span<const std::byte> directory,
                                                         const ImageMetadata& meta, uint64_t file_size);

/// The data cluster a bitmap table entry names (0: none, the bits read as all zeros or all ones).
/// Throws std::system_error(EIO) for reserved bits, the all-ones bit together with a cluster, or a
/// cluster that is not aligned; the reason reads on after "bitmap table entry (0x...)".
uint64_t decode_bitmap_table_entry(uint64_t raw, uint32_t cluster_bits);

/// A bitmap table entry: bit 0 set when the whole cluster's bits are ones and no cluster is
/// stored; otherwise the data cluster's offset (0: all zeros).
inline constexpr uint64_t kBitmapTableAllOnes = 1;

/// Bytes of bitmap data of a disk of `disk_size` bytes, one bit per 2^granularity_bits bytes
/// (the last chunk may be partial), rounded up to whole bytes.
uint64_t bitmap_data_bytes(uint64_t disk_size, uint32_t granularity_bits);

/// Entries of the bitmap table that holds that data in clusters of 2^cluster_bits bytes (at
/// least 1, as QEMU writes it for an empty disk).
uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits, uint32_t cluster_bits);

/// The bitmap directory holding `entries` in order (name, extra data and padding as the
/// specification lays them out; `position` is ignored). Round-trips with parse_bitmap_directory.
std::vector<std::byte> serialize_bitmap_directory(const std::vector<BitmapDirectoryEntry>& entries);

/// Byte offset in cluster 0 of the bitmaps extension's 24 data bytes (nb_bitmaps, reserved,
/// directory size, directory offset), or nullopt when the extension area has none. `cluster0` as
/// given to parse_metadata; the walk stops at the end marker or the end of the bytes.
std::optional<uint64_t> bitmaps_extension_position(std::span<const std::byte> cluster0, const Header& h);

/// The 24 data bytes of a bitmaps extension.
std::vector<std::byte> serialize_bitmaps_extension(const BitmapsExtension& ext);

}  // namespace qcowfs::format
