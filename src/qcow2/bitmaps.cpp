// Persistent dirty bitmaps on a file: read the directory, list the clusters it owns, mark bitmaps in use,
// and the in-memory bits of the bitmaps qcowfs keeps up to date.
#include "qcowfs/qcow2/bitmaps.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"

namespace qcowfs::qcow2 {

namespace {

/// Reads exactly `n` bytes at `offset`, EIO naming `what` when the file ends first.
Task<std::vector<std::byte>> read_exact(io::File& file, uint64_t offset, uint64_t n, const std::string& what) {
    std::vector<std::byte> buf(n);
    const size_t got = co_await file.read_at(offset, buf);
    if (got != n)
        corrupt(what + " at " + hex(offset) + " (" + std::to_string(n) + " bytes) is cut off by the end of " +
                file.name());
    co_return buf;
}

/// Reads and validates the directory of an active extension.
Task<std::pair<std::vector<std::byte>, std::vector<format::BitmapDirectoryEntry>>> load_directory(
    io::File& file, const format::ImageMetadata& meta, const format::BitmapsExtension& ext) {
    const uint64_t file_size = file.size();
    format::check_bitmap_directory_location(ext, meta.header.cluster_bits, file_size);
    auto dir = co_await read_exact(file, ext.bitmap_directory_offset, ext.bitmap_directory_size, "bitmap directory");
    auto entries = format::parse_bitmap_directory(dir, meta, file_size);
    co_return std::pair{std::move(dir), std::move(entries)};
}

}  // namespace

Task<std::vector<uint64_t>> bitmap_clusters(io::File& file, const format::ImageMetadata& meta) {
    std::vector<uint64_t> clusters;
    const format::BitmapsExtension* ext = format::active_bitmaps(meta);
    if (!ext) co_return clusters;
    const uint64_t cs = meta.header.cluster_size();
    const uint64_t file_size = file.size();
    auto add_range = [&](uint64_t offset, uint64_t bytes) {
        for (uint64_t c = offset / cs; c <= (offset + bytes - 1) / cs; ++c) clusters.push_back(c * cs);
    };

    auto [dir, entries] = co_await load_directory(file, meta, *ext);
    add_range(ext->bitmap_directory_offset, ext->bitmap_directory_size);
    for (const auto& e : entries) {
        const uint64_t table_bytes = uint64_t{e.table_size} * 8;
        add_range(e.table_offset, table_bytes);
        auto table = co_await read_exact(file, e.table_offset, table_bytes, "bitmap table of '" + e.name + "'");
        for (uint32_t i = 0; i < e.table_size; ++i) {
            const uint64_t raw = format::load_be64(table.data() + 8 * uint64_t{i});
            auto entry = [&] {
                return "bitmap '" + e.name + "' table entry " + std::to_string(i) + " (" + hex(raw) + ") ";
            };
            uint64_t offset = 0;
            try {
                offset = format::decode_bitmap_table_entry(raw, meta.header.cluster_bits);
            } catch (const std::system_error& error) {
                corrupt(entry() + reason_of(error));
            }
            if (offset == 0) continue;  // all zeros or all ones, no cluster
            if (offset >= file_size) corrupt(entry() + "points beyond the end of " + file.name());
            clusters.push_back(offset);
        }
    }
    co_return clusters;
}

Task<std::vector<BitmapArea>> bitmap_metadata_areas(io::File& file, const format::ImageMetadata& meta) {
    std::vector<BitmapArea> areas;
    const format::BitmapsExtension* ext = format::active_bitmaps(meta);
    if (!ext) co_return areas;
    auto [dir, entries] = co_await load_directory(file, meta, *ext);
    areas.push_back({ext->bitmap_directory_offset, ext->bitmap_directory_size, "the bitmap directory"});
    for (const auto& e : entries)
        areas.push_back({e.table_offset, uint64_t{e.table_size} * 8, "the bitmap table of '" + e.name + "'"});
    co_return areas;
}

// ---- DirtyMap ----------------------------------------------------------------------------------

namespace {

uint64_t chunks_of(uint64_t bytes, uint32_t granularity_bits) {
    return (bytes >> granularity_bits) + ((bytes & ((uint64_t{1} << granularity_bits) - 1)) != 0);
}

/// Sets bits [from, to) of `bits`.
void set_bits(std::span<uint8_t> bits, uint64_t from, uint64_t to) {
    for (; from < to && from % 8; ++from) bits[from / 8] |= uint8_t(1u << (from % 8));
    if (to - from >= 8) {
        std::memset(bits.data() + from / 8, 0xff, (to - from) / 8);
        from += (to - from) / 8 * 8;
    }
    for (; from < to; ++from) bits[from / 8] |= uint8_t(1u << (from % 8));
}

bool bit(std::span<const uint8_t> bits, uint64_t i) { return (bits[i / 8] >> (i % 8)) & 1; }

}  // namespace

void clear_bits(std::span<uint8_t> bits, uint64_t from, uint64_t to) {
    to = std::min<uint64_t>(to, bits.size() * 8);
    for (; from < to && from % 8; ++from) bits[from / 8] &= uint8_t(~(1u << (from % 8)));
    if (from < to && to - from >= 8) {
        std::memset(bits.data() + from / 8, 0, (to - from) / 8);
        from += (to - from) / 8 * 8;
    }
    for (; from < to; ++from) bits[from / 8] &= uint8_t(~(1u << (from % 8)));
}

DirtyMap::DirtyMap(uint32_t granularity_bits, uint64_t page_bytes, uint64_t disk_size)
    : granularity_bits_(granularity_bits),
      page_bytes_(page_bytes),
      disk_size_(disk_size),
      cut_(chunks_of(disk_size, granularity_bits)),
      initial_chunks_(cut_) {}

uint64_t DirtyMap::chunks() const { return chunks_of(disk_size_, granularity_bits_); }

void DirtyMap::set(uint64_t offset, uint64_t length) {
    if (length == 0 || offset >= disk_size_) return;
    const uint64_t end = std::min(disk_size_ - offset, length) + offset;
    const uint64_t per_page = chunks_per_page();
    uint64_t c = offset >> granularity_bits_;
    const uint64_t last = (end - 1) >> granularity_bits_;
    while (c <= last) {
        const uint64_t index = c / per_page;
        const uint64_t to = std::min(last + 1, (index + 1) * per_page);
        auto [it, fresh] = pages_.try_emplace(index);
        if (fresh) it->second.assign(page_bytes_, 0);
        set_bits(it->second, c - index * per_page, to - index * per_page);
        c = to;
    }
}

void DirtyMap::resize(uint64_t disk_size) {
    if (disk_size < disk_size_) {
        const uint64_t keep = chunks_of(disk_size, granularity_bits_);
        const uint64_t per_page = chunks_per_page();
        cut_ = std::min(cut_, keep);
        for (auto it = pages_.lower_bound(keep / per_page); it != pages_.end();) {
            if (it->first * per_page >= keep) {
                it = pages_.erase(it);
            } else {
                clear_bits(it->second, keep - it->first * per_page, per_page);
                ++it;
            }
        }
    }
    disk_size_ = disk_size;
}

bool DirtyMap::test(uint64_t chunk) const {
    auto it = pages_.find(chunk / chunks_per_page());
    return it != pages_.end() && bit(it->second, chunk % chunks_per_page());
}

void DirtyMap::merge_into(uint64_t index, std::span<uint8_t> stored) const {
    const uint64_t per_page = chunks_per_page();
    const uint64_t first = index * per_page;
    if (cut_ < first + per_page) clear_bits(stored, cut_ > first ? cut_ - first : 0, per_page);
    if (auto it = pages_.find(index); it != pages_.end())
        for (size_t i = 0; i < stored.size(); ++i) stored[i] |= it->second[i];
    const uint64_t n = chunks();
    if (n < first + per_page) clear_bits(stored, n > first ? n - first : 0, per_page);
}

// ---- DirtyBitmaps -------------------------------------------------------------------------------

Task<std::unique_ptr<DirtyBitmaps>> DirtyBitmaps::load(io::File& file, const format::ImageMetadata& meta,
                                                       uint64_t disk_size) {
    auto out = std::make_unique<DirtyBitmaps>();
    const format::BitmapsExtension* ext = format::active_bitmaps(meta);
    if (!ext) co_return out;
    const uint32_t cb = meta.header.cluster_bits;
    const uint64_t file_size = file.size();
    auto [dir, entries] = co_await load_directory(file, meta, *ext);
    out->cluster_bits_ = cb;
    out->directory_offset_ = ext->bitmap_directory_offset;
    out->directory_bytes_ = std::move(dir);
    out->directory_ = entries;
    for (auto& e : entries) {
        if (e.flags & format::kBitmapInUse) continue;
        const uint64_t table_bytes = uint64_t{e.table_size} * 8;
        auto raw = co_await read_exact(file, e.table_offset, table_bytes, "bitmap table of '" + e.name + "'");
        Bitmap b{e, {}, DirtyMap(e.granularity_bits, meta.header.cluster_size(), disk_size),
                 (e.flags & format::kBitmapAuto) != 0, false, UINT64_MAX, {}};
        b.table.resize(e.table_size);
        for (uint32_t i = 0; i < e.table_size; ++i) {
            b.table[i] = format::load_be64(raw.data() + 8 * uint64_t{i});
            uint64_t offset = 0;
            try {
                offset = format::decode_bitmap_table_entry(b.table[i], cb);
            } catch (const std::system_error& error) {
                corrupt("bitmap '" + e.name + "' table entry " + std::to_string(i) + " " + reason_of(error));
            }
            if (offset >= file_size)
                corrupt("bitmap '" + e.name + "' table entry " + std::to_string(i) + " points beyond the end of " +
                        file.name());
        }
        out->tracked_.push_back(std::move(b));
    }
    co_return out;
}

DirtyBitmaps::Bitmap& DirtyBitmaps::find(const std::string& name) {
    for (Bitmap& b : tracked_)
        if (b.entry.name == name && b.enabled) return b;
    for (const auto& e : directory_) {
        if (e.name != name) continue;
        if (e.flags & format::kBitmapInUse)
            fail(EIO, "bitmap '" + name + "' was marked in use when the image was opened (inconsistent: "
                      "QEMU does not use it either)");
        fail(ENOENT, "bitmap '" + name + "' is disabled");
    }
    fail(ENOENT, "no bitmap '" + name + "'");
}

void DirtyBitmaps::mark(uint64_t offset, uint64_t length) {
    for (Bitmap& b : tracked_)
        if (b.enabled) b.written.set(offset, length);
}

void DirtyBitmaps::resize(uint64_t disk_size) {
    for (Bitmap& b : tracked_) b.written.resize(disk_size);
}

Task<void> DirtyBitmaps::mark_in_use(io::File& file, bool all) {
    std::vector<Bitmap*> now;
    for (Bitmap& b : tracked_)
        if (!b.marked && (all || b.enabled)) now.push_back(&b);
    if (now.empty()) co_return;
    for (const Bitmap* b : now)
        format::store_be32(directory_bytes_.data() + b->entry.position + 12, b->entry.flags | format::kBitmapInUse);
    co_await file.write_at(directory_offset_, directory_bytes_);
    co_await file.flush();
    for (Bitmap* b : now) b->marked = true;
    marked_in_use_ = true;
}

Task<const std::vector<uint8_t>*> DirtyBitmaps::stored_page(io::File& file, Bitmap& b, uint64_t index) {
    const uint64_t cs = uint64_t{1} << cluster_bits_;
    if (b.stored_index != index) {
        std::vector<uint8_t> page(cs, 0);
        const uint64_t raw = index < b.table.size() ? b.table[index] : 0;
        if (const uint64_t offset = format::decode_bitmap_table_entry(raw, cluster_bits_)) {
            auto bytes = co_await read_exact(file, offset, cs, "bitmap '" + b.entry.name + "' data cluster");
            std::memcpy(page.data(), bytes.data(), cs);
        } else if (raw & format::kBitmapTableAllOnes) {
            std::fill(page.begin(), page.end(), 0xff);
        }
        b.stored = std::move(page);
        b.stored_index = index;
    }
    co_return &b.stored;
}

Task<std::vector<uint8_t>> DirtyBitmaps::page(io::File& file, Bitmap& b, uint64_t index) {
    std::vector<uint8_t> page = *co_await stored_page(file, b, index);
    b.written.merge_into(index, page);
    co_return page;
}

bool DirtyBitmaps::page_changed(const Bitmap& b, uint64_t index) const {
    return b.written.pages().count(index) || index >= b.table.size() || b.written.cut_into(index);
}

Task<std::pair<bool, uint64_t>> DirtyBitmaps::run(io::File& file, Bitmap& b, uint64_t offset, uint64_t disk_size) {
    const uint32_t g = b.entry.granularity_bits;
    const uint64_t per_page = b.written.chunks_per_page();
    const uint64_t chunk = offset >> g, index = chunk / per_page;
    const std::vector<uint8_t> bits = co_await page(file, b, index);
    const bool dirty = bit(bits, chunk - index * per_page);
    uint64_t i = chunk - index * per_page + 1;
    // Whole bytes of the same state at once, then bit by bit.
    const uint8_t same = dirty ? 0xff : 0;
    while (i < per_page) {
        if (i % 8 == 0 && bits[i / 8] == same) {
            i += 8;
            continue;
        }
        if (bit(bits, i) != dirty) break;
        ++i;
    }
    const uint64_t end_chunk = index * per_page + i;
    const uint64_t end = end_chunk >= (disk_size >> g) + 1 ? disk_size : std::min(disk_size, end_chunk << g);
    co_return std::pair{dirty, end};
}

}  // namespace qcowfs::qcow2
