// qcow2::Disk over images made by qemu-img: the resize policy (whole sectors, grow-only, write-back
// before a shrink), writes past the end, the change counter, seeking through the cache.
#include <doctest/doctest.h>

#include <boost/asio/io_context.hpp>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/disk.hpp"
#include "test_errors.hpp"
#include "test_host_files.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using namespace qcowfs::test::host;

namespace {

constexpr uint64_t KiB = 1024;

struct Fixture {
    TempDir dir{"disk"};
    asio::io_context io;
    std::vector<uint64_t> resizes;  // what DiskOptions::on_resize reported
    std::string img() const { return dir / "img.qcow2"; }

    void create(uint64_t size, const std::string& options = "-o cluster_size=64k") {
        std::string out;
        REQUIRE_MESSAGE(sh("qemu-img create -f qcow2 " + options + " " + img() + " " + std::to_string(size), &out) == 0,
                        out);
    }
    std::unique_ptr<qcow2::Disk> open(bool writable = true, bool host_refuses_writing = false) {
        qcow2::OpenOptions o;
        o.opener = [this, host_refuses_writing](const std::string& path, bool w) {
            if (w && host_refuses_writing) fail(EACCES, path + ": permission denied");
            return io::open_file(io.get_executor(), path, w);
        };
        o.writable = writable;
        qcow2::DiskOptions d;
        d.write_cache_bytes = 16 << 20;
        d.on_resize = [this](uint64_t size) { resizes.push_back(size); };
        return test::run(io, qcow2::Disk::open(img(), o, d));
    }
    template <class T>
    T run(Task<T> task) {
        return test::run(io, std::move(task));
    }
    std::vector<std::byte> read(qcow2::Disk& disk, uint64_t offset, size_t n) {
        auto view = run(disk.view(""));
        std::vector<std::byte> out(n);
        run(disk.read(*view, offset, out));
        return out;
    }
    /// The image's own bytes, past the disk's cache.
    std::vector<std::byte> read_image(qcow2::Disk& disk, uint64_t offset, size_t n) {
        std::vector<std::byte> out(n);
        run(disk.image().active()->read(offset, out));
        return out;
    }
};

}  // namespace

TEST_CASE("Disk::resize rounds up to whole sectors, leaves a bigger disk to grow_only, and reports sizes") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(1 << 20);
    auto disk = f.open();
    REQUIRE(disk->writable());
    f.run(disk->resize(1000));
    CHECK(disk->size() == 1024);
    f.run(disk->resize(1024));  // no change: nothing reported
    f.run(disk->resize(4097, true));
    CHECK(disk->size() == 4608);
    f.run(disk->resize(10, true));
    CHECK(disk->size() == 4608);
    CHECK(f.resizes == std::vector<uint64_t>{1024, 4608});
    CHECK(test::thrown_errno([&] { f.run(disk->resize(std::numeric_limits<uint64_t>::max() - 100)); }) == EFBIG);
    CHECK(disk->size() == 4608);
}

TEST_CASE("Disk::write past the end grows the disk to the end of the write, in whole sectors") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(64 * KiB);
    auto disk = f.open();
    auto data = test::bytes_of(0xab, 100);
    CHECK(f.run(disk->write(70000, data)) == 100);
    CHECK(disk->size() == 70144);
    CHECK(f.resizes == std::vector<uint64_t>{70144});
    CHECK(f.read(*disk, 70000, 100) == data);
    CHECK(f.run(disk->write(0, std::span<const std::byte>())) == 0);
}

TEST_CASE("a shrink writes the cache back first, so a refused shrink loses nothing") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(1 << 20);
    REQUIRE(sh("qemu-img snapshot -c s1 " + f.img()) == 0);
    auto disk = f.open();
    auto data = test::bytes_of(0x5c, 4096);
    // The write continuing another is cached (a lone small write would go to the image at once).
    f.run(disk->write(596 * KiB, data));
    f.run(disk->write(600 * KiB, data));
    CHECK(f.read_image(*disk, 600 * KiB, 4096) != data);  // still only in the cache
    CHECK(test::thrown_errno([&] { f.run(disk->resize(512 * KiB)); }) == ENOTSUP);
    CHECK(disk->size() == 1 << 20);
    CHECK(f.read_image(*disk, 600 * KiB, 4096) == data);
    CHECK(f.read(*disk, 600 * KiB, 4096) == data);
}

TEST_CASE("a shrink drops changes past the new end: a grow shows zeros there") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(1 << 20);
    auto disk = f.open();
    f.run(disk->write(900 * KiB, test::bytes_of(0x77, 8192)));
    f.run(disk->write(0, test::bytes_of(0x11, 512)));
    f.run(disk->resize(512 * KiB));
    f.run(disk->resize(1 << 20));
    CHECK(f.read(*disk, 900 * KiB, 8192) == test::bytes_of(0, 8192));
    CHECK(f.read(*disk, 0, 512) == test::bytes_of(0x11, 512));
    CHECK(f.resizes == std::vector<uint64_t>{512 * KiB, 1 << 20});
}

TEST_CASE("Disk::changed_since_flush follows writes, fills, resizes and flushes") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(1 << 20);
    auto disk = f.open();
    CHECK(!disk->changed_since_flush());
    f.run(disk->write(0, test::bytes_of(1, 512)));
    CHECK(disk->changed_since_flush());
    f.run(disk->flush());
    CHECK(!disk->changed_since_flush());
    f.run(disk->fill(qcow2::Fill::zero, 0, 4096, false));
    CHECK(disk->changed_since_flush());
    f.run(disk->flush());
    f.run(disk->resize(2 << 20));
    CHECK(disk->changed_since_flush());
    f.run(disk->flush());
    CHECK(!disk->changed_since_flush());
    // fill without grow ignores what lies past the end; with grow it grows the disk first.
    f.run(disk->fill(qcow2::Fill::zero, 3 << 20, 4096, false));
    CHECK(disk->size() == 2 << 20);
    CHECK(!disk->changed_since_flush());
    f.run(disk->fill(qcow2::Fill::allocate, 3 << 20, 4096, true));
    CHECK(disk->size() == (3 << 20) + 4096);
}

TEST_CASE("a host file that refuses writing gives a read-only disk, whose changes fail with EROFS") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(1 << 20);
    auto disk = f.open(true, true);
    CHECK(!disk->writable());
    CHECK(disk->image().read_only_reason() == "opened read-only");
    CHECK(test::thrown_errno([&] { f.run(disk->write(0, test::bytes_of(1, 512))); }) == EROFS);
    CHECK(test::thrown_errno([&] { f.run(disk->resize(4096)); }) == EROFS);
    CHECK(!disk->changed_since_flush());
    f.run(disk->flush());  // nothing to do
}

TEST_CASE("Disk::seek sees cached writes of the active disk") {
    if (!have_qemu()) return;
    Fixture f;
    f.create(1 << 20);
    auto disk = f.open();
    auto view = f.run(disk->view(""));
    CHECK(!f.run(disk->seek(*view, 0, true)).has_value());  // all hole
    CHECK(f.run(disk->seek(*view, 0, false)) == std::optional<uint64_t>(0));
    f.run(disk->write(192 * KiB, test::bytes_of(3, 512)));
    CHECK(f.run(disk->seek(*view, 0, true)) == std::optional<uint64_t>(192 * KiB));
    CHECK(f.run(disk->seek(*view, 192 * KiB, false)) == std::optional<uint64_t>(256 * KiB));
    CHECK(!f.run(disk->seek(*view, 1 << 20, false)).has_value());  // at the end: ENXIO
}
