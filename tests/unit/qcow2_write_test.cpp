// Image writes over images made by qemu-img: random writes, zeroing, resizes against a reference
// raw file, then `qemu-img check` (clean, no leaks) and `qemu-img compare` as the oracle.
#include <doctest/doctest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "test_errors.hpp"
#include "test_host_files.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using namespace qcowfs::test::host;

namespace {






/// One image variant: how to make it, and what the writes may do to it.
struct Variant {
    std::string name;
    std::string create;         // qemu-img create options (-o ...), size appended
    uint64_t size = 8 << 20;
    std::string prepare;        // qemu-io commands run on the image before the test ("" = none)
    std::string backing_create; // if set: a backing image made with these options first
    bool snapshot = false;      // take an internal snapshot after prepare (no shrink then)
    uint64_t max_write = 300 * 1024;
};

struct Fixture {
    TempDir dir;
    asio::io_context io;
    std::string img() const { return dir.path + "/img.qcow2"; }
    std::string ref() const { return dir.path + "/ref.raw"; }

    qcow2::OpenOptions options(bool writable = true) {
        qcow2::OpenOptions o;
        o.opener = [this](const std::string& path, bool w) { return io::open_file(io.get_executor(), path, w); };
        o.writable = writable;
        return o;
    }
    std::shared_ptr<qcow2::Image> open(bool writable = true) {
        return test::run(io, qcow2::Image::open(img(), options(writable)));
    }
};

void make_variant(Fixture& f, const Variant& v) {
    std::string out;
    // Relative names (backing file, data file) resolve in the image's directory.
    auto sh = [&](const std::string& cmd, std::string* o) { return test::host::sh("cd " + f.dir.path + " && " + cmd, o); };
    if (!v.backing_create.empty()) {
        REQUIRE(sh("qemu-img create -f qcow2 " + v.backing_create + " " + f.dir.path + "/base.qcow2 " +
                   std::to_string(v.size), &out) == 0);
        REQUIRE(sh("qemu-io -c 'write -P 0x5a 0 " + std::to_string(v.size / 2) + "' -c 'write -P 0x3c " +
                   std::to_string(v.size * 3 / 4) + " 100k' " + f.dir.path + "/base.qcow2", &out) == 0);
        REQUIRE(sh("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 " + v.create + " " + f.img(), &out) == 0);
    } else {
        REQUIRE(sh("qemu-img create -f qcow2 " + v.create + " " + f.img() + " " + std::to_string(v.size), &out) == 0);
    }
    if (!v.prepare.empty()) REQUIRE_MESSAGE(sh("qemu-io " + v.prepare + " " + f.img(), &out) == 0, out);
    if (v.snapshot) {
        REQUIRE(sh("qemu-img snapshot -c snap1 " + f.img(), &out) == 0);
        REQUIRE(sh("qemu-img convert -O raw -l snap1 " + f.img() + " " + f.dir.path + "/snap.raw", &out) == 0);
    }
    REQUIRE(sh("qemu-img convert -O raw " + f.img() + " " + f.ref(), &out) == 0);
}

void expect_clean(Fixture& f, const Variant& v) {
    std::string out;
    auto sh = [&](const std::string& cmd, std::string* o) { return test::host::sh("cd " + f.dir.path + " && " + cmd, o); };
    int rc = sh("qemu-img check " + f.img(), &out);
    CHECK_MESSAGE(rc == 0, (v.name + ": qemu-img check: " + out));
    rc = sh("qemu-img compare -f qcow2 -F raw " + f.img() + " " + f.ref(), &out);
    CHECK_MESSAGE(rc == 0, (v.name + ": qemu-img compare: " + out));
    if (v.snapshot) {
        rc = sh("qemu-img convert -O raw -l snap1 " + f.img() + " " + f.dir.path + "/snap-after.raw", &out);
        CHECK(rc == 0);
        CHECK_MESSAGE(read_file(f.dir.path + "/snap.raw") == read_file(f.dir.path + "/snap-after.raw"),
                      (v.name + ": the snapshot changed"));
    }
}

/// Random writes, zero ranges and resizes through the Image, mirrored in `ref`.
Task<void> random_ops(qcow2::Image& image, std::vector<std::byte>& ref, const Variant& v, uint32_t seed, int ops) {
    std::mt19937_64 rng(seed);
    auto view = image.active();
    const uint64_t cs = image.header().cluster_size();
    for (int i = 0; i < ops; ++i) {
        uint64_t size = image.size();
        int kind = static_cast<int>(rng() % 20);
        uint64_t off = rng() % size;
        if (rng() % 3 == 0) off = off / cs * cs + (rng() % 2 ? cs - 1 - rng() % 8 : 0);  // near boundaries
        off = std::min(off, size - 1);
        uint64_t len = 1 + rng() % (rng() % 4 == 0 ? v.max_write : 4096);
        len = std::min(len, size - off);
        if (kind < 13) {
            std::vector<std::byte> data(len);
            uint8_t pat = static_cast<uint8_t>(rng());
            for (size_t k = 0; k < len; ++k) data[k] = std::byte(static_cast<uint8_t>(pat + k * 7 + (k >> 9)));
            co_await image.write(off, data);
            std::memcpy(ref.data() + off, data.data(), len);
        } else if (kind < 17) {
            bool discard = rng() % 2;
            co_await image.write_zeroes(off, len, discard);
            std::memset(ref.data() + off, 0, len);
        } else if (kind < 18) {
            co_await image.allocate(off, len);
        } else if (kind < 19) {
            co_await image.flush();
        } else if (!v.snapshot) {
            uint64_t new_size = std::max<uint64_t>(cs, (size / 2 + rng() % (size * 3 / 2)) / 512 * 512);
            co_await image.resize(new_size);
            ref.resize(new_size);
        }
        if (i % 10 == 9) {
            // Read back a random range and the range just touched.
            uint64_t s = image.size();
            uint64_t ro = rng() % s, rl = std::min<uint64_t>(1 + rng() % 200000, s - ro);
            std::vector<std::byte> got(rl);
            co_await view->read(ro, got);
            REQUIRE_MESSAGE(std::memcmp(got.data(), ref.data() + ro, rl) == 0,
                            (v.name + ": read-back mismatch at " + std::to_string(ro) + " after op " + std::to_string(i)));
        }
    }
}

Variant V(std::string name, std::string create, uint64_t size, std::string prepare, std::string backing = "",
          bool snapshot = false, uint64_t max_write = 300 * 1024) {
    Variant v;
    v.name = std::move(name);
    v.create = std::move(create);
    v.size = size;
    v.prepare = std::move(prepare);
    v.backing_create = std::move(backing);
    v.snapshot = snapshot;
    v.max_write = max_write;
    return v;
}

std::vector<Variant> variants() {
    return {
        V("v3 64k", "-o cluster_size=64k", 8 << 20, "-c 'write -P 1 0 1M' -c 'write -z 2M 1M' -c 'write -c 4M 128k'"),
        V("v2 4k", "-o compat=0.10,cluster_size=4k", 4 << 20, "-c 'write -P 2 100k 300k'"),
        V("512 byte clusters refcount 1", "-o cluster_size=512,refcount_bits=1", 2 << 20, "-c 'write -P 3 0 64k'", "", false, 40000),
        V("refcount 64, 4k", "-o cluster_size=4k,refcount_bits=64", 4 << 20, "-c 'write -P 4 0 512k'"),
        V("refcount 2, 2M clusters", "-o cluster_size=2M,refcount_bits=2", 16 << 20, "-c 'write -P 5 1M 3M'", "", false, 3 << 20),
        V("extended l2 64k", "-o cluster_size=64k,extended_l2=on", 8 << 20, "-c 'write -P 6 0 100k' -c 'write -z 1M 200k' -c 'write -c 3M 64k'"),
        V("zstd compressed", "-o cluster_size=64k,compression_type=zstd", 8 << 20, "-c 'write -c -P 7 0 2M'"),
        V("backing chain", "-o cluster_size=64k", 8 << 20, "-c 'write -P 8 1M 64k' -c 'write -z 3M 128k'", "-o cluster_size=4k"),
        V("backing chain extended l2", "-o cluster_size=64k,extended_l2=on", 8 << 20, "-c 'write -P 9 1M 8k'", "-o cluster_size=64k"),
        V("v2 with backing", "-o compat=0.10,cluster_size=4k", 4 << 20, "", "-o compat=0.10"),
        V("internal snapshot", "-o cluster_size=4k", 4 << 20, "-c 'write -P 10 0 1M' -c 'write -c 2M 64k'", "", true),
        V("snapshot extended l2", "-o cluster_size=64k,extended_l2=on", 8 << 20, "-c 'write -P 11 0 1M'", "", true),
        V("lazy refcounts", "-o cluster_size=64k,lazy_refcounts=on", 8 << 20, "-c 'write -P 12 0 1M'"),
        V("external data file", "-o cluster_size=64k,data_file=data.raw", 8 << 20, "-c 'write -P 13 0 1M'"),
        V("external raw data file", "-o cluster_size=64k,data_file=data.raw,data_file_raw=on", 8 << 20, "-c 'write -P 14 0 1M'"),
        V("preallocated metadata", "-o cluster_size=64k,preallocation=metadata", 8 << 20, ""),
    };
}

}  // namespace

