// Persistent dirty bitmaps (the qcow2 "Bitmaps" extension) on a file: the clusters they own, the in_use flag.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/format/bitmaps.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::io {
class File;
}

namespace qcowfs::qcow2 {

/// Host clusters used by the bitmap directory, bitmap tables and bitmap data clusters (for
/// rebuild_refcounts and checks), as the cluster-aligned host offset of each cluster, once per
/// reference (an entry of a bitmap table referencing a cluster is one reference). Empty without a
/// bitmaps extension or when the autoclear bitmaps bit is clear (QEMU then ignores the extension).
/// Validates the directory (format::parse_bitmap_directory), the directory inside the file, and every
/// bitmap table entry (format::decode_bitmap_table_entry, and the data cluster inside the file).
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
