// Unit tests for the bitmap directory parser and bitmap table entries, over hand-built bytes.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include "test_errors.hpp"
#include "qcowfs/format/bitmaps.hpp"
#include "qcowfs/format/error.hpp"

using namespace qcowfs;
using namespace qcowfs::format;

using qcowfs::test::thrown_errno;

namespace {

constexpr uint64_t kFileSize = 0x100000;

struct Bitmap {
    uint64_t table_offset = 0x50000;
    uint32_t table_size = 1;
    uint32_t flags = kBitmapAuto;
    uint8_t granularity_bits = 16;
    std::string name = "b0";
    uint32_t extra = 0;
};

/// A directory of `bitmaps`, each entry padded to 8 bytes.
std::vector<std::byte> directory_of(const std::vector<Bitmap>& bitmaps) {
    std::vector<std::byte> dir;
    for (const Bitmap& b : bitmaps) {
        size_t at = dir.size();
        dir.resize(at + ((24 + b.extra + b.name.size() + 7) & ~size_t{7}));
        std::byte* p = dir.data() + at;
        store_be64(p, b.table_offset);
        store_be32(p + 8, b.table_size);
        store_be32(p + 12, b.flags);
        p[16] = std::byte{kBitmapTypeDirty};
        p[17] = std::byte{b.granularity_bits};
        store_be16(p + 18, static_cast<uint16_t>(b.name.size()));
        store_be32(p + 20, b.extra);
        std::memcpy(p + 24 + b.extra, b.name.data(), b.name.size());
    }
    return dir;
}

/// Metadata of a 1 GiB disk with 64 KiB clusters whose bitmaps extension matches `dir`.
ImageMetadata metadata_for(const std::vector<std::byte>& dir, uint32_t nb_bitmaps, bool autoclear = true) {
    ImageMetadata m;
    m.header.cluster_bits = 16;
    m.header.size = uint64_t{1} << 30;
    if (autoclear) m.header.autoclear_features = kAutoclearBitmaps;
    m.extensions.bitmaps = BitmapsExtension{nb_bitmaps, dir.size(), 0x40000};
    return m;
}

std::string parse_error(const std::vector<std::byte>& dir, const ImageMetadata& m) {
    std::string what;
    CHECK(thrown_errno([&] { parse_bitmap_directory(dir, m, kFileSize); }, &what) == EIO);
    return what;
}

}  // namespace

TEST_CASE("bitmap directory: entries as laid out, only when the extension is in force") {
    Bitmap b1;
    b1.table_offset = 0x60000;
    b1.name = "second";
    b1.extra = 4;
    b1.flags = kBitmapInUse;
    std::vector<std::byte> dir = directory_of({Bitmap{}, b1});
    auto entries = parse_bitmap_directory(dir, metadata_for(dir, 2), kFileSize);
    REQUIRE(entries.size() == 2);
    CHECK(entries[0].name == "b0");
    CHECK(entries[0].table_offset == 0x50000);
    CHECK(entries[0].flags == kBitmapAuto);
    CHECK(entries[0].granularity_bits == 16);
    CHECK(entries[0].position == 0);
    CHECK(entries[1].position == 32);
    CHECK(entries[1].name == "second");
    CHECK(entries[1].extra_data_size == 4);

    ImageMetadata off = metadata_for(dir, 2, false);
    CHECK(active_bitmaps(off) == nullptr);
    CHECK(parse_bitmap_directory({}, off, kFileSize).empty());  // QEMU ignores the extension
    CHECK(active_bitmaps(metadata_for(dir, 2)) != nullptr);
}

