// Parses and validates the bitmap directory and bitmap table entries of persistent dirty bitmaps.
#include "qcowfs/format/bitmaps.hpp"

#include <algorithm>
#include <cstring>

#include "detail.hpp"
#include "qcowfs/format/error.hpp"

namespace qcowfs::format {

namespace {

using namespace detail;  // aligned, hex, inside, round_up8

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

/// The entry at `at` of the directory; EIO (naming it as `where`) when it is cut off.
BitmapDirectoryEntry read_entry(std::span<const std::byte> dir, size_t at, const std::string& where) {
    if (dir.size() - at < kEntryHeaderBytes) corrupt(where + " is cut off by the end of the directory");
    const std::byte* p = dir.data() + at;
    BitmapDirectoryEntry e;
    e.table_offset = load_be64(p);
    e.table_size = load_be32(p + 8);
    e.flags = load_be32(p + 12);
    e.type = std::to_integer<uint8_t>(p[16]);
    e.granularity_bits = std::to_integer<uint8_t>(p[17]);
    const uint32_t name_size = load_be16(p + 18);
    e.extra_data_size = load_be32(p + 20);
    e.position = at;
    const uint64_t entry_bytes = round_up8(kEntryHeaderBytes + uint64_t{e.extra_data_size} + name_size);
    if (entry_bytes > dir.size() - at)
        corrupt(where + " (" + std::to_string(entry_bytes) + " bytes) is cut off by the end of the directory");
    e.extra_data.assign(p + kEntryHeaderBytes, p + kEntryHeaderBytes + e.extra_data_size);
    e.name.assign(reinterpret_cast<const char*>(p + kEntryHeaderBytes + e.extra_data_size), name_size);
    return e;
}

/// Bytes entry `e` takes in the directory, padding included.
uint64_t entry_bytes(const BitmapDirectoryEntry& e) {
    return round_up8(kEntryHeaderBytes + uint64_t{e.extra_data_size} + e.name.size());
}

/// The checks of one entry that need nothing but the entry itself.
void check_fields(const BitmapDirectoryEntry& e, const std::string& bitmap) {
    if (e.name.empty() || e.name.size() > kMaxNameBytes)
        corrupt(bitmap + " has a name of " + std::to_string(e.name.size()) + " bytes (1 to 1023 allowed)");
    if (e.flags & ~kBitmapKnownFlags) corrupt(bitmap + " has unknown flags " + hex(e.flags));
    if (e.type != kBitmapTypeDirty) corrupt(bitmap + " has unknown type " + std::to_string(e.type));
    if (e.granularity_bits < kMinGranularityBits || e.granularity_bits > kMaxGranularityBits)
        corrupt(bitmap + " has granularity bits " + std::to_string(e.granularity_bits) + " (9 to 31 allowed)");
    if (e.table_size == 0 || e.table_size > kMaxTableEntries)
        corrupt(bitmap + " has a bitmap table of " + std::to_string(e.table_size) + " entries");
}

/// The checks of one entry against the image: its table's size and place.
void check_table(const BitmapDirectoryEntry& e, const Header& h, uint64_t file_size, const std::string& bitmap) {
    const uint64_t cs = h.cluster_size();
    if (uint64_t{e.table_size} * cs > kMaxBitmapBytes) corrupt(bitmap + " describes more than 512 MiB of bitmap data");
    // Bits the table can hold, times the bytes each bit covers: the disk must fit (a bitmap in
    // use may be left short by a resize; it is not read anyway).
    const uint64_t covered = (uint64_t{e.table_size} * cs * 8) << e.granularity_bits;
    if (!(e.flags & kBitmapInUse) && h.size > covered)
        corrupt(bitmap + " covers " + std::to_string(covered) + " bytes of a " + std::to_string(h.size) + "-byte disk");
    if (e.table_offset == 0 || !aligned(e.table_offset, h.cluster_bits))
        corrupt(bitmap + " has an invalid bitmap table offset " + hex(e.table_offset));
    if (!inside(e.table_offset, uint64_t{e.table_size} * 8, file_size))
        corrupt(bitmap + ": bitmap table at " + hex(e.table_offset) + " lies beyond the end of the file (" +
                std::to_string(file_size) + " bytes)");
}

}  // namespace

const BitmapsExtension* active_bitmaps(const ImageMetadata& meta) {
    if (!meta.extensions.bitmaps || !(meta.header.autoclear_features & kAutoclearBitmaps)) return nullptr;
    return &*meta.extensions.bitmaps;
}

void check_bitmap_directory_location(const BitmapsExtension& ext, uint32_t cluster_bits, uint64_t file_size) {
    const uint64_t offset = ext.bitmap_directory_offset, size = ext.bitmap_directory_size;
    if (size == 0)
        corrupt("bitmap directory is empty but the image has " + std::to_string(ext.nb_bitmaps) + " bitmaps");
    if (offset == 0 || !aligned(offset, cluster_bits)) corrupt("invalid bitmap directory offset " + hex(offset));
    if (!inside(offset, size, file_size))
        corrupt("bitmap directory at " + hex(offset) + " (" + std::to_string(size) +
                " bytes) lies beyond the end of the file (" + std::to_string(file_size) + " bytes)");
}

std::vector<BitmapDirectoryEntry> parse_bitmap_directory(std::span<const std::byte> dir, const ImageMetadata& meta,
                                                         uint64_t file_size) {
    std::vector<BitmapDirectoryEntry> out;
    const BitmapsExtension* ext = active_bitmaps(meta);
    if (!ext) return out;
    if (dir.size() != ext->bitmap_directory_size)
        corrupt("bitmap directory of " + std::to_string(dir.size()) + " bytes, header says " +
                std::to_string(ext->bitmap_directory_size));
    for (size_t at = 0; at < dir.size();) {
        const std::string where = "bitmap directory entry " + std::to_string(out.size());
        if (out.size() >= ext->nb_bitmaps)
            corrupt("bitmap directory holds more entries than the " + std::to_string(ext->nb_bitmaps) +
                    " the header announces");
        BitmapDirectoryEntry e = read_entry(dir, at, where);
        const std::string bitmap = where + " ('" + e.name + "')";
        check_fields(e, bitmap);
        check_table(e, meta.header, file_size, bitmap);
        at += entry_bytes(e);
        out.push_back(std::move(e));
    }
    if (out.size() != ext->nb_bitmaps)
        corrupt("bitmap directory holds " + std::to_string(out.size()) + " entries, the header announces " +
                std::to_string(ext->nb_bitmaps));
    return out;
}

uint64_t decode_bitmap_table_entry(uint64_t raw, uint32_t cluster_bits) {
    const uint64_t offset = raw & kTableEntryOffset;
    if (raw & kTableEntryReserved) corrupt("has reserved bits set");
    if (offset == 0) return 0;  // all zeros or all ones, no cluster
    if (raw & kTableEntryAllOnes) corrupt("has the all-ones bit set together with a data cluster");
    if (!aligned(offset, cluster_bits)) corrupt("points at a data cluster that is not cluster aligned");
    return offset;
}

uint64_t bitmap_data_bytes(uint64_t disk_size, uint32_t granularity_bits) {
    const uint64_t chunks = (disk_size >> granularity_bits) + ((disk_size & ((uint64_t{1} << granularity_bits) - 1)) != 0);
    return (chunks + 7) / 8;
}

uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits, uint32_t cluster_bits) {
    const uint64_t bytes = bitmap_data_bytes(disk_size, granularity_bits);
    return std::max<uint64_t>(1, (bytes + (uint64_t{1} << cluster_bits) - 1) >> cluster_bits);
}

