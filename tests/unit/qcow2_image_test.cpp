// Engine tests: Image opened over in-memory files, read through every mapping kind and failure.
#include <doctest/doctest.h>

#include "qcowfs/codec/compression.hpp"
#include <boost/asio/detached.hpp>
#include <boost/asio/strand.hpp>

#include "qcowfs/format/error.hpp"
#include "qcowfs/util/async_event.hpp"
#include "test_errors.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using test::ImageBuilder;
using test::MemFiles;

void ImageBuilder::compressed(uint64_t guest, const std::vector<std::byte>& content, size_t padding) {
    std::vector<std::byte> out(content.size());
    auto n = codec::compress_cluster(compression, content, out);
    REQUIRE(n.has_value());
    out.resize(*n + padding, std::byte{0x77});
    uint64_t host = next_free + 100;  // deliberately unaligned, as QEMU packs compressed clusters
    file.resize(host + out.size());
    std::memcpy(file.data() + host, out.data(), out.size());
    next_free = (file.size() + cluster() - 1) / cluster() * cluster();
    file.resize(next_free);
    put64(entry_offset(guest), format::encode_l2_compressed(host, *n, cluster_bits));
}

namespace {

std::vector<std::byte> read_view(asio::io_context& io, qcow2::BlockSource& view, uint64_t off, size_t n) {
    std::vector<std::byte> buf(n, std::byte{0xee});
    test::run(io, [&]() -> Task<int> {
        co_await view.read(off, buf);
        co_return 0;
    }());
    return buf;
}

std::shared_ptr<qcow2::Image> open_image(asio::io_context& io, MemFiles& files, const std::string& path) {
    qcow2::OpenOptions o;
    o.opener = files.opener();
    return test::run(io, qcow2::Image::open(path, o));
}

bool all_equal(const std::vector<std::byte>& v, size_t from, size_t to, uint8_t value) {
    for (size_t i = from; i < to; ++i)
        if (v[i] != std::byte{value}) return false;
    return true;
}

}  // namespace

TEST_CASE("data, zero and unallocated clusters read back, across cluster boundaries") {
    ImageBuilder b;
    b.start();
    b.data(0, 0x11);
    b.data(4096, 0x22);
    b.zero(8192);
    // 12288: unallocated, no backing -> zeros
    b.data(16384, 0x33);
    MemFiles files;
    files.files["/img/a.qcow2"] = b.finish();
    asio::io_context io;
    auto image = open_image(io, files, "/img/a.qcow2");
    auto view = image->active();
    CHECK(view->size() == b.size);

    auto buf = read_view(io, *view, 100, 5 * 4096);  // unaligned start, spans 6 clusters
    CHECK(all_equal(buf, 0, 4096 - 100, 0x11));
    CHECK(all_equal(buf, 4096 - 100, 8192 - 100, 0x22));
    CHECK(all_equal(buf, 8192 - 100, 16384 - 100, 0x00));
    CHECK(all_equal(buf, 16384 - 100, 20480 - 100, 0x33));
    CHECK(all_equal(buf, 20480 - 100, buf.size(), 0x00));

    // One byte, and a read at the very end of the disk.
    CHECK(read_view(io, *view, 4096, 1)[0] == std::byte{0x22});
    auto tail = read_view(io, *view, b.size - 10, 10);
    CHECK(all_equal(tail, 0, 10, 0));
}

TEST_CASE("reads past the virtual size are zeros and clipped") {
    ImageBuilder b;
    b.size = 10000;  // not a multiple of the cluster size
    b.start();
    b.data(8192, 0x44);
    MemFiles files;
    files.files["a"] = b.finish();
    asio::io_context io;
    auto view = open_image(io, files, "a")->active();
    auto buf = read_view(io, *view, 8000, 4096);
    CHECK(all_equal(buf, 0, 192, 0));
    CHECK(all_equal(buf, 192, 2000, 0x44));
    CHECK(all_equal(buf, 2000, 4096, 0));
}

