// Persistent dirty bitmaps over images made by qemu-img: the clusters they own, marking them in use
// (qemu-img info shows the flag, qemu-img check stays clean), no-ops, and invalid directories.
#include <doctest/doctest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"
#include "test_errors.hpp"
#include "test_host_files.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using namespace qcowfs::test::host;

namespace {






size_t count_of(const std::string& text, const std::string& word) {
    size_t n = 0;
    for (size_t at = text.find(word); at != std::string::npos; at = text.find(word, at + 1)) ++n;
    return n;
}

format::ImageMetadata metadata_of(const std::vector<std::byte>& bytes) {
    auto h = format::parse_header(bytes, bytes.size());
    return format::parse_metadata(std::span(bytes).first(std::min<uint64_t>(h.cluster_size(), bytes.size())),
                                  bytes.size());
}

/// Counts the writes and flushes that reach a file.
class CountingFile final : public io::File {
public:
    explicit CountingFile(io::File& inner) : inner_(inner) {}
    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        co_return co_await inner_.read_at(offset, buf);
    }
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        ++writes;
        co_await inner_.write_at(offset, buf);
    }
    Task<void> flush() override {
        ++flushes;
        co_await inner_.flush();
    }
    uint64_t size() override { return inner_.size(); }
    const std::string& name() const override { return inner_.name(); }
    int writes = 0, flushes = 0;

private:
    io::File& inner_;
};

void run_void(asio::io_context& io, Task<void> task) {
    test::run(io, [](Task<void> t) -> Task<int> {
        co_await std::move(t);
        co_return 0;
    }(std::move(task)));
}

std::vector<uint64_t> clusters_of(io::File& file, const format::ImageMetadata& meta) {
    asio::io_context io;
    return test::run(io, qcow2::bitmap_clusters(file, meta));
}

/// An image with two bitmaps that hold data: b0 (64 KiB granularity), b1 (512 B granularity, so
/// its table has several entries), both written to after they were added.
std::string make_bitmap_image(const TempDir& dir, const std::string& cluster_size = "65536") {
    const std::string path = dir / "bitmaps.qcow2";
    std::filesystem::remove(path);
    std::string cmd = "qemu-img create -q -f qcow2 -o cluster_size=";
    cmd.append(cluster_size).append(" ").append(path).append(" 64M");
    REQUIRE(sh(cmd) == 0);
    REQUIRE(sh("qemu-img bitmap --add " + path + " b0") == 0);
    REQUIRE(sh("qemu-img bitmap --add -g 512 " + path + " b1") == 0);
    REQUIRE(sh("qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 40M 64k' " + path) == 0);
    return path;
}

}  // namespace

TEST_CASE("mark_bitmaps_in_use: qemu-img info shows in-use, qemu-img check stays clean") {
    if (!have_qemu()) {
        MESSAGE("qemu-img/qemu-io not found: skipped");
        return;
    }
    TempDir dir;
    for (std::string cs : {"512", "65536"}) {
        CAPTURE(cs);
        const std::string path = make_bitmap_image(dir, cs);
        std::string info;
        REQUIRE(sh("qemu-img info --output=json " + path, &info) == 0);
        REQUIRE(count_of(info, "\"in-use\"") == 0);
        REQUIRE(count_of(info, "\"auto\"") == 2);

        const auto image = read_file(path);
        const auto meta = metadata_of(image);
        REQUIRE(meta.extensions.bitmaps);
        io::MemFile mem("img", image);
        CountingFile file(mem);
        asio::io_context io;
        run_void(io, qcow2::mark_bitmaps_in_use(file, meta));
        CHECK(file.writes == 1);  // the directory, rewritten in place
        CHECK(file.flushes == 1);
        auto marked = mem.content();
        CHECK(marked.size() == image.size());
        // Only the flags words changed, one bit each.
        size_t differing = 0;
        for (size_t i = 0; i < image.size(); ++i) differing += image[i] != marked[i];
        CHECK(differing == 2);

        write_file(path, marked);
        REQUIRE(sh("qemu-img info --output=json " + path, &info) == 0);
        CHECK_MESSAGE(count_of(info, "\"in-use\"") == 2, info);
        CHECK(count_of(info, "\"auto\"") == 2);
        std::string out;
        CHECK_MESSAGE(sh("qemu-img check " + path, &out) == 0, out);  // in-use bitmaps are not an error
        CHECK(out.find("No errors were found") != std::string::npos);
        // QEMU refuses to use them, as intended: copying them needs --skip-broken-bitmaps.
        CHECK(sh("qemu-img convert --bitmaps -O qcow2 " + path + " " + dir / "copy.qcow2") != 0);

        // Marking again writes nothing.
        io::MemFile again_mem("img", marked);
        CountingFile again(again_mem);
        run_void(io, qcow2::mark_bitmaps_in_use(again, metadata_of(marked)));
        CHECK(again.writes == 0);
        CHECK(again.flushes == 0);
        CHECK(again_mem.content() == marked);
    }
}

