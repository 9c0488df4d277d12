// Persistent dirty bitmaps: the bitmap directory and bitmap table entries, parsed and validated (pure, no I/O).
#pragma once

#include <cstddef>
#include <cstdint>
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

}  // namespace qcowfs::format