TEST_CASE("random writes, zeroing and resizes match qemu-img for every variant") {
    if (!have_qemu()) return;
    for (const auto& v : variants()) {
        for (uint32_t seed : {1u, 2u}) {
            CAPTURE(v.name);
            CAPTURE(seed);
            Fixture f;
            make_variant(f, v);
            std::vector<std::byte> ref = read_file(f.ref());
            {
                auto image = f.open();
                REQUIRE(image->read_only_reason().empty());
                test::run(f.io, random_ops(*image, ref, v, seed, 120));
                test::run(f.io, image->close());
            }
            write_file(f.ref(), ref);
            expect_clean(f, v);
        }
    }
}

TEST_CASE("a read-only open refuses writes with EROFS") {
    if (!have_qemu()) return;
    Fixture f;
    make_variant(f, V("plain", "-o cluster_size=64k", 1 << 20, ""));
    auto image = f.open(false);
    CHECK(image->read_only_reason() == "opened read-only");
    std::vector<std::byte> data(10);
    CHECK(test::thrown_errno([&] { test::run(f.io, image->write(0, data)); }) == EROFS);
}

/// Opens f.img() for writing and writes `length` bytes at `offset`: the write must fail with EIO
/// and mark the image corrupt, the next one with EROFS, and the file must change in nothing but
/// the corrupt bit. Returns the reason given to on_corrupt.
static std::string first_write_finds_corruption(Fixture& f, uint64_t offset, size_t length) {
    auto before = read_file(f.img());
    std::string reason;
    auto options = f.options();
    options.on_corrupt = [&](const std::string& r) { reason = r; };
    auto image = test::run(f.io, qcow2::Image::open(f.img(), options));
    std::vector<std::byte> buf(length, std::byte{1});
    CHECK(test::thrown_errno([&] { test::run(f.io, image->write(offset, buf)); }) == EIO);
    CHECK(test::thrown_errno([&] { test::run(f.io, image->write(offset, buf)); }) == EROFS);
    test::run(f.io, image->close());
    auto after = read_file(f.img());
    // Only the corrupt bit changed (incompatible features, byte 79 bit 1).
    REQUIRE(after.size() == before.size());
    before[79] |= std::byte{2};
    CHECK(after == before);
    return reason;
}

