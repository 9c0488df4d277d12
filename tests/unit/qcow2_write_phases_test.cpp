// The write path's phases over in-memory images: what the plan decides per kind of cluster, what
// copy-on-write keeps around the new bytes, and when the new L2 entry is linked.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "test_errors.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using test::ImageBuilder;
using test::MemFiles;

namespace {

/// An image built in memory and opened writable. The builder keeps no refcounts, so the image
/// gets the dirty bit: the first write rebuilds them, as after a crash with lazy_refcounts.
struct WriteFixture {
    ImageBuilder b;
    MemFiles files;
    asio::io_context io;
    std::shared_ptr<qcow2::Image> image;

    WriteFixture() { b.start(); }

    void open() {
        std::vector<std::byte> bytes = b.finish();
        bytes[79] |= std::byte{1};  // incompatible features: dirty
        files.files["img"] = std::move(bytes);
        qcow2::OpenOptions o;
        o.opener = files.opener();
        o.writable = true;
        image = test::run(io, qcow2::Image::open("img", o));
    }
    io::MemFile& file() { return *files.opened.at("img"); }
    std::vector<std::byte> content() { return file().content(); }

    void write(uint64_t offset, const std::vector<std::byte>& data) { test::run(io, image->write(offset, data)); }
    void flush() { test::run(io, image->flush()); }
    std::vector<std::byte> read(qcow2::BlockSource& view, uint64_t offset, size_t n) {
        std::vector<std::byte> buf(n);
        test::run(io, [&]() -> Task<int> {
            co_await view.read(offset, buf);
            co_return 0;
        }());
        return buf;
    }
    std::vector<std::byte> read(uint64_t offset, size_t n) { return read(*image->active(), offset, n); }

    /// The active L2 entry of `guest` in the file as it is now: (raw, bitmap).
    std::pair<uint64_t, uint64_t> entry_on_file(uint64_t guest) {
        auto bytes = content();
        auto g = b.geometry();
        uint64_t l1 = image->header().l1_table_offset + 8 * g.l1_index(GuestOffset{guest});
        uint64_t l2 = format::load_be64(bytes.data() + l1) & format::kL1OffsetMask;
        if (l2 == 0) return {0, 0};
        const std::byte* p = bytes.data() + l2 + g.l2_index(GuestOffset{guest}) * g.l2_entry_size();
        return {format::load_be64(p), g.extended_l2 ? format::load_be64(p + 8) : 0};
    }
    uint64_t host_on_file(uint64_t guest) { return entry_on_file(guest).first & format::kL2OffsetMask; }
    /// The refcount of the host cluster holding byte `host`, in the file as it is now.
    uint64_t refcount_on_file(uint64_t host) {
        auto bytes = content();
        const auto& h = image->header();
        const uint64_t entries = format::refcount_block_entries(h.cluster_bits, h.refcount_order);
        const uint64_t c = host >> h.cluster_bits;
        uint64_t block = format::load_be64(bytes.data() + h.refcount_table_offset + 8 * (c / entries));
        if (block == 0) return 0;
        return format::get_refcount(std::span<const std::byte>(bytes).subspan(block, h.cluster_size()), h.refcount_order,
                                    c % entries);
    }
};

std::vector<std::byte> pattern(size_t n, uint8_t seed) {
    std::vector<std::byte> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(seed + i * 13 + (i >> 7)));
    return v;
}

bool all_equal(std::span<const std::byte> s, uint8_t value) {
    return std::all_of(s.begin(), s.end(), [&](std::byte x) { return x == std::byte{value}; });
}

constexpr uint64_t kCluster = 4096;  // the builder's default

}  // namespace

TEST_CASE("plan: a write into an unallocated cluster gets a new cluster, zeros around the bytes") {
    WriteFixture f;
    uint64_t kept = f.b.data(0, 0x11);
    f.open();
    f.write(kCluster + 1000, pattern(100, 3));
    f.flush();
    auto [raw, bitmap] = f.entry_on_file(kCluster);
    uint64_t host = raw & format::kL2OffsetMask;
    CHECK((raw & format::kOflagCopied) != 0);
    CHECK(host != 0);
    CHECK(host != kept);
    CHECK(f.refcount_on_file(host) == 1);
    auto bytes = f.content();
    std::span<const std::byte> cluster(bytes.data() + host, kCluster);
    CHECK(all_equal(cluster.first(1000), 0));
    CHECK(std::equal(cluster.begin() + 1000, cluster.begin() + 1100, pattern(100, 3).begin()));
    CHECK(all_equal(cluster.subspan(1100), 0));
    CHECK(f.host_on_file(0) == kept);  // the neighbour is untouched
    CHECK(all_equal(f.read(0, kCluster), 0x11));
}