TEST_CASE("bitmap directory: hostile entries are EIO naming the problem") {
    auto error_of = [](Bitmap b) {
        std::vector<std::byte> dir = directory_of({b});
        return parse_error(dir, metadata_for(dir, 1));
    };
    Bitmap b;
    b.flags = 0x10;
    CHECK(error_of(b).find("unknown flags") != std::string::npos);
    b = Bitmap{};
    b.flags = 0x4;  // extra_data_compatible: known
    CHECK(parse_bitmap_directory(directory_of({b}), metadata_for(directory_of({b}), 1), kFileSize).size() == 1);
    b = Bitmap{};
    b.granularity_bits = 8;
    CHECK(error_of(b).find("granularity") != std::string::npos);
    b = Bitmap{};
    b.name = "";
    CHECK(error_of(b).find("name of 0 bytes") != std::string::npos);
    b = Bitmap{};
    b.table_offset = 0x50200;
    CHECK(error_of(b).find("invalid bitmap table offset") != std::string::npos);
    b = Bitmap{};
    b.table_offset = kFileSize;
    CHECK(error_of(b).find("beyond the end") != std::string::npos);
    b = Bitmap{};
    b.table_size = 0;
    CHECK(error_of(b).find("bitmap table of 0 entries") != std::string::npos);
    b = Bitmap{};
    b.granularity_bits = 9;  // one 64 KiB table cluster of 512-byte bits covers 256 MiB of a 1 GiB disk
    CHECK(error_of(b).find("covers") != std::string::npos);
    b.flags = kBitmapInUse;  // ... which a bitmap in use may
    CHECK(parse_bitmap_directory(directory_of({b}), metadata_for(directory_of({b}), 1), kFileSize).size() == 1);
}

TEST_CASE("bitmap directory: entry count and size must match the extension") {
    std::vector<std::byte> dir = directory_of({Bitmap{}, Bitmap{}});
    CHECK(parse_error(dir, metadata_for(dir, 3)).find("holds 2 entries") != std::string::npos);
    CHECK(parse_error(dir, metadata_for(dir, 1)).find("more entries") != std::string::npos);
    ImageMetadata m = metadata_for(dir, 2);
    std::vector<std::byte> cut(dir.begin(), dir.end() - 8);
    CHECK(parse_error(cut, m).find("header says") != std::string::npos);
    m.extensions.bitmaps->bitmap_directory_size = cut.size();
    CHECK(parse_error(cut, m).find("cut off") != std::string::npos);
}

TEST_CASE("bitmap directory location: inside the file, aligned, not empty") {
    BitmapsExtension ext{1, 32, 0x40000};
    CHECK(thrown_errno([&] { check_bitmap_directory_location(ext, 16, kFileSize); }) == 0);
    std::string what;
    ext.bitmap_directory_offset = 0x40200;
    CHECK(thrown_errno([&] { check_bitmap_directory_location(ext, 16, kFileSize); }, &what) == EIO);
    CHECK(what.find("invalid bitmap directory offset") != std::string::npos);
    ext.bitmap_directory_offset = kFileSize;
    CHECK(thrown_errno([&] { check_bitmap_directory_location(ext, 16, kFileSize); }, &what) == EIO);
    CHECK(what.find("beyond the end") != std::string::npos);
    ext = BitmapsExtension{1, 0, 0x40000};
    CHECK(thrown_errno([&] { check_bitmap_directory_location(ext, 16, kFileSize); }, &what) == EIO);
    CHECK(what.find("empty") != std::string::npos);
}

TEST_CASE("bitmap table entries: a data cluster, none, or EIO") {
    CHECK(decode_bitmap_table_entry(0, 16) == 0);
    CHECK(decode_bitmap_table_entry(1, 16) == 0);  // all ones, no cluster
    CHECK(decode_bitmap_table_entry(0x70000, 16) == 0x70000);
    std::string what;
    CHECK(thrown_errno([&] { decode_bitmap_table_entry(0x70002, 16); }, &what) == EIO);
    CHECK(what.find("reserved bits") != std::string::npos);
    CHECK(thrown_errno([&] { decode_bitmap_table_entry(0x70001, 16); }, &what) == EIO);
    CHECK(what.find("all-ones") != std::string::npos);
    CHECK(thrown_errno([&] { decode_bitmap_table_entry(0x70200, 16); }, &what) == EIO);
    CHECK(what.find("not cluster aligned") != std::string::npos);
}