TEST_CASE("contiguous host clusters are read with one request") {
    ImageBuilder b;
    b.start();
    for (int i = 0; i < 8; ++i) b.data(uint64_t(i) * 4096, uint8_t(0x50 + i));
    MemFiles files;
    files.files["a"] = b.finish();
    asio::io_context io;
    auto view = open_image(io, files, "a")->active();
    read_view(io, *view, 0, 1);  // loads the L2 slice
    size_t before = files.opened["a"]->read_count();
    auto buf = read_view(io, *view, 0, 8 * 4096);
    CHECK(files.opened["a"]->read_count() - before == 1);
    for (int i = 0; i < 8; ++i) CHECK(all_equal(buf, size_t(i) * 4096, size_t(i + 1) * 4096, uint8_t(0x50 + i)));
}

TEST_CASE("compressed clusters decompress (zlib and zstd, trailing padding ignored)") {
    for (auto type : {format::CompressionType::zlib, format::CompressionType::zstd}) {
        ImageBuilder b;
        b.compression = type;
        b.start();
        std::vector<std::byte> content(4096);
        for (size_t i = 0; i < content.size(); ++i) content[i] = std::byte(uint8_t(i * 7 / 13));
        b.compressed(4096, content, 300);
        b.data(8192, 0x99);
        MemFiles files;
        files.files["c"] = b.finish();
        asio::io_context io;
        auto view = open_image(io, files, "c")->active();
        auto buf = read_view(io, *view, 4096 + 5, 4096);
        CHECK(std::memcmp(buf.data(), content.data() + 5, 4096 - 5) == 0);
        CHECK(all_equal(buf, 4096 - 5, 4096, 0x99));
    }
}

TEST_CASE("extended L2 entries: allocated, zero and unallocated subclusters") {
    ImageBuilder b;
    b.cluster_bits = 16;  // 64 KiB clusters, 2 KiB subclusters
    b.extended_l2 = true;
    b.size = 4 << 20;
    b.start();
    // Subclusters 0-3 allocated, 4-7 zero, 8-31 unallocated (backing).
    uint64_t bitmap = 0x0000000fULL | (0x000000f0ULL << 32);
    b.data(0, 0xab, bitmap);
    b.backing_file = "base.raw";
    b.backing_format = "raw";
    MemFiles files;
    files.files["dir/top.qcow2"] = b.finish();
    files.files["dir/base.raw"] = test::bytes_of(0xcd, 40000);  // shorter than the overlay
    asio::io_context io;
    auto view = open_image(io, files, "dir/top.qcow2")->active();
    auto buf = read_view(io, *view, 0, 65536 + 100);
    CHECK(all_equal(buf, 0, 8192, 0xab));
    CHECK(all_equal(buf, 8192, 16384, 0x00));
    CHECK(all_equal(buf, 16384, 40000, 0xcd));
    CHECK(all_equal(buf, 40000, buf.size(), 0x00));  // past the end of the backing file

    // Invalid bitmap (allocated and zero at once) is corruption.
    ImageBuilder bad = b;
    bad.raw_entry(65536, format::encode_l2_standard(bad.alloc_cluster(), true, false), 0x1ULL | (0x1ULL << 32));
    files.files["dir/bad.qcow2"] = bad.finish();
    auto bad_view = open_image(io, files, "dir/bad.qcow2")->active();
    CHECK(test::thrown_message([&] { read_view(io, *bad_view, 65536, 10); }).find("L2 entry") != std::string::npos);
}

TEST_CASE("backing chain: unallocated clusters come from a qcow2 backing file, zero flags hide it") {
    ImageBuilder base;
    base.start();
    base.data(0, 0x01);
    base.data(4096, 0x02);
    base.data(8192, 0x03);
    ImageBuilder top;
    top.backing_file = "base.qcow2";
    top.start();
    top.data(4096, 0x20);
    top.zero(8192);
    MemFiles files;
    files.files["/d/base.qcow2"] = base.finish();
    files.files["/d/top.qcow2"] = top.finish();
    asio::io_context io;
    auto view = open_image(io, files, "/d/top.qcow2")->active();
    auto buf = read_view(io, *view, 0, 3 * 4096);
    CHECK(all_equal(buf, 0, 4096, 0x01));
    CHECK(all_equal(buf, 4096, 8192, 0x20));
    CHECK(all_equal(buf, 8192, 12288, 0x00));
}

TEST_CASE("a backing chain that loops is refused") {
    ImageBuilder a;
    a.backing_file = "b.qcow2";
    a.start();
    ImageBuilder b;
    b.backing_file = "a.qcow2";
    b.start();
    MemFiles files;
    files.files["/d/a.qcow2"] = a.finish();
    files.files["/d/b.qcow2"] = b.finish();
    asio::io_context io;
    auto msg = test::thrown_message([&] { open_image(io, files, "/d/a.qcow2"); });
    CHECK(msg.find("loops") != std::string::npos);
}