TEST_CASE("a used cluster with refcount 0 stops the first write before anything is allocated") {
    if (!have_qemu()) return;
    Fixture f;
    make_variant(f, V("plain", "-o cluster_size=64k", 4 << 20, "-c 'write -P 7 0 64k'"));
    // Guest cluster 0's data cluster gets refcount 0 (16-bit refcounts, one refcount block).
    std::vector<std::byte> bytes = read_file(f.img());
    uint64_t l1 = format::load_be64(bytes.data() + 40);
    uint64_t l2 = format::load_be64(bytes.data() + l1) & format::kL1OffsetMask;
    uint64_t data = format::load_be64(bytes.data() + l2) & format::kL2OffsetMask;
    uint64_t table = format::load_be64(bytes.data() + 48);
    uint64_t block = format::load_be64(bytes.data() + table);
    REQUIRE(data != 0);
    format::store_be16(bytes.data() + block + 2 * (data >> 16), 0);
    write_file(f.img(), bytes);
    CHECK(first_write_finds_corruption(f, 1 << 20, 4096).find("refcount is 0") != std::string::npos);
}

TEST_CASE("a refcount block past every cluster the tables use, with refcount 0, stops the first write") {
    // The check compares refcounts with references up to the last cluster the tables name; the
    // refcount table and blocks beyond it are checked too (the allocator would hand them out).
    if (!have_qemu()) return;
    Fixture f;
    make_variant(f, V("plain", "-o cluster_size=64k", 4 << 20, ""));
    std::vector<std::byte> bytes = read_file(f.img());
    const uint64_t cs = 64 << 10;
    const uint64_t table = format::load_be64(bytes.data() + 48);
    const uint64_t block = format::load_be64(bytes.data() + table);
    const uint64_t moved = div_ceil(bytes.size(), cs) * cs;
    REQUIRE(moved > std::max(block, format::load_be64(bytes.data() + 40)));  // past the L1 table too
    bytes.resize(moved + cs);
    std::memcpy(bytes.data() + moved, bytes.data() + block, cs);  // the block moves to the end
    format::store_be64(bytes.data() + table, moved);
    format::store_be16(bytes.data() + moved + 2 * (block / cs), 0);  // the old place is free
    format::store_be16(bytes.data() + moved + 2 * (moved / cs), 0);  // and the new one says free too
    write_file(f.img(), bytes);
    CHECK(first_write_finds_corruption(f, 0, 3 * cs).find("cluster at " + hex(moved) + " is in use but its refcount is 0") !=
          std::string::npos);
}

