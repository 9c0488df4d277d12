// Persistent dirty bitmaps: parse and validate the directory, list the clusters it owns, mark bitmaps in use.
#include "qcowfs/qcow2/bitmaps.hpp"

#include <string>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"

namespace qcowfs::qcow2 {

namespace {

constexpr size_t kEntryHeaderBytes = 24;
constexpr uint32_t kMaxTableEntries = 0x8000000;        // QEMU's limit on a bitmap table
constexpr uint64_t kMaxBitmapBytes = uint64_t{1} << 29;  // QEMU's limit on one bitmap's data
constexpr uint32_t kMinGranularityBits = 9;
constexpr uint32_t kMaxGranularityBits = 31;
constexpr uint32_t kMaxNameBytes = 1023;
// Bitmap table entries: bit 0 "all ones" (only without an offset), bits 9-55 the data cluster.
constexpr uint64_t kTableEntryReserved = 0xff000000000001feULL;
constexpr uint64_t kTableEntryOffset = 0x00fffffffffffe00ULL;
constexpr uint64_t kTableEntryAllOnes = 1;

uint64_t align8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

/// The bitmaps extension if QEMU would use it (present and the autoclear bit set), else nullptr.
const format::BitmapsExtension* active_extension(const format::ImageMetadata& meta) {
    if (!meta.extensions.bitmaps || !(meta.header.autoclear_features & format::kAutoclearBitmaps)) return nullptr;
    return &*meta.extensions.bitmaps;
}

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
Task<std::pair<std::vector<std::byte>, std::vector<BitmapDirectoryEntry>>> load_directory(
    io::File& file, const format::ImageMetadata& meta, const format::BitmapsExtension& ext) {
    const uint64_t file_size = file.size();
    const uint64_t offset = ext.bitmap_directory_offset, size = ext.bitmap_directory_size;
    if (size == 0) corrupt("bitmap directory is empty but the image has " + std::to_string(ext.nb_bitmaps) + " bitmaps");
    if (offset == 0 || offset % meta.header.cluster_size() != 0)
        corrupt("invalid bitmap directory offset " + hex(offset));
    if (offset > file_size || size > file_size - offset)
        corrupt("bitmap directory at " + hex(offset) + " (" + std::to_string(size) + " bytes) lies beyond the end of " +
                file.name());
    auto dir = co_await read_exact(file, offset, size, "bitmap directory");
    auto entries = parse_bitmap_directory(dir, meta, file_size);
    co_return std::pair{std::move(dir), std::move(entries)};
}

}  // namespace

std::vector<BitmapDirectoryEntry> parse_bitmap_directory(std::span<const std::byte> dir,
                                                         const format::ImageMetadata& meta, uint64_t file_size) {
    std::vector<BitmapDirectoryEntry> out;
    const format::BitmapsExtension* ext = active_extension(meta);
    if (!ext) return out;
    const auto& h = meta.header;
    const uint64_t cs = h.cluster_size();
    if (dir.size() != ext->bitmap_directory_size)
        corrupt("bitmap directory of " + std::to_string(dir.size()) + " bytes, header says " +
                std::to_string(ext->bitmap_directory_size));

    for (size_t at = 0; at < dir.size();) {
        const std::string where = "bitmap directory entry " + std::to_string(out.size());
        if (out.size() >= ext->nb_bitmaps)
            corrupt("bitmap directory holds more entries than the " + std::to_string(ext->nb_bitmaps) +
                    " the header announces");
        if (dir.size() - at < kEntryHeaderBytes) corrupt(where + " is cut off by the end of the directory");
        const std::byte* p = dir.data() + at;
        BitmapDirectoryEntry e;
        e.table_offset = format::load_be64(p);
        e.table_size = format::load_be32(p + 8);
        e.flags = format::load_be32(p + 12);
        e.type = std::to_integer<uint8_t>(p[16]);
        e.granularity_bits = std::to_integer<uint8_t>(p[17]);
        const uint32_t name_size = format::load_be16(p + 18);
        e.extra_data_size = format::load_be32(p + 20);
        e.position = at;
        const uint64_t entry_bytes = align8(kEntryHeaderBytes + uint64_t{e.extra_data_size} + name_size);
        if (entry_bytes > dir.size() - at)
            corrupt(where + " (" + std::to_string(entry_bytes) + " bytes) is cut off by the end of the directory");
        e.name.assign(reinterpret_cast<const char*>(p + kEntryHeaderBytes + e.extra_data_size), name_size);
        const std::string bitmap = where + " ('" + e.name + "')";

        if (name_size == 0 || name_size > kMaxNameBytes)
            corrupt(bitmap + " has a name of " + std::to_string(name_size) + " bytes (1 to 1023 allowed)");
        if (e.flags & ~kBitmapKnownFlags) corrupt(bitmap + " has unknown flags " + hex(e.flags));
        if (e.type != kBitmapTypeDirty) corrupt(bitmap + " has unknown type " + std::to_string(e.type));
        if (e.granularity_bits < kMinGranularityBits || e.granularity_bits > kMaxGranularityBits)
            corrupt(bitmap + " has granularity bits " + std::to_string(e.granularity_bits) + " (9 to 31 allowed)");
        if (e.table_size == 0 || e.table_size > kMaxTableEntries)
            corrupt(bitmap + " has a bitmap table of " + std::to_string(e.table_size) + " entries");
        if (uint64_t{e.table_size} * cs > kMaxBitmapBytes)
            corrupt(bitmap + " describes more than 512 MiB of bitmap data");
        // Bits the table can hold, times the bytes each bit covers: the disk must fit (a bitmap in
        // use may be left short by a resize; it is not read anyway).
        const uint64_t covered = (uint64_t{e.table_size} * cs * 8) << e.granularity_bits;
        if (!(e.flags & kBitmapInUse) && h.size > covered)
            corrupt(bitmap + " covers " + std::to_string(covered) + " bytes of a " + std::to_string(h.size) +
                    "-byte disk");
        const uint64_t table_bytes = uint64_t{e.table_size} * 8;
        if (e.table_offset == 0 || e.table_offset % cs != 0)
            corrupt(bitmap + " has an invalid bitmap table offset " + hex(e.table_offset));
        if (e.table_offset > file_size || table_bytes > file_size - e.table_offset)
            corrupt(bitmap + ": bitmap table at " + hex(e.table_offset) + " lies beyond the end of the file (" +
                    std::to_string(file_size) + " bytes)");
        out.push_back(std::move(e));
        at += entry_bytes;
    }
    if (out.size() != ext->nb_bitmaps)
        corrupt("bitmap directory holds " + std::to_string(out.size()) + " entries, the header announces " +
                std::to_string(ext->nb_bitmaps));
    return out;
}

Task<std::vector<uint64_t>> bitmap_clusters(io::File& file, const format::ImageMetadata& meta) {
    std::vector<uint64_t> clusters;
    const format::BitmapsExtension* ext = active_extension(meta);
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
            const uint64_t offset = raw & kTableEntryOffset;
            auto bad = [&](const std::string& why) {
                corrupt("bitmap '" + e.name + "' table entry " + std::to_string(i) + " (" + hex(raw) + ") " + why);
            };
            if (raw & kTableEntryReserved) bad("has reserved bits set");
            if (offset == 0) continue;  // all zeros or all ones, no cluster
            if (raw & kTableEntryAllOnes) bad("has the all-ones bit set together with a data cluster");
            if (offset % cs != 0) bad("points at a data cluster that is not cluster aligned");
            if (offset >= file_size) bad("points beyond the end of " + file.name());
            clusters.push_back(offset);
        }
    }
    co_return clusters;
}