TEST_CASE("bitmap_clusters lists the directory, the tables and the data clusters once each") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = make_bitmap_image(dir);
    const auto image = read_file(path);
    const auto meta = metadata_of(image);
    io::MemFile file("img", image);
    auto clusters = clusters_of(file, meta);

    // From the directory by hand: directory cluster, two one-cluster tables, their data clusters.
    const auto& ext = *meta.extensions.bitmaps;
    std::vector<std::byte> dir_bytes(image.begin() + static_cast<long>(ext.bitmap_directory_offset),
                                     image.begin() + static_cast<long>(ext.bitmap_directory_offset + ext.bitmap_directory_size));
    auto entries = format::parse_bitmap_directory(dir_bytes, meta, image.size());
    REQUIRE(entries.size() == 2);
    CHECK(entries[0].name == "b0");
    CHECK(entries[1].name == "b1");
    CHECK(entries[0].granularity_bits == 16);
    CHECK(entries[1].granularity_bits == 9);
    CHECK(entries[0].flags == format::kBitmapAuto);
    std::multiset<uint64_t> expected{ext.bitmap_directory_offset};
    uint64_t data_clusters = 0;
    for (const auto& e : entries) {
        expected.insert(e.table_offset);  // 64 KiB clusters: every table fits in one
        for (uint32_t i = 0; i < e.table_size; ++i) {
            uint64_t entry = format::load_be64(image.data() + e.table_offset + 8 * i);
            if (entry & 0x00fffffffffffe00ULL) {
                expected.insert(entry & 0x00fffffffffffe00ULL);
                ++data_clusters;
            }
        }
    }
    CHECK(data_clusters >= 2);  // both bitmaps have set bits
    CHECK(std::multiset<uint64_t>(clusters.begin(), clusters.end()) == expected);
    for (uint64_t c : clusters) CHECK(c % 65536 == 0);
}

TEST_CASE("without bitmaps, or with the autoclear bit clear, nothing is listed or written") {
    if (!have_qemu()) return;
    TempDir dir;
    SUBCASE("no bitmaps extension") {
        const std::string path = dir / "plain.qcow2";
        REQUIRE(sh("qemu-img create -q -f qcow2 " + path + " 16M") == 0);
        auto image = read_file(path);
        io::MemFile mem("img", image);
        CountingFile file(mem);
        asio::io_context io;
        run_void(io, qcow2::mark_bitmaps_in_use(file, metadata_of(image)));
        CHECK(file.writes + file.flushes == 0);
        CHECK(clusters_of(file, metadata_of(image)).empty());
    }
    SUBCASE("autoclear bitmaps bit clear: QEMU ignores the extension") {
        auto image = read_file(make_bitmap_image(dir));
        auto meta = metadata_of(image);
        meta.header.autoclear_features &= ~format::kAutoclearBitmaps;
        auto cluster0 = format::serialize_metadata(meta);
        std::copy(cluster0.begin(), cluster0.end(), image.begin());
        REQUIRE(metadata_of(image).extensions.bitmaps);  // still there, but not in force
        io::MemFile mem("img", image);
        CountingFile file(mem);
        asio::io_context io;
        run_void(io, qcow2::mark_bitmaps_in_use(file, metadata_of(image)));
        CHECK(file.writes + file.flushes == 0);
        CHECK(clusters_of(file, metadata_of(image)).empty());
    }
}