TEST_CASE("a COPIED flag on a cluster a snapshot shares is corruption: the snapshot keeps its bytes") {
    // QEMU trusts the flag and writes in place, into bytes the snapshot still reads. qcowfs
    // checks the refcount: the flag on a cluster with refcount 2 stops the write with EIO.
    if (!have_qemu()) return;
    enum class Flag { l2_entry, l1_entry, zeroed_entry };
    for (Flag where : {Flag::l2_entry, Flag::l1_entry, Flag::zeroed_entry}) {
        CAPTURE(int(where));
        Fixture f;
        make_variant(f, V("plain", "-o cluster_size=64k", 4 << 20, "-c 'write -P 7 0 128k'", "", true));
        std::vector<std::byte> bytes = read_file(f.img());
        const uint64_t l1 = format::load_be64(bytes.data() + 40);
        const uint64_t l2 = format::load_be64(bytes.data() + l1) & format::kL1OffsetMask;
        const uint64_t entry = where == Flag::zeroed_entry ? l2 + 8 : l2;
        if (where == Flag::l1_entry)
            bytes[l1] |= std::byte{0x80};  // bit 63: COPIED, on the L2 table both L1 tables name
        else
            bytes[entry] |= std::byte{0x80};  // on a data cluster the snapshot also maps
        write_file(f.img(), bytes);
        REQUIRE(sh("qemu-img convert -O raw -l snap1 " + f.img() + " " + (f.dir / "before.raw")) == 0);

        std::string reason;
        auto options = f.options();
        options.on_corrupt = [&](const std::string& r) { reason = r; };
        auto image = test::run(f.io, qcow2::Image::open(f.img(), options));
        std::vector<std::byte> buf(4096, std::byte{1});
        if (where == Flag::zeroed_entry)
            CHECK(test::thrown_errno([&] { test::run(f.io, image->write_zeroes(64 << 10, 64 << 10, true)); }) == EIO);
        else
            CHECK(test::thrown_errno([&] { test::run(f.io, image->write(0, buf)); }) == EIO);
        CHECK(reason.find("COPIED flag but its refcount is 2") != std::string::npos);
        test::run(f.io, image->close());
        REQUIRE(sh("qemu-img convert -O raw -l snap1 " + f.img() + " " + (f.dir / "after.raw")) == 0);
        CHECK(read_file(f.dir / "after.raw") == read_file(f.dir / "before.raw"));
    }
}