TEST_CASE("plan: a write into a zero cluster gets a new cluster; the zero flag goes") {
    WriteFixture f;
    f.b.data(0, 0x11);
    f.b.zero(kCluster);
    f.open();
    f.write(kCluster + 10, pattern(20, 5));
    f.flush();
    auto [raw, bitmap] = f.entry_on_file(kCluster);
    CHECK((raw & format::kOflagZero) == 0);
    CHECK((raw & format::kOflagCopied) != 0);
    auto got = f.read(kCluster, kCluster);
    CHECK(all_equal(std::span(got).first(10), 0));
    CHECK(std::equal(got.begin() + 10, got.begin() + 30, pattern(20, 5).begin()));
    CHECK(all_equal(std::span(got).subspan(30), 0));
}

TEST_CASE("plan: a write into a compressed cluster copies the decompressed content and frees the old clusters") {
    WriteFixture f;
    f.b.data(0, 0x11);
    auto old = pattern(kCluster, 9);
    f.b.entry_offset(kCluster);  // the L2 table first: the compressed bytes go after it
    const uint64_t compressed_host = f.b.next_free;  // the builder packs them 100 bytes into it
    f.b.compressed(kCluster, old);
    f.open();
    f.write(kCluster + 100, pattern(50, 1));
    auto want = old;
    std::memcpy(want.data() + 100, pattern(50, 1).data(), 50);
    CHECK(f.read(kCluster, kCluster) == want);
    test::run(f.io, f.image->close());  // two flushes: the release reaches the refcounts on disk
    uint64_t host = f.host_on_file(kCluster);
    CHECK(host != 0);
    CHECK((f.entry_on_file(kCluster).first & format::kOflagCompressed) == 0);
    CHECK(f.refcount_on_file(host) == 1);
    CHECK(f.refcount_on_file(compressed_host) == 0);
}

TEST_CASE("plan: a write over a backing file copies the backing bytes around it") {
    WriteFixture f;
    ImageBuilder base;
    base.start();
    base.data(kCluster, 0x5a);
    f.files.files["base"] = base.finish();
    f.b.backing_file = "base";
    f.b.backing_format = "qcow2";
    f.b.data(0, 0x11);
    f.open();
    f.write(kCluster + 100, pattern(10, 7));
    f.flush();
    CHECK(f.host_on_file(kCluster) != 0);
    auto got = f.read(kCluster, kCluster);
    CHECK(all_equal(std::span(got).first(100), 0x5a));
    CHECK(std::equal(got.begin() + 100, got.begin() + 110, pattern(10, 7).begin()));
    CHECK(all_equal(std::span(got).subspan(110), 0x5a));
    // The host cluster holds the whole cluster: the backing bytes were copied, not referenced.
    auto bytes = f.content();
    CHECK(all_equal(std::span<const std::byte>(bytes).subspan(f.host_on_file(kCluster), 100), 0x5a));
}

TEST_CASE("plan: a cluster the image owns is written in place, only the bytes written") {
    WriteFixture f;
    uint64_t host = f.b.data(kCluster, 0x22);
    f.open();
    f.write(0, pattern(8, 1));  // the first write rebuilds refcounts (dirty image)
    f.flush();
    const uint64_t size_before = f.file().size();
    f.write(kCluster + 5, pattern(10, 2));
    // Nothing allocated, the entry unchanged, the new bytes already in the cluster.
    CHECK(f.file().size() == size_before);
    CHECK(f.host_on_file(kCluster) == host);
    auto bytes = f.content();
    CHECK(all_equal(std::span<const std::byte>(bytes).subspan(host, 5), 0x22));
    CHECK(std::equal(bytes.begin() + host + 5, bytes.begin() + host + 15, pattern(10, 2).begin()));
    CHECK(all_equal(std::span<const std::byte>(bytes).subspan(host + 15, kCluster - 15), 0x22));
}

