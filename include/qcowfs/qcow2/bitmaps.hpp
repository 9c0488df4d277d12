// Persistent dirty bitmaps (the qcow2 "Bitmaps" extension) on a file: the clusters they own, the in_use flag,
// and the bits of the enabled ones kept up to date while the image is written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
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

/// The chunks of one bitmap that were written since the image was opened: one bit per
/// 2^granularity_bits guest bytes, bit order as on disk (chunk i is bit i % 8 of byte i / 8), in
/// pages of `page_bytes` bytes (the image's cluster size, so one page is the data of one bitmap
/// table entry) allocated when a write first touches them. Memory: one page per touched page of
/// the bitmap, at most format::bitmap_data_bytes(disk size) rounded up to pages. Pure, no I/O.
class DirtyMap {
public:
    DirtyMap(uint32_t granularity_bits, uint64_t page_bytes, uint64_t disk_size);
    /// Sets the bit of every chunk that [offset, offset + length) touches, up to the disk's end.
    void set(uint64_t offset, uint64_t length);
    /// Follows a size change (as QEMU truncates a bitmap): a smaller disk drops every bit past
    /// its end, new and old (see cut()); a larger one adds clear bits.
    void resize(uint64_t disk_size);
    /// True if chunk `chunk` was set (and not dropped since).
    bool test(uint64_t chunk) const;
    /// Chunks of the disk now (the last one may be partial).
    uint64_t chunks() const;
    /// The fewest chunks the disk had since the map was made: bits of the data stored before, at
    /// or past this chunk, were dropped by a shrink and no longer count.
    uint64_t cut() const { return cut_; }
    /// True if a shrink dropped stored bits of page `index` (the cut lies in it or before it).
    bool cut_into(uint64_t index) const { return cut_ < initial_chunks_ && cut_ < (index + 1) * chunks_per_page(); }
    uint64_t chunks_per_page() const { return page_bytes_ * 8; }
    /// The pages holding set bits, by page index.
    const std::map<uint64_t, std::vector<uint8_t>>& pages() const { return pages_; }
    size_t memory_bytes() const { return pages_.size() * page_bytes_; }
    /// Turns `stored` (page `index` as stored before: page_bytes, zeros for none) into the page as
    /// it is now: bits at or past cut() cleared, this map's bits added, bits past the disk's end
    /// cleared.
    void merge_into(uint64_t index, std::span<uint8_t> stored) const;

private:
    uint32_t granularity_bits_;
    uint64_t page_bytes_;
    uint64_t disk_size_;
    uint64_t cut_;
    uint64_t initial_chunks_;  // chunks when the map was made
    std::map<uint64_t, std::vector<uint8_t>> pages_;
};

/// Clears bits [from, to) of `bits` (bit i is bit i % 8 of byte i / 8); `to` is clipped to it.
void clear_bits(std::span<uint8_t> bits, uint64_t from, uint64_t to);

/// The persistent dirty bitmaps of one image as qcowfs keeps them: the directory as it was at
/// open, and for every consistent bitmap (not in use) its table and a DirtyMap of what was written
/// since (enabled bitmaps only: disabled ones take no bits, but follow a resize, as in QEMU).
/// Bitmaps in use at open (inconsistent: QEMU will not use them) are never changed. All calls on
/// the image's lock.
class DirtyBitmaps {
public:
    struct Bitmap {
        format::BitmapDirectoryEntry entry;  // as found at open
        std::vector<uint64_t> table;         // raw bitmap table entries as found at open
        DirtyMap written;
        bool enabled = false;  // auto: takes the bits of every write
        bool marked = false;   // set in use on disk by mark_in_use: written back at close
        uint64_t stored_index = UINT64_MAX;  // the one stored page kept for reads (stored_page)
        std::vector<uint8_t> stored;
    };

    /// Reads and validates the directory (bitmap_clusters' checks) and the tables of the tracked
    /// bitmaps, for a disk of `disk_size` bytes. Empty without an active bitmaps extension.
    /// Throws std::system_error(EIO) naming the problem, or the read's error.
    static Task<std::unique_ptr<DirtyBitmaps>> load(io::File& file, const format::ImageMetadata& meta,
                                                    uint64_t disk_size);

    /// The directory entries as found at open, every bitmap, in order.
    const std::vector<format::BitmapDirectoryEntry>& directory() const { return directory_; }
    std::vector<Bitmap>& tracked() { return tracked_; }
    /// The enabled bitmap `name`: ENOENT if there is none or it is disabled, EIO if it was in
    /// use when the image was opened (inconsistent).
    Bitmap& find(const std::string& name);

    /// A guest write, zeroing or discard of [offset, offset + length): every enabled bitmap's
    /// bits. Synchronous; call it once they are marked in use on disk (mark_in_use).
    void mark(uint64_t offset, uint64_t length);
    /// A change of the disk's size (DirtyMap::resize on every tracked bitmap).
    void resize(uint64_t disk_size);

    /// Sets the in_use flag of the enabled bitmaps (`all`: of every consistent one, before a
    /// resize changes them all) in the directory on disk, each once, so that QEMU does not trust
    /// bits that are about to go stale. Call it, and let it return, before the first write (or
    /// resize) reaches the disk. The directory is rewritten in place, then flushed; only flags
    /// words change, so a torn rewrite still leaves a valid directory. No write at all when
    /// nothing is left to mark (no bitmaps, autoclear bit clear, all in use already). Throws the
    /// I/O error.
    Task<void> mark_in_use(io::File& file, bool all);
    /// True once mark_in_use has written a flag: close must write the bitmaps back.
    bool marked_in_use() const { return marked_in_use_; }

    /// Page `index` of `b` as it is now (stored bits merged with the written ones): page_bytes.
    Task<std::vector<uint8_t>> page(io::File& file, Bitmap& b, uint64_t index);
    /// True if page `index` of `b` must be written at close: it holds written bits, a shrink
    /// dropped bits in it, or it is new.
    bool page_changed(const Bitmap& b, uint64_t index) const;
    /// The run of chunks of `b` around guest byte `offset` (< the disk's size) that are all set
    /// (true) or all clear, as (dirty, end) with end the first byte after it (at most the end of
    /// the page, and at most `disk_size`).
    Task<std::pair<bool, uint64_t>> run(io::File& file, Bitmap& b, uint64_t offset, uint64_t disk_size);

private:
    /// Page `index` of `b` as stored at open (cached for one page).
    Task<const std::vector<uint8_t>*> stored_page(io::File& file, Bitmap& b, uint64_t index);

    uint32_t cluster_bits_ = 16;
    std::vector<format::BitmapDirectoryEntry> directory_;
    std::vector<std::byte> directory_bytes_;  // as read, for the in-place flags rewrite
    uint64_t directory_offset_ = 0;
    std::vector<Bitmap> tracked_;
    bool marked_in_use_ = false;
};

}  // namespace qcowfs::qcow2