TEST_CASE("a power cut at any write or flush of the write path leaves only leaks, and fsynced data") {
    // Flush ordering over an in-memory image that forgets unflushed writes: 512-byte clusters
    // (L2 tables and refcount blocks fill fast), a snapshot (copy-on-write of shared L2 tables
    // and data), a discard and a resize. At every write, flush or discard of the second phase
    // the power goes; the durable bytes must pass `qemu-img check` with nothing worse than
    // leaks, and the first phase (flushed) must read back.
    if (!have_qemu()) return;
    TempDir dir("write-cut");
    const std::string img = dir / "img.qcow2";
    REQUIRE(sh("qemu-img create -q -f qcow2 -o cluster_size=512 " + img + " 1M") == 0);
    REQUIRE(sh("qemu-io -c 'write -P 0x11 0 40k' -c 'write -P 0x22 200k 8k' " + img) == 0);
    REQUIRE(sh("qemu-img snapshot -c s1 " + img) == 0);
    const std::vector<std::byte> original = read_file(img);

    std::vector<std::byte> first(24 * 1024, std::byte{0x33});
    std::vector<std::byte> second(64 * 1024, std::byte{0x44});
    std::vector<std::byte> tail(3000, std::byte{0x55});

    // The expected content after the first phase (flushed).
    REQUIRE(sh("qemu-img convert -O raw " + img + " " + (dir / "ref.raw")) == 0);
    std::vector<std::byte> ref = read_file(dir / "ref.raw");
    std::memcpy(ref.data() + 10000, first.data(), first.size());

    auto scenario = [&](long cut_after, long* ops_seen) -> std::vector<std::byte> {
        io::MemFile mem("img", original);
        test::PowerCutFile* cut = nullptr;
        asio::io_context io;
        auto image = test::run(io, qcow2::Image::open(img, test::power_cut_options(mem, cut)));
        test::run(io, image->write(10000, first));
        test::run(io, image->flush());
        cut->ops = 0;
        cut->ops_left = cut_after;
        return test::after_power_cut(mem, *cut, ops_seen, [&] {
            test::run(io, image->write(300 * 1024, second));       // new L2 tables, allocation
            test::run(io, image->write(1000, tail));                // COW out of the snapshot
            test::run(io, image->write_zeroes(200 * 1024, 8 * 1024, true));  // release
            test::run(io, image->resize(4 << 20));                  // L1 grows and moves
            test::run(io, image->write((4 << 20) - 4096, tail));
            test::run(io, image->close());
        });
    };

    long total = 0;
    scenario(-1, &total);
    REQUIRE(total > 20);
    int checked = 0;
    for (long k = 0; k <= total; ++k) {
        CAPTURE(k);
        auto bytes = scenario(k, nullptr);
        write_file(dir / "cut.qcow2", bytes);
        std::string out;
        int rc = sh("qemu-img check " + (dir / "cut.qcow2"), &out);
        REQUIRE_MESSAGE((rc == 0 || rc == 3), out);
        CHECK(out.find("ERROR") == std::string::npos);
        REQUIRE(sh("qemu-img convert -O raw " + (dir / "cut.qcow2") + " " + (dir / "cut.raw")) == 0);
        auto raw = read_file(dir / "cut.raw");
        REQUIRE(raw.size() >= ref.size());
        CHECK(std::memcmp(raw.data() + 10000, first.data(), first.size()) == 0);
        REQUIRE(sh("qemu-img convert -O raw -l s1 " + (dir / "cut.qcow2") + " " + (dir / "snap.raw")) == 0);
        auto snap = read_file(dir / "snap.raw");
        CHECK(snap[0] == std::byte{0x11});
        CHECK(snap[200 * 1024] == std::byte{0x22});
        ++checked;
    }
    CHECK(checked == total + 1);
    MESSAGE("power cut checked at " << checked << " points");
}

TEST_CASE("extended L2: a write allocates only the subclusters it touches; the rest still shows the backing file") {
    // Content alone cannot tell (copying the backing file's bytes into every subcluster reads the
    // same), so look at the mapping qemu-img reports: depth 0 only for the written subclusters.
    if (!have_qemu()) return;
    Fixture f;
    make_variant(f, V("ext l2 over backing", "-o cluster_size=64k,extended_l2=on", 4 << 20, "", "-o cluster_size=64k"));
    std::vector<std::byte> ref = read_file(f.ref());
    {
        auto image = f.open();
        // 64 KiB clusters: 2 KiB subclusters. Bytes 3000..7000 touch subclusters 1, 2 and 3.
        std::vector<std::byte> data(4000, std::byte{0x77});
        test::run(f.io, image->write(65536 + 3000, data));
        std::memcpy(ref.data() + 65536 + 3000, data.data(), data.size());
        test::run(f.io, image->close());
    }
    write_file(f.ref(), ref);
    expect_clean(f, V("ext l2 over backing", "", 0, ""));
    std::string map;
    REQUIRE(sh("qemu-img map --output=json " + f.img(), &map) == 0);
    // The written subclusters, [65536 + 2048, 65536 + 8192), are the image's own (depth 0); the
    // ones around them in the same cluster still come from the backing file (depth 1).
    CHECK_MESSAGE(map.find("\"start\": 67584, \"length\": 6144, \"depth\": 0") != std::string::npos, map);
    CHECK_MESSAGE(map.find("\"start\": 73728, \"length\": ") != std::string::npos, map);
    CHECK_MESSAGE(map.find("\"start\": 0, \"length\": 67584, \"depth\": 1") != std::string::npos, map);
}