std::vector<std::byte> serialize_bitmap_directory(const std::vector<BitmapDirectoryEntry>& entries) {
    std::vector<std::byte> out;
    for (const BitmapDirectoryEntry& e : entries) {
        const size_t at = out.size();
        out.resize(at + round_up8(kEntryHeaderBytes + e.extra_data.size() + e.name.size()));
        std::byte* p = out.data() + at;
        store_be64(p, e.table_offset);
        store_be32(p + 8, e.table_size);
        store_be32(p + 12, e.flags);
        p[16] = std::byte{e.type};
        p[17] = std::byte{e.granularity_bits};
        store_be16(p + 18, static_cast<uint16_t>(e.name.size()));
        store_be32(p + 20, static_cast<uint32_t>(e.extra_data.size()));
        std::copy(e.extra_data.begin(), e.extra_data.end(), p + kEntryHeaderBytes);
        std::memcpy(p + kEntryHeaderBytes + e.extra_data.size(), e.name.data(), e.name.size());
    }
    return out;
}

std::optional<uint64_t> bitmaps_extension_position(std::span<const std::byte> c0, const Header& h) {
    for (uint64_t at = h.header_length; at + 8 <= c0.size();) {
        const uint32_t type = load_be32(c0.data() + at);
        const uint32_t len = load_be32(c0.data() + at + 4);
        if (type == 0) break;
        if (type == kExtBitmaps) return at + 8;
        at += 8 + round_up8(len);
    }
    return std::nullopt;
}

std::vector<std::byte> serialize_bitmaps_extension(const BitmapsExtension& ext) {
    std::vector<std::byte> out(24);
    store_be32(out.data(), ext.nb_bitmaps);
    store_be64(out.data() + 8, ext.bitmap_directory_size);
    store_be64(out.data() + 16, ext.bitmap_directory_offset);
    return out;
}

}  // namespace qcowfs::format
