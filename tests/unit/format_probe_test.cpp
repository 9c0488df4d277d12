// Unit tests for the image probe: which reads it asks for, what it finds, and what it refuses.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "test_errors.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/probe.hpp"

using namespace qcowfs;
using namespace qcowfs::format;

using qcowfs::test::thrown_errno;

namespace {

constexpr uint64_t kSnapshotsAt = 0x40000;

/// A 1 MiB disk: its L1 table at 0x30000, its refcount table at 0x10000.
ImageMetadata metadata(uint32_t cluster_bits = 16) {
    ImageMetadata m;
    m.header = Header{.cluster_bits = cluster_bits, .size = uint64_t{1} << 20, .l1_size = 1,
                      .l1_table_offset = 0x30000, .refcount_table_offset = 0x10000, .refcount_table_clusters = 1};
    return m;
}

std::vector<Snapshot> snapshots(size_t count, size_t name_bytes) {
    std::vector<Snapshot> out(count);
    for (size_t i = 0; i < count; ++i) {
        out[i].l1_table_offset = 0x30000;
        out[i].l1_size = 1;
        out[i].id = std::to_string(i + 1);
        out[i].name = std::string(name_bytes, static_cast<char>('a' + i % 26));
        out[i].disk_size = uint64_t{1} << 20;
    }
    return out;
}

/// An image file: cluster 0 from `m`, the snapshot table (if any) at kSnapshotsAt, ending with it.
std::vector<std::byte> image_of(ImageMetadata m, const std::vector<Snapshot>& snaps = {}) {
    m.header.nb_snapshots = static_cast<uint32_t>(snaps.size());
    m.header.snapshots_offset = snaps.empty() ? 0 : kSnapshotsAt;
    std::vector<std::byte> file(kSnapshotsAt);
    std::vector<std::byte> c0 = serialize_metadata(m);
    std::copy(c0.begin(), c0.end(), file.begin());
    std::vector<std::byte> table = serialize_snapshot_table(snaps, m.header.version);
    file.insert(file.end(), table.begin(), table.end());
    return file;
}

/// Runs a probe over `file` as a caller does, recording each read it asks for.
struct Driver {
    std::vector<ProbeRead> reads;

    ProbedImage run(const std::vector<std::byte>& file) {
        ImageProbe probe(file.size());
        while (auto r = probe.next()) {
            reads.push_back(*r);
            uint64_t begin = std::min<uint64_t>(r->offset, file.size());
            uint64_t end = std::min<uint64_t>(r->offset + r->length, file.size());
            probe.feed(std::span(file).subspan(begin, end - begin));
        }
        return probe.take();
    }
};

}  // namespace

TEST_CASE("probe: the header read, then the rest of a cluster 0 larger than it") {
    ImageMetadata m = metadata();
    m.backing_file = "base.qcow2";
    m.extensions.backing_format = "qcow2";
    std::vector<std::byte> file = image_of(m);
    Driver d;
    ProbedImage found = d.run(file);
    REQUIRE(d.reads.size() == 2);
    CHECK(d.reads[0].offset == 0);
    CHECK(d.reads[0].length == kHeaderProbeBytes);
    CHECK(d.reads[1].offset == kHeaderProbeBytes);
    CHECK(d.reads[1].length == 65536 - kHeaderProbeBytes);
    CHECK(found.problem == ProbeProblem::none);
    CHECK(found.meta.backing_file == "base.qcow2");
    CHECK(found.meta.extensions.backing_format == "qcow2");
    CHECK(found.snapshots.empty());
}

TEST_CASE("probe: a cluster 0 inside the header read takes one read; a short file is read to its end") {
    ImageMetadata m = metadata(9);
    m.header.l1_size = 32;  // 512-byte clusters: 64 entries per L2 table, 1 MiB needs 32 tables
    std::vector<std::byte> file = image_of(m);
    Driver d;
    CHECK(d.run(file).meta.header.cluster_bits == 9);
    CHECK(d.reads.size() == 1);

    // A file shorter than the header read: the read asks for the file, and a cut header is EIO.
    std::vector<std::byte> tiny(file.begin(), file.begin() + 60);
    ImageProbe probe(tiny.size());
    REQUIRE(probe.next());
    CHECK(probe.next()->length == 60);
    std::string what;
    CHECK(thrown_errno([&] { probe.feed(tiny); }, &what) == EIO);
    CHECK(what.find("truncated") != std::string::npos);
}