TEST_CASE("link: the data reaches the file first; the L2 entry only with the flush") {
    WriteFixture f;
    f.b.data(0, 0x11);
    f.open();
    f.write(2 * kCluster, pattern(kCluster, 4));
    // The L2 entry on the file still says unallocated: the new one waits in the cache.
    CHECK(f.entry_on_file(2 * kCluster).first == 0);
    CHECK(f.read(2 * kCluster, kCluster) == pattern(kCluster, 4));
    f.flush();
    uint64_t host = f.host_on_file(2 * kCluster);
    REQUIRE(host != 0);
    auto bytes = f.content();
    CHECK(std::equal(bytes.begin() + host, bytes.begin() + host + kCluster, pattern(kCluster, 4).begin()));
}

TEST_CASE("link: a power cut before the flush leaves the old mapping") {
    WriteFixture f;
    f.b.data(0, 0x11);
    f.open();
    f.write(0, pattern(8, 1));  // the first write rebuilds the refcounts (flushed)
    f.flush();
    f.write(2 * kCluster, pattern(kCluster, 4));
    f.file().crash();  // forgets everything since the flush
    CHECK(f.entry_on_file(2 * kCluster).first == 0);
}

TEST_CASE("copy and write: a failed data write links nothing and gives the new cluster back") {
    // Two runs of the same writes; in the second the data write of the middle one fails.
    auto scenario = [](bool fail, uint64_t* host_of_last) {
        WriteFixture f;
        f.b.data(0, 0x11);
        f.open();
        f.write(kCluster, pattern(kCluster, 1));  // prepares the image, caches the L2 and refcount slices
        f.flush();
        if (fail) {
            f.file().inject_failure(EIO, 1);
            CHECK(test::thrown_errno([&] { f.write(2 * kCluster, pattern(kCluster, 2)); }) == EIO);
            CHECK(all_equal(f.read(2 * kCluster, kCluster), 0));  // still unallocated
            CHECK(f.image->read_only_reason().empty());          // an I/O error is not corruption
        }
        f.write(3 * kCluster, pattern(kCluster, 3));
        f.flush();
        CHECK(f.entry_on_file(2 * kCluster).first == 0);
        *host_of_last = f.host_on_file(3 * kCluster);
    };
    uint64_t without = 0, with = 0;
    scenario(false, &without);
    scenario(true, &with);
    // The cluster the failed write had was released: the next write gets what it would have had.
    CHECK(with == without);
    CHECK(with != 0);
}

TEST_CASE("a new L2 table takes its space when allocated; without space the write fails and gives it back") {
    // A second L2 table's range (4 KiB clusters: 2 MiB per table). Two runs; in the second the
    // space for the new table cannot be had.
    constexpr uint64_t kSecond = 4 << 20;
    auto scenario = [](bool fail, uint64_t* table) {
        WriteFixture f;
        f.b.size = 8 << 20;
        f.b.start();
        f.open();
        f.write(0, pattern(kCluster, 1));  // prepares the image, caches the refcount slices
        f.flush();
        if (fail) {
            f.file().inject_failure(ENOSPC, 1);  // the first file operation: reserving the table
            CHECK(test::thrown_errno([&] { f.write(kSecond, pattern(kCluster, 2)); }) == ENOSPC);
            CHECK(all_equal(f.read(kSecond, kCluster), 0));
            CHECK(f.image->read_only_reason().empty());  // no space is not corruption
        }
        f.write(kSecond, pattern(kCluster, 3));
        const auto allocated = f.file().allocations();  // before the flush writes the table
        f.flush();
        CHECK(f.read(kSecond, kCluster) == pattern(kCluster, 3));
        auto bytes = f.content();
        const uint64_t l1 = f.image->header().l1_table_offset + 8 * f.b.geometry().l1_index(GuestOffset{kSecond});
        *table = format::load_be64(bytes.data() + l1) & format::kL1OffsetMask;
        CHECK(*table != 0);
        CHECK(f.refcount_on_file(*table) == 1);
        CHECK(std::find(allocated.begin(), allocated.end(), std::pair<uint64_t, uint64_t>{*table, kCluster}) !=
              allocated.end());
    };
    uint64_t without = 0, with = 0;
    scenario(false, &without);
    scenario(true, &with);
    CHECK(with == without);  // the failed write's table cluster was given back
}

