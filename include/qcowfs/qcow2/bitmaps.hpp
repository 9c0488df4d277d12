// Persistent dirty bitmaps (the qcow2 "Bitmaps" extension): the directory, the clusters it owns, the in_use flag.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/format/header.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::io {
class File;
}

namespace qcowfs::qcow2 {

// Bitmap directory entry flags.
inline constexpr uint32_t kBitmapInUse = 1u << 0;               // content may be stale: not to be trusted
inline constexpr uint32_t kBitmapAuto = 1u << 1;                // tracks every guest write while the image is open
inline constexpr uint32_t kBitmapExtraDataCompatible = 1u << 2;  // unknown extra data may be ignored
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

/// Parses and validates the bitmap directory bytes of an image whose bitmaps extension is in force:
/// exactly nb_bitmaps entries filling bitmap_directory_size; per entry: table offset cluster-aligned,
/// non-zero and its table inside `file_size`, table size 1..2^27 entries and at most 512 MiB of
/// bitmap data, big enough for the disk unless the bitmap is in use, no unknown flag bits, type 1
/// (dirty tracking), granularity 2^9..2^31, name 1..1023 bytes. Pure. Throws std::system_error(EIO)
/// naming the problem.
std::vector<BitmapDirectoryEntry> parse_bitmap_directory(std::span<const std::byte> directory,
                                                         const format::ImageMetadata& meta, uint64_t file_size);

/// Host clusters used by the bitmap directory, bitmap tables and bitmap data clusters (for
/// rebuild_refcounts and checks), as the cluster-aligned host offset of each cluster, once per
/// reference (an entry of a bitmap table referencing a cluster is one reference). Empty without a
/// bitmaps extension or when the autoclear bitmaps bit is clear (QEMU then ignores the extension).
/// Validates the directory (parse_bitmap_directory), the directory inside the file, and every bitmap
/// table entry (reserved bits clear, data cluster aligned, inside the file, not cluster 0).
/// Reads the directory and every table. Throws std::system_error(EIO) naming the problem, or the
/// read's error.
Task<std::vector<uint64_t>> bitmap_clusters(io::File& file, const format::ImageMetadata& meta);

/// The bitmap directory and each bitmap table, as (host offset, bytes, description); empty
/// without an active bitmaps extension. Reads and validates the directory (not the tables).
struct BitmapArea {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    std::string what;
};
Task<std::vector<BitmapArea>> bitmap_metadata_areas(io::File& file, const format::ImageMetadata& meta);

/// Sets the in_use flag of every bitmap in the directory (rewritten in place) and flushes, so
/// QEMU treats them as inconsistent instead of trusting stale bits. No-op without bitmaps or
/// when the autoclear bitmaps bit is clear, and without any write when every bitmap is already
/// in use. Call it, and let it return, before the first guest write that could make a bitmap
/// stale. Only the flags words change, so a torn rewrite still leaves a valid directory.
/// Throws std::system_error(EIO) for an invalid directory (nothing is written then), or the
/// I/O error.
Task<void> mark_bitmaps_in_use(io::File& file, const format::ImageMetadata& meta);

}  // namespace qcowfs::qcow2