TEST_CASE("a missing backing file fails the open with EIO naming it") {
    ImageBuilder a;
    a.backing_file = "gone.qcow2";
    a.start();
    MemFiles files;
    files.files["/d/a.qcow2"] = a.finish();
    asio::io_context io;
    try {
        open_image(io, files, "/d/a.qcow2");
        FAIL("open succeeded");
    } catch (const std::system_error& e) {
        CHECK(e.code().value() == EIO);
        CHECK(std::string(e.what()).find("gone.qcow2") != std::string::npos);
    }
}

TEST_CASE("internal snapshots read through their own L1 table") {
    ImageBuilder b;
    b.start();
    b.data(0, 0x10);
    b.snapshot("1", "before", b.size / 2);
    // After the snapshot the active disk maps cluster 0 elsewhere (what COW would have done).
    b.l2_tables.clear();
    std::memset(b.file.data() + b.l1_offset, 0, 8);
    b.data(0, 0x20);
    MemFiles files;
    files.files["s"] = b.finish();
    asio::io_context io;
    auto image = open_image(io, files, "s");
    REQUIRE(image->snapshots().size() == 1);
    CHECK(image->snapshots()[0].name == "before");
    auto snap = test::run(io, image->snapshot("1"));
    CHECK(snap->size() == b.size / 2);
    CHECK(read_view(io, *snap, 0, 1)[0] == std::byte{0x10});
    CHECK(read_view(io, *image->active(), 0, 1)[0] == std::byte{0x20});
    CHECK_THROWS(test::run(io, image->snapshot("7")));
}

TEST_CASE("corrupt metadata gives EIO with a reason, and the rest of the disk stays readable") {
    ImageBuilder b;
    b.size = 8 << 20;  // 4 L2 tables' worth with 4 KiB clusters
    b.start();
    b.data(0, 0x42);
    // L1 entry 1 points far beyond the end of the file.
    b.put64(b.l1_offset + 8, format::encode_l1({uint64_t{1} << 40, true}));
    // L1 entry 2 has reserved bits set.
    b.put64(b.l1_offset + 16, 0x0100000000000000ULL | b.alloc_cluster());
    MemFiles files;
    files.files["bad"] = b.finish();
    asio::io_context io;
    auto view = open_image(io, files, "bad")->active();
    std::string beyond = test::thrown_message([&] { read_view(io, *view, 2 << 20, 512); });
    CHECK(beyond.find("beyond the end") != std::string::npos);
    std::string reserved = test::thrown_message([&] { read_view(io, *view, 4 << 20, 512); });
    CHECK(reserved.find("L1 entry 2") != std::string::npos);
    CHECK(read_view(io, *view, 0, 1)[0] == std::byte{0x42});
}

TEST_CASE("host offset zero: unallocated when plain, corrupt with COPIED unless there is a data file") {
    ImageBuilder b;
    b.start();
    b.raw_entry(0, 0);
    b.raw_entry(4096, format::kOflagCopied);  // offset 0 with COPIED: only valid with a data file
    MemFiles files;
    files.files["h"] = b.finish();
    asio::io_context io;
    auto view = open_image(io, files, "h")->active();
    auto buf = read_view(io, *view, 0, 4096);
    CHECK(all_equal(buf, 0, 4096, 0));
    CHECK(test::thrown_message([&] { read_view(io, *view, 4096, 10); }).find("data file") != std::string::npos);
}

TEST_CASE("a data cluster past the end of a truncated file is EIO, a short last cluster is not") {
    ImageBuilder b;
    b.start();
    b.data(0, 0x31);
    b.data(4096, 0x32);
    MemFiles files;
    auto bytes = b.finish();
    // The file ends 100 bytes into the second data cluster.
    uint64_t second = b.l2_tables.begin()->second + 2 * 4096;
    bytes.resize(second + 100);
    files.files["t"] = bytes;
    asio::io_context io;
    auto view = open_image(io, files, "t")->active();
    auto buf = read_view(io, *view, 4096, 4096);
    CHECK(all_equal(buf, 0, 100, 0x32));
    CHECK(all_equal(buf, 100, 4096, 0));
    b.data(8192, 0x33);
    bytes = b.finish();
    bytes.resize(b.l2_tables.begin()->second + 3 * 4096);  // ends before the third data cluster
    files.files["t2"] = bytes;
    auto view2 = open_image(io, files, "t2")->active();
    CHECK(test::thrown_message([&] { read_view(io, *view2, 0, 3 * 4096); }).find("truncated") != std::string::npos);
}

