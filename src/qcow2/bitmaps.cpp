// Persistent dirty bitmaps on a file: read the directory, list the clusters it owns, mark bitmaps in use.
#include "qcowfs/qcow2/bitmaps.hpp"

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

Task<void> mark_bitmaps_in_use(io::File& file, const format::ImageMetadata& meta) {
    const format::BitmapsExtension* ext = format::active_bitmaps(meta);
    if (!ext) co_return;
    auto [dir, entries] = co_await load_directory(file, meta, *ext);
    bool changed = false;
    for (const auto& e : entries) {
        if (e.flags & format::kBitmapInUse) continue;
        format::store_be32(dir.data() + e.position + 12, e.flags | format::kBitmapInUse);
        changed = true;
    }
    if (!changed) co_return;
    co_await file.write_at(ext->bitmap_directory_offset, dir);
    co_await file.flush();
}

}  // namespace qcowfs::qcow2