TEST_CASE("probe: a small snapshot table comes with one read") {
    Driver d;
    ProbedImage found = d.run(image_of(metadata(), snapshots(3, 10)));
    REQUIRE(d.reads.size() == 3);
    CHECK(d.reads[2].offset == kSnapshotsAt);
    REQUIRE(found.snapshots.size() == 3);
    CHECK(found.snapshots[2].id == "3");
    CHECK(found.snapshots[2].name == std::string(10, 'c'));
}

TEST_CASE("probe: a large snapshot table comes in few reads, each continuing the last") {
    // 400 entries of about 2 KiB: 800 KiB, far more than the first read and than 400 fixed parts.
    std::vector<Snapshot> in = snapshots(400, 2000);
    std::vector<std::byte> file = image_of(metadata(), in);
    Driver d;
    ProbedImage found = d.run(file);
    REQUIRE(found.snapshots.size() == 400);
    CHECK(found.snapshots[399].name == in[399].name);
    std::vector<ProbeRead> table_reads(d.reads.begin() + 2, d.reads.end());
    CHECK(table_reads.size() >= 2);
    CHECK(table_reads.size() <= 6);
    uint64_t at = kSnapshotsAt;
    for (const ProbeRead& r : table_reads) {
        CHECK(r.offset == at);  // nothing read twice
        at += r.length;
    }
    CHECK(at == file.size());  // the file ends with the table: never asked past it
}

TEST_CASE("probe: a snapshot table cut off by the end of the file is EIO naming the entry") {
    std::vector<std::byte> file = image_of(metadata(), snapshots(4, 100));
    file.resize(file.size() - 50);
    Driver d;
    std::string what;
    CHECK(thrown_errno([&] { d.run(file); }, &what) == EIO);
    CHECK(what.find("snapshot table entry 3 truncated") != std::string::npos);
}

TEST_CASE("probe: encryption and an unnamed data file are problems, not parse errors") {
    SUBCASE("encrypted (AES): listed with its size, snapshot table not read") {
        ImageMetadata m = metadata();
        m.header.crypt_method = 1;
        Driver d;
        ProbedImage found = d.run(image_of(m, snapshots(2, 5)));
        CHECK(found.problem == ProbeProblem::encrypted);
        CHECK(found.meta.header.size == uint64_t{1} << 20);
        CHECK(found.snapshots.empty());
        CHECK(d.reads.size() == 2);
        std::string what;
        CHECK(thrown_errno([&] { check_openable(found.problem); }, &what) == ENOTSUP);
        CHECK(what.find(problem_text(ProbeProblem::encrypted)) == 0);
        CHECK(problem_text(found.problem) == "encryption is not supported");
    }
    SUBCASE("external data file bit without a name") {
        ImageMetadata m = metadata();
        m.header.incompatible_features = kIncompatDataFile;
        ProbedImage found = Driver{}.run(image_of(m));
        CHECK(found.problem == ProbeProblem::unnamed_data_file);
        CHECK(thrown_errno([&] { check_openable(found.problem); }) == EIO);
        m.extensions.data_file = "disk.data";
        found = Driver{}.run(image_of(m));
        CHECK(found.problem == ProbeProblem::none);
        CHECK(thrown_errno([&] { check_openable(found.problem); }) == 0);
        CHECK(problem_text(ProbeProblem::none).empty());
    }
}

TEST_CASE("probe: parse errors reach the caller, and a finished probe takes no more bytes") {
    std::vector<std::byte> file = image_of(metadata());
    std::vector<std::byte> bad = file;
    bad[0] = std::byte{0};
    CHECK(thrown_errno([&] { Driver{}.run(bad); }) == EIO);  // bad magic

    ImageProbe probe(file.size());
    while (auto r = probe.next()) probe.feed(std::span(file).subspan(r->offset, r->length));
    CHECK(thrown_errno([&] { probe.feed(file); }) == EINVAL);
}

TEST_CASE("resolve_relative: names are relative to the image's directory, as in QEMU") {
    CHECK(resolve_relative("/images/vm.qcow2", "base.qcow2") == "/images/base.qcow2");
    CHECK(resolve_relative("/images/sub/vm.qcow2", "../base.qcow2") == "/images/sub/../base.qcow2");
    CHECK(resolve_relative("images/vm.qcow2", "base.qcow2") == "images/base.qcow2");
    CHECK(resolve_relative("vm.qcow2", "base.qcow2") == "base.qcow2");  // not "./base.qcow2"
    CHECK(resolve_relative("/vm.qcow2", "base.qcow2") == "/base.qcow2");
    CHECK(resolve_relative("/images/vm.qcow2", "/abs/base.qcow2") == "/abs/base.qcow2");
    CHECK(resolve_relative("/images/vm.qcow2", "").empty());
}