TEST_CASE("an I/O error reaches the caller and is not cached") {
    ImageBuilder b;
    b.start();
    b.data(0, 0x61);
    MemFiles files;
    files.files["f"] = b.finish();
    asio::io_context io;
    auto view = open_image(io, files, "f")->active();
    files.opened["f"]->inject_failure(EIO, 1);
    try {
        read_view(io, *view, 0, 100);
        FAIL("read succeeded");
    } catch (const std::system_error& e) {
        CHECK(e.code().value() == EIO);
    }
    CHECK(read_view(io, *view, 0, 100)[0] == std::byte{0x61});
}

TEST_CASE("encryption and unknown incompatible features refuse to open") {
    ImageBuilder b;
    b.start();
    auto bytes = b.finish();
    bytes[35] = std::byte{2};  // crypt_method = LUKS
    MemFiles files;
    files.files["e"] = bytes;
    asio::io_context io;
    CHECK(test::thrown_message([&] { open_image(io, files, "e"); }).find("encryption") != std::string::npos);
}

namespace {

/// A file whose reads wait on a gate once armed, counting how many are waiting at once.
class GatedFile final : public io::File {
public:
    GatedFile(std::unique_ptr<io::File> inner, asio::io_context& io) : inner_(std::move(inner)), gate_(io.get_executor()) {}
    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        if (armed_) {
            ++waiting_;
            max_waiting_ = std::max(max_waiting_, waiting_);
            co_await gate_.wait();
            --waiting_;
        }
        co_return co_await inner_->read_at(offset, buf);
    }
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override { return inner_->write_at(offset, buf); }
    Task<void> flush() override { return inner_->flush(); }
    uint64_t size() override { return inner_->size(); }
    const std::string& name() const override { return inner_->name(); }

    void arm() { armed_ = true; }
    void open_gate() { gate_.set(); }
    int max_waiting() const { return max_waiting_; }
    int waiting() const { return waiting_; }

private:
    std::unique_ptr<io::File> inner_;
    AsyncEvent gate_;
    bool armed_ = false;
    int waiting_ = 0;
    int max_waiting_ = 0;
};

}  // namespace

TEST_CASE("reads of different ranges of one image are in flight at the same time") {
    ImageBuilder b;
    b.size = 8 << 20;
    b.start();
    b.data(0, 0x01);
    b.data(6 << 20, 0x02);  // another L2 table
    MemFiles files;
    files.files["g"] = b.finish();
    asio::io_context io;
    GatedFile* gated = nullptr;
    qcow2::OpenOptions o;
    o.opener = [&](const std::string& path, bool w) -> std::unique_ptr<io::File> {
        auto f = std::make_unique<GatedFile>(files.opener()(path, w), io);
        gated = f.get();
        return f;
    };
    auto image = test::run(io, qcow2::Image::open("g", o));
    auto view = image->active();
    // The L1 table of a read-only image is read slice by slice and the slice is shared: read it
    // once before the gate, as any earlier request would have.
    std::vector<std::byte> warm(512);
    test::run(io, view->read(0, warm));
    gated->arm();

    auto strand = asio::make_strand(io);  // both requests on the image's one strand, as in the daemon
    std::vector<std::byte> a(4096), c(4096);
    int done = 0;
    auto reader = [&](uint64_t off, std::vector<std::byte>& buf) -> Task<void> {
        co_await view->read(off, buf);
        ++done;
    };
    asio::co_spawn(strand, reader(0, a), asio::detached);
    asio::co_spawn(strand, reader(6 << 20, c), asio::detached);
    io.restart();
    while (gated->waiting() < 2 && io.run_one() > 0) {
    }
    CHECK(gated->max_waiting() == 2);  // the second read did not wait for the first
    gated->open_gate();
    io.run();
    CHECK(done == 2);
    CHECK(a[0] == std::byte{0x01});
    CHECK(c[0] == std::byte{0x02});
}