TEST_CASE("an invalid bitmap directory or table is EIO and nothing is written") {
    if (!have_qemu()) return;
    TempDir dir;
    const auto image = read_file(make_bitmap_image(dir));
    const auto meta = metadata_of(image);
    const auto ext = *meta.extensions.bitmaps;
    const uint64_t d = ext.bitmap_directory_offset;
    const uint64_t table0 = format::load_be64(image.data() + d);

    // Both entry points refuse the image (mark_bitmaps_in_use does not read the tables).
    auto expect_eio = [&](const std::vector<std::byte>& bytes, const std::string& words, bool tables_only = false) {
        CAPTURE(words);
        auto m = metadata_of(bytes);
        io::MemFile mem("img", bytes);
        CountingFile file(mem);
        asio::io_context io;
        std::string what;
        CHECK(test::thrown_errno([&] { clusters_of(file, m); }, &what) == EIO);
        CHECK_MESSAGE(what.find(words) != std::string::npos, what);
        if (!tables_only) {
            CHECK(test::thrown_errno([&] { run_void(io, qcow2::mark_bitmaps_in_use(file, m)); }, &what) == EIO);
            CHECK_MESSAGE(what.find(words) != std::string::npos, what);
        }
        CHECK(file.writes + file.flushes == 0);
        CHECK(mem.content() == bytes);
    };
    auto with_header = [&](auto change) {
        auto bytes = image;
        auto m = metadata_of(bytes);
        change(*m.extensions.bitmaps);
        auto cluster0 = format::serialize_metadata(m);
        std::copy(cluster0.begin(), cluster0.end(), bytes.begin());
        return bytes;
    };
    auto with_be32 = [&](uint64_t offset, uint32_t v) {
        auto bytes = image;
        format::store_be32(bytes.data() + offset, v);
        return bytes;
    };

    SUBCASE("unknown flags") { expect_eio(with_be32(d + 12, 0x10 | format::kBitmapAuto), "unknown flags"); }
    SUBCASE("unknown type") {
        auto bytes = image;
        bytes[d + 16] = std::byte{2};
        expect_eio(bytes, "unknown type");
    }
    SUBCASE("granularity below 512 bytes") {
        auto bytes = image;
        bytes[d + 17] = std::byte{8};
        expect_eio(bytes, "granularity");
    }
    SUBCASE("empty name") {
        auto bytes = image;
        format::store_be16(bytes.data() + d + 18, 0);
        expect_eio(bytes, "name of 0 bytes");
    }
    SUBCASE("bitmap table not cluster aligned") {
        auto bytes = image;
        format::store_be64(bytes.data() + d, table0 + 512);
        expect_eio(bytes, "invalid bitmap table offset");
    }
    SUBCASE("bitmap table beyond the end of the file") {
        auto bytes = image;
        format::store_be64(bytes.data() + d, (image.size() + (1 << 20)) / 65536 * 65536);
        expect_eio(bytes, "beyond the end");
    }
    SUBCASE("bitmap table of zero entries") {
        expect_eio(with_be32(d + 8, 0), "bitmap table of 0 entries");
    }
    SUBCASE("more bitmaps announced than the directory holds") {
        expect_eio(with_header([](format::BitmapsExtension& b) { b.nb_bitmaps = 3; }), "holds 2 entries");
    }
    SUBCASE("fewer bitmaps announced than the directory holds") {
        expect_eio(with_header([](format::BitmapsExtension& b) { b.nb_bitmaps = 1; }), "more entries");
    }
    SUBCASE("directory cut short") {
        expect_eio(with_header([](format::BitmapsExtension& b) { b.bitmap_directory_size -= 8; }), "cut off");
    }
    SUBCASE("directory beyond the end of the file") {
        expect_eio(with_header([&](format::BitmapsExtension& b) { b.bitmap_directory_offset = image.size() / 65536 * 65536 + 65536; }),
                   "beyond the end");
    }
    SUBCASE("bitmap table entry with reserved bits") {
        auto bytes = image;
        format::store_be64(bytes.data() + table0, format::load_be64(bytes.data() + table0) | 0x2);
        expect_eio(bytes, "reserved bits", true);
    }
    SUBCASE("bitmap data cluster beyond the end of the file") {
        auto bytes = image;
        format::store_be64(bytes.data() + table0, (image.size() / 65536 + 4) * 65536);
        expect_eio(bytes, "beyond the end", true);
    }
}
