// Persistent dirty bitmaps over images made by qemu-img: the clusters they own, marking them in use
// (qemu-img info shows the flag, qemu-img check stays clean), no-ops, invalid directories, the bits
// kept in memory (DirtyMap) and their write-back at close, checked with qemu-nbd and power cuts.
#include <doctest/doctest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"
#include "qcowfs/qcow2/image.hpp"
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

/// What the first write does to the bitmaps: load them, mark the enabled consistent ones in use.
Task<void> mark_in_use(io::File& file, format::ImageMetadata meta) {
    auto bitmaps = co_await qcow2::DirtyBitmaps::load(file, meta, meta.header.size);
    co_await bitmaps->mark_in_use(file, false);
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

TEST_CASE("DirtyBitmaps::mark_in_use: qemu-img info shows in-use, qemu-img check stays clean") {
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
        run_void(io, mark_in_use(file, meta));
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
        run_void(io, mark_in_use(again, metadata_of(marked)));
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
        run_void(io, mark_in_use(file, metadata_of(image)));
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
        run_void(io, mark_in_use(file, metadata_of(image)));
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

    // Both entry points refuse the image (mark_in_use only for what it reads before the tables).
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
            CHECK(test::thrown_errno([&] { run_void(io, mark_in_use(file, m)); }, &what) == EIO);
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

// ---- The bits kept in memory, and their write-back at close --------------------------------------

TEST_CASE("DirtyMap: the chunks a range touches, pages made on demand, a shrink drops bits for good") {
    qcow2::DirtyMap m(16, 512, 10 << 20);  // 64 KiB chunks, 4096 per 512-byte page; 160 chunks
    CHECK(m.chunks() == 160);
    CHECK(m.pages().empty());
    m.set(100, 1);                   // chunk 0
    m.set(5 * 65536 - 1, 2);         // chunks 4 and 5
    m.set(10 << 20, 100);            // past the end: nothing
    m.set((10 << 20) - 1, 100);      // chunk 159, clipped at the end
    m.set(7 * 65536, 0);             // nothing
    for (uint64_t c : {0, 4, 5, 159}) CHECK(m.test(c));
    for (uint64_t c : {1, 3, 6, 7, 158}) CHECK(!m.test(c));
    CHECK(m.pages().size() == 1);
    CHECK(m.memory_bytes() == 512);

    CHECK(!m.cut_into(0));
    m.resize(5 * 65536 + 1);  // 6 chunks, the last one partial: 159 goes, 5 stays
    CHECK(m.cut() == 6);
    CHECK(m.cut_into(0));
    CHECK(!m.test(159));
    CHECK(m.test(5));
    m.resize(20 << 20);  // a grow adds clear bits, and the cut stays
    CHECK(m.chunks() == 320);
    CHECK(m.cut() == 6);
    CHECK(!m.test(159));

    // merge_into: stored bits at or past the cut are gone, new ones are added.
    std::vector<uint8_t> stored(512, 0xff);
    m.set(9 * 65536, 1);  // chunk 9
    m.merge_into(0, stored);
    CHECK(stored[0] == 0x3f);  // chunks 0-5 as stored (all set)
    CHECK(stored[1] == 0x02);  // chunk 9 only
    CHECK(std::all_of(stored.begin() + 2, stored.end(), [](uint8_t v) { return v == 0; }));

    // 512-byte chunks: a range across pages makes both, bit order LSB first.
    qcowfs::qcow2::DirtyMap fine(9, 512, 16 << 20);  // 2 MiB per page
    fine.set((2 << 20) - 512, 1024);
    CHECK(fine.pages().size() == 2);
    CHECK(fine.pages().at(0)[511] == 0x80);
    CHECK(fine.pages().at(1)[0] == 0x01);
    std::vector<uint8_t> page(512, 0);
    fine.merge_into(1, page);
    CHECK(page[0] == 0x01);
}

TEST_CASE("format: bitmap table sizes, directory round trip, the extension's place in the header") {
    CHECK(format::bitmap_data_bytes(0, 16) == 0);
    CHECK(format::bitmap_data_bytes(1, 16) == 1);
    CHECK(format::bitmap_data_bytes(uint64_t{9} << 16, 16) == 2);
    CHECK(format::bitmap_table_entries(0, 16, 16) == 1);
    CHECK(format::bitmap_table_entries(uint64_t{1} << 40, 16, 16) == 32);  // 2 MiB of bits
    CHECK(format::bitmap_table_entries((uint64_t{1} << 40) + 1, 16, 16) == 33);
    if (!have_qemu()) return;
    TempDir dir;
    const auto image = read_file(make_bitmap_image(dir));
    const auto meta = metadata_of(image);
    const auto& ext = *meta.extensions.bitmaps;
    std::span<const std::byte> dir_bytes(image.data() + ext.bitmap_directory_offset, ext.bitmap_directory_size);
    auto entries = format::parse_bitmap_directory(dir_bytes, meta, image.size());
    auto again = format::serialize_bitmap_directory(entries);
    CHECK(std::equal(again.begin(), again.end(), dir_bytes.begin(), dir_bytes.end()));
    auto at = format::bitmaps_extension_position(std::span(image).first(65536), meta.header);
    REQUIRE(at);
    auto bytes = format::serialize_bitmaps_extension(ext);
    CHECK(std::equal(bytes.begin(), bytes.end(), image.begin() + static_cast<long>(*at)));
}

namespace {

/// Dirty extents of bitmap `name` as QEMU reads them (qemu-nbd -B + nbdinfo --map), as (start, end).
std::vector<std::pair<uint64_t, uint64_t>> qemu_dirty(const std::string& img, const std::string& name) {
    std::string out;
    REQUIRE(sh("nbdinfo --map=qemu:dirty-bitmap:" + name + " -- [ qemu-nbd -r -f qcow2 -B " + name + " " + img +
                   " ]",
               &out) == 0);
    std::vector<std::pair<uint64_t, uint64_t>> runs;
    std::istringstream in(out);
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream l(line);
        uint64_t start = 0, length = 0, type = 0;
        std::string what;
        if (!(l >> start >> length >> type >> what) || what != "dirty") continue;
        if (!runs.empty() && runs.back().second == start)
            runs.back().second += length;
        else
            runs.emplace_back(start, start + length);
    }
    return runs;
}

/// The chunks of granularity 2^bits a list of ranges touches, as extents clipped at `size`.
std::vector<std::pair<uint64_t, uint64_t>> chunk_extents(std::set<uint64_t> chunks, uint32_t bits, uint64_t size) {
    std::vector<std::pair<uint64_t, uint64_t>> runs;
    for (uint64_t c : chunks) {
        const uint64_t start = c << bits, end = std::min(size, (c + 1) << bits);
        if (!runs.empty() && runs.back().second == start)
            runs.back().second = end;
        else
            runs.emplace_back(start, end);
    }
    return runs;
}

struct BitmapModel {
    uint32_t bits;
    std::set<uint64_t> chunks;
    void touch(uint64_t offset, uint64_t length) {
        for (uint64_t c = offset >> bits; c <= (offset + length - 1) >> bits; ++c) chunks.insert(c);
    }
    void shrink(uint64_t size) {
        const uint64_t keep = (size + (uint64_t{1} << bits) - 1) >> bits;
        chunks.erase(chunks.lower_bound(keep), chunks.end());
    }
};

/// The image for the write-back tests: b0 (64 KiB) and b1 (512 B: several table entries with
/// 512-byte clusters) enabled, `off` disabled; 64 KiB written by QEMU after all three were added
/// and `off` disabled, so b0 and b1 start with bits set.
std::string make_tracking_image(const TempDir& dir, const std::string& cluster_size) {
    const std::string path = dir / "track.qcow2";
    std::filesystem::remove(path);
    REQUIRE(sh("qemu-img create -q -f qcow2 -o cluster_size=" + cluster_size + " " + path + " 16M") == 0);
    REQUIRE(sh("qemu-img bitmap --add -g 64K " + path + " b0") == 0);  // the default follows the cluster size
    REQUIRE(sh("qemu-img bitmap --add -g 512 " + path + " b1") == 0);
    REQUIRE(sh("qemu-img bitmap --add " + path + " off && qemu-img bitmap --disable " + path + " off") == 0);
    REQUIRE(sh("qemu-io -f qcow2 -c 'write -P 1 0 64k' " + path) == 0);
    return path;
}

/// The writes of the write-back tests, on an open image, and the same on the models.
void tracked_writes(asio::io_context& io, qcow2::Image& image, std::vector<BitmapModel*> models) {
    const std::vector<std::byte> data(4096, std::byte{7});
    auto both = [&](uint64_t offset, uint64_t length) {
        for (auto* m : models) m->touch(offset, length);
    };
    test::run(io, image.write((3 << 20) + 100, data));
    both((3 << 20) + 100, data.size());
    test::run(io, image.write_zeroes(5 << 20, 200 << 10, true));
    both(5 << 20, 200 << 10);
    test::run(io, image.resize(20 << 20));  // grow: no bits
    test::run(io, image.write((19 << 20) + 7, data));
    both((19 << 20) + 7, data.size());
    test::run(io, image.write((17 << 20) + 512 * 1024, data));
    both((17 << 20) + 512 * 1024, data.size());
    test::run(io, image.resize(18 << 20));  // shrink: the bits past 18 MiB go
    for (auto* m : models) m->shrink(18 << 20);
    test::run(io, image.write_zeroes((8 << 20) + 1, 1, false));
    both((8 << 20) + 1, 1);
}

std::string text_of(const std::vector<std::pair<uint64_t, uint64_t>>& runs) {
    std::string out;
    for (auto [s, e] : runs) out += std::to_string(s) + "-" + std::to_string(e) + " ";
    return out;
}

bool bitmap_in_use(const std::string& info_json, const std::string& name) {
    // qemu-img info --output=json lists each bitmap's flags before its name.
    const size_t at = info_json.find("\"name\": \"" + name + "\"");
    const size_t flags = info_json.rfind("\"flags\"", at);
    return info_json.substr(flags, at - flags).find("in-use") != std::string::npos;
}

}  // namespace

TEST_CASE("write-back at close: QEMU sees exactly the written chunks, the bitmaps are consistent, check is clean") {
    if (!have_qemu() || sh("command -v nbdinfo >/dev/null && command -v qemu-nbd >/dev/null") != 0) {
        MESSAGE("qemu-img/qemu-nbd/nbdinfo not found: skipped");
        return;
    }
    TempDir dir;
    for (std::string cs : {"512", "65536"}) {
        CAPTURE(cs);
        const std::string path = make_tracking_image(dir, cs);
        BitmapModel b0{16, {0}}, b1{9, {}};
        for (uint64_t c = 0; c < 128; ++c) b1.chunks.insert(c);
        const auto off_before = qemu_dirty(path, "off");
        {
            asio::io_context io;
            qcow2::OpenOptions o;
            o.opener = [&](const std::string& p, bool w) { return io::open_file(io.get_executor(), p, w); };
            o.writable = true;
            auto image = test::run(io, qcow2::Image::open(path, o));
            tracked_writes(io, *image, {&b0, &b1});
            // While open, the bitmaps are in use on disk; the disabled one too, since the resize
            // changes its size (as QEMU does).
            std::string info;
            REQUIRE_MESSAGE(sh("qemu-img info -U --output=json " + path, &info) == 0, info);
            CHECK(bitmap_in_use(info, "b0"));
            CHECK(bitmap_in_use(info, "b1"));
            CHECK(bitmap_in_use(info, "off"));
            test::run(io, image->close());
        }
        std::string out;
        CHECK_MESSAGE(sh("qemu-img check " + path, &out) == 0, out);
        REQUIRE(sh("qemu-img info --output=json " + path, &out) == 0);
        CHECK_MESSAGE(!bitmap_in_use(out, "b0"), out);
        CHECK(!bitmap_in_use(out, "b1"));
        CHECK(!bitmap_in_use(out, "off"));
        CHECK_MESSAGE(qemu_dirty(path, "b0") == chunk_extents(b0.chunks, 16, 18 << 20),
                      text_of(qemu_dirty(path, "b0")) << " want " << text_of(chunk_extents(b0.chunks, 16, 18 << 20)));
        CHECK_MESSAGE(qemu_dirty(path, "b1") == chunk_extents(b1.chunks, 9, 18 << 20),
                      text_of(qemu_dirty(path, "b1")) << " want " << text_of(chunk_extents(b1.chunks, 9, 18 << 20)));
        CHECK(qemu_dirty(path, "off") == off_before);
        CHECK(sh("qemu-img convert --bitmaps -O qcow2 " + path + " " + dir / "copy.qcow2") == 0);  // QEMU uses them
    }
}

TEST_CASE("write-back at close: a power cut at any write or flush leaves the bitmaps in use or right, and check clean") {
    if (!have_qemu() || sh("command -v nbdinfo >/dev/null && command -v qemu-nbd >/dev/null") != 0) return;
    TempDir dir;
    const std::string path = make_tracking_image(dir, "65536");
    const auto original = read_file(path);
    BitmapModel b0{16, {0}}, b1{9, {}};
    for (uint64_t c = 0; c < 128; ++c) b1.chunks.insert(c);

    // Writes (flushed), then a close cut short after `cut_after` writes and flushes.
    auto scenario = [&](long cut_after, long* ops_seen, std::vector<BitmapModel*> models) -> std::vector<std::byte> {
        io::MemFile mem("img", original);
        test::PowerCutFile* cut = nullptr;
        asio::io_context io;
        auto image = test::run(io, qcow2::Image::open(path, test::power_cut_options(mem, cut)));
        tracked_writes(io, *image, std::move(models));
        test::run(io, image->flush());
        cut->ops = 0;
        cut->ops_left = cut_after;
        return test::after_power_cut(mem, *cut, ops_seen, [&] { test::run(io, image->close()); });
    };
    long total = 0;
    scenario(-1, &total, {&b0, &b1});
    REQUIRE(total > 5);
    for (long k = 0; k <= total; ++k) {
        CAPTURE(k);
        write_file(dir / "cut.qcow2", scenario(k, nullptr, {}));
        std::string out;
        int rc = sh("qemu-img check " + (dir / "cut.qcow2"), &out);
        CHECK_MESSAGE((rc == 0 || rc == 3), out);  // leaks at most
        REQUIRE(sh("qemu-img info --output=json " + (dir / "cut.qcow2"), &out) == 0);
        const bool in_use = bitmap_in_use(out, "b0");
        CHECK(in_use == bitmap_in_use(out, "b1"));  // one header write switches them all
        CHECK(in_use == bitmap_in_use(out, "off"));
        if (!in_use) {
            CHECK(qemu_dirty(dir / "cut.qcow2", "b0") == chunk_extents(b0.chunks, 16, 18 << 20));
            CHECK(qemu_dirty(dir / "cut.qcow2", "b1") == chunk_extents(b1.chunks, 9, 18 << 20));
        }
        if (k == total) CHECK(!in_use);
    }
    MESSAGE("power cut checked at " << total + 1 << " points of the close");
}