Task<std::vector<BitmapArea>> bitmap_metadata_areas(io::File& file, const format::ImageMetadata& meta) {
    std::vector<BitmapArea> areas;
    const format::BitmapsExtension* ext = active_extension(meta);
    if (!ext) co_return areas;
    auto [dir, entries] = co_await load_directory(file, meta, *ext);
    areas.push_back({ext->bitmap_directory_offset, ext->bitmap_directory_size, "the bitmap directory"});
    for (const auto& e : entries)
        areas.push_back({e.table_offset, uint64_t{e.table_size} * 8, "the bitmap table of '" + e.name + "'"});
    co_return areas;
}

Task<void> mark_bitmaps_in_use(io::File& file, const format::ImageMetadata& meta) {
    const format::BitmapsExtension* ext = active_extension(meta);
    if (!ext) co_return;
    auto [dir, entries] = co_await load_directory(file, meta, *ext);
    bool changed = false;
    for (const auto& e : entries) {
        if (e.flags & kBitmapInUse) continue;
        format::store_be32(dir.data() + e.position + 12, e.flags | kBitmapInUse);
        changed = true;
    }
    if (!changed) co_return;
    co_await file.write_at(ext->bitmap_directory_offset, dir);
    co_await file.flush();
}

}  // namespace qcowfs::qcow2