TEST_CASE("plan: a cluster shared with a snapshot is copied; the snapshot keeps the old data") {
    WriteFixture f;
    uint64_t shared = f.b.data(0, 0x11);
    f.b.snapshot("1", "before", f.b.size);
    // The active L1 and L2 entries lose COPIED: their clusters are shared (the rebuild counts 2).
    for (auto [index, l2] : f.b.l2_tables) {
        f.b.put64(f.b.l1_offset + 8 * index, format::encode_l1({l2, false}));
        for (uint64_t e = 0; e < f.b.cluster() / 8; ++e)
            f.b.put64(l2 + 8 * e, format::load_be64(f.b.file.data() + l2 + 8 * e) & ~format::kOflagCopied);
    }
    const uint64_t old_l2 = f.b.l2_tables.at(0);
    f.open();
    f.write(5, pattern(10, 6));
    test::run(f.io, f.image->close());
    uint64_t host = f.host_on_file(0);
    CHECK(host != shared);
    auto bytes = f.content();
    CHECK((format::load_be64(bytes.data() + f.image->header().l1_table_offset) & format::kL1OffsetMask) != old_l2);
    CHECK(f.refcount_on_file(shared) == 1);  // the snapshot's alone now
    CHECK(f.refcount_on_file(host) == 1);
    auto snap = test::run(f.io, f.image->snapshot("1"));
    CHECK(all_equal(f.read(*snap, 0, kCluster), 0x11));
    auto got = f.read(0, kCluster);
    CHECK(all_equal(std::span(got).first(5), 0x11));
    CHECK(std::equal(got.begin() + 5, got.begin() + 15, pattern(10, 6).begin()));
    CHECK(all_equal(std::span(got).subspan(15), 0x11));
}

TEST_CASE("plan, extended L2: only the touched subclusters are allocated, later ones in place") {
    WriteFixture f;
    f.b.extended_l2 = true;
    f.b.cluster_bits = 14;  // the smallest clusters with subclusters: 512-byte subclusters
    f.b.start();
    const uint64_t cs = f.b.cluster();
    f.b.data(0, 0x11);
    f.open();
    f.write(cs + 600, pattern(10, 8));  // subcluster 1: [512, 1024)
    f.flush();
    auto [raw, bitmap] = f.entry_on_file(cs);
    const uint64_t host = raw & format::kL2OffsetMask;
    REQUIRE(host != 0);
    CHECK(bitmap == (uint64_t{1} << 1));
    f.write(cs + 3000, pattern(10, 9));  // subcluster 5, in place
    f.flush();
    auto [raw2, bitmap2] = f.entry_on_file(cs);
    CHECK((raw2 & format::kL2OffsetMask) == host);
    CHECK(bitmap2 == ((uint64_t{1} << 1) | (uint64_t{1} << 5)));
    auto got = f.read(cs, cs);
    CHECK(all_equal(std::span(got).first(600), 0));
    CHECK(std::equal(got.begin() + 600, got.begin() + 610, pattern(10, 8).begin()));
    CHECK(all_equal(std::span(got).subspan(610, 3000 - 610), 0));
    CHECK(std::equal(got.begin() + 3000, got.begin() + 3010, pattern(10, 9).begin()));
    CHECK(all_equal(std::span(got).subspan(3010), 0));
}

TEST_CASE("plan, extended L2: a zero subcluster written in place loses its zero bit, the others keep theirs") {
    WriteFixture f;
    f.b.extended_l2 = true;
    f.b.cluster_bits = 14;
    f.b.start();
    const uint64_t cs = f.b.cluster();
    // Subcluster 0 allocated (0x11), every other one reads as zeros.
    uint64_t host = f.b.data(0, 0x11, 0xfffffffe00000001ULL);
    f.open();
    f.write(5 * 512 + 20, pattern(10, 2));
    f.flush();
    auto [raw, bitmap] = f.entry_on_file(0);
    CHECK((raw & format::kL2OffsetMask) == host);
    const uint64_t alloc = 1 | (1u << 5);
    CHECK(bitmap == (((0xfffffffeULL & ~alloc) << 32) | alloc));
    auto got = f.read(0, cs);
    CHECK(all_equal(std::span(got).first(512), 0x11));
    CHECK(all_equal(std::span(got).subspan(512, 5 * 512 + 20 - 512), 0));
    CHECK(std::equal(got.begin() + 2580, got.begin() + 2590, pattern(10, 2).begin()));
    CHECK(all_equal(std::span(got).subspan(2590), 0));
}
