// Refcount rebuild over images made by qemu-img/qemu-io (crashed with lazy refcounts, snapshots,
// compressed and zero clusters, extended L2, bitmaps, external data file, every width and several
// cluster sizes), with `qemu-img check` and `qemu-img convert` as the oracle; corrupt input; power cuts.
#include <doctest/doctest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/snapshot.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/rebuild.hpp"
#include "test_errors.hpp"
#include "test_host_files.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using namespace qcowfs::test::host;

namespace {






struct CheckResult {
    int exit_code = -1;  // 0 clean, 2 corruptions, 3 leaks only
    uint64_t leaks = 0;
    uint64_t corruptions = 0;
    std::string output;
};

uint64_t json_number(const std::string& json, const std::string& key) {
    std::string quoted = "\"";
    quoted.append(key).append("\":");
    auto pos = json.find(quoted);
    if (pos == std::string::npos) return 0;
    return std::stoull(json.substr(pos + quoted.size()));
}

/// `qemu-img check` (read-only: it never repairs, not even a dirty image) of the file at `path`.
CheckResult check(const std::string& path) {
    std::string out = path;
    out.append(".check");
    std::string cmd = "qemu-img check -f qcow2 --output=json ";
    cmd.append(path).append(" >").append(out).append(" 2>&1");
    int status = std::system(cmd.c_str());
    CheckResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::ifstream in(out);
    r.output.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    r.leaks = json_number(r.output, "leaks");
    r.corruptions = json_number(r.output, "corruptions");
    return r;
}

/// The guest content of a qcow2 file, as a raw file next to it (path + ".raw").
std::string convert_raw(const std::string& path) {
    std::string raw = path;
    raw.append(".raw");
    std::string cmd = "qemu-img convert -f qcow2 -O raw ";
    cmd.append(path).append(" ").append(raw);
    REQUIRE(sh(cmd) == 0);
    return raw;
}

bool same_content(const std::string& a, const std::string& b) {
    std::string cmd = "cmp -s ";
    cmd.append(a).append(" ").append(b);
    return sh(cmd) == 0;
}

template <class T>
T run(asio::io_context& io, Task<T> task) {
    return test::run(io, std::move(task));
}

/// Header, extensions and snapshot table of an image file, as the image core has them at open.
struct Opened {
    format::ImageMetadata meta;
    std::vector<format::Snapshot> snapshots;
};

Task<Opened> open_metadata(io::File& file) {
    Opened o;
    std::vector<std::byte> probe(format::kHeaderProbeBytes);
    probe.resize(co_await file.read_at(0, probe));
    format::Header h = format::parse_header(probe, file.size());
    std::vector<std::byte> cluster0(std::min<uint64_t>(h.cluster_size(), file.size()));
    cluster0.resize(co_await file.read_at(0, cluster0));
    o.meta = format::parse_metadata(cluster0, file.size());
    if (h.nb_snapshots != 0) {
        std::vector<std::byte> table(std::min<uint64_t>(format::kMaxSnapshotTableBytes, file.size() - h.snapshots_offset));
        table.resize(co_await file.read_at(h.snapshots_offset, table));
        o.snapshots = format::parse_snapshot_table(table, o.meta.header, file.size());
    }
    co_return o;
}

/// The image core's side of the rebuild, done here by the test: rewrite cluster 0 through
/// parse_metadata / serialize_metadata with the new table and (as the core will once the
/// rebuild succeeded) the dirty bit cleared; sync.
std::function<Task<void>(uint64_t, uint32_t)> header_updater(io::File& file, int* calls = nullptr) {
    return [&file, calls](uint64_t offset, uint32_t clusters) -> Task<void> {
        Opened o = co_await open_metadata(file);
        o.meta.header.refcount_table_offset = offset;
        o.meta.header.refcount_table_clusters = clusters;
        o.meta.header.incompatible_features &= ~format::kIncompatDirty;
        auto cluster0 = format::serialize_metadata(o.meta);
        co_await file.write_at(0, cluster0);
        co_await file.flush();
        if (calls) ++*calls;
    };
}

qcow2::RebuildResult rebuild(io::File& file, asio::io_context& io, int* calls = nullptr,
                             qcow2::ScanLimits limits = {}) {
    return run(io, [&]() -> Task<qcow2::RebuildResult> {
        Opened o = co_await open_metadata(file);
        co_return co_await qcow2::rebuild_refcounts(file, o.meta, o.snapshots, header_updater(file, calls), limits);
    }());
}

/// Rebuilds the refcounts of the image at `path` in memory and checks the result: qemu-img
/// check clean, guest content unchanged. `stale` says the image is known to have wrong
/// refcounts, which the oracle must see first.
void rebuild_and_verify(const TempDir& dir, const std::string& path, bool stale) {
    CAPTURE(path);
    const std::string raw_before = convert_raw(path);
    CheckResult before = check(path);
    if (stale) {
        // The oracle is honest: it sees the stale refcounts of the dirty image (and leaves it alone).
        auto bytes = read_file(path);
        CHECK_MESSAGE(before.exit_code == 2, before.output);
        CHECK(before.corruptions > 0);
        before = check(path);
        CHECK(read_file(path) == bytes);
    }

    const auto file_before = read_file(path);
    // Counters for the whole file at once, and for one refcount block's worth of clusters at a
    // time (as many passes over the metadata as the file has blocks' worth of used clusters).
    for (qcow2::ScanLimits limits : {qcow2::ScanLimits{}, qcow2::ScanLimits{8, uint64_t{1} << 30}}) {
    CAPTURE(limits.counter_bytes);
    io::MemFile file("img", file_before);
    asio::io_context io;
    const uint64_t size_before = file.size();
    int calls = 0;
    auto result = rebuild(file, io, &calls, limits);
    CHECK(calls == 1);

    auto after_bytes = file.content();
    const std::string after = dir / "after.qcow2";
    write_file(after, after_bytes);
    auto r = check(after);
    CHECK_MESSAGE(r.exit_code == 0, r.output);
    CHECK(r.leaks == 0);
    CHECK(r.corruptions == 0);
    CHECK(same_content(raw_before, convert_raw(after)));

    auto header = format::parse_header(after_bytes, after_bytes.size());
    CHECK(header.refcount_table_offset == result.table_offset);
    CHECK(header.refcount_table_clusters == result.table_clusters);
    CHECK(!header.dirty());
    // The new structure lies past the old one (which a crash before the header moved still needs).
    const auto old_header = format::parse_header(file_before, file_before.size());
    CHECK(result.table_offset >= old_header.refcount_table_offset + uint64_t{old_header.refcount_table_clusters} * header.cluster_size());
    CHECK(after_bytes.size() >= size_before);
    CHECK(result.clusters_in_use >= 3);
    CHECK(result.clusters_in_use <= after_bytes.size() / header.cluster_size() + 1);
    }
}

std::string create_cmd(const std::string& path, const std::string& options, const std::string& size = "64M") {
    std::string cmd = "qemu-img create -q -f qcow2 -o ";
    cmd.append(options).append(" ").append(path).append(" ").append(size);
    return cmd;
}

/// qemu-io with the given commands ("-c '...'" each) on an image.
int qemu_io(const std::string& path, const std::vector<std::string>& commands) {
    std::string cmd = "qemu-io -f qcow2";
    for (const auto& c : commands) cmd.append(" -c '").append(c).append("'");
    cmd.append(" ").append(path);
    return sh(cmd);
}

std::string bytes_str(uint64_t n) { return std::to_string(n); }

/// Zeroes every refcount block of a (clean) image file: every cluster's refcount becomes stale.
void zero_refcount_blocks(const std::string& path) {
    auto bytes = read_file(path);
    auto h = format::parse_header(bytes, bytes.size());
    for (uint64_t i = 0; i < uint64_t{h.refcount_table_clusters} * h.cluster_size() / 8; ++i) {
        uint64_t block = format::load_be64(bytes.data() + h.refcount_table_offset + 8 * i);
        if (block != 0 && block < bytes.size()) std::memset(bytes.data() + block, 0, h.cluster_size());
    }
    write_file(path, bytes);
}

}  // namespace

TEST_CASE("rebuild after a crash with lazy refcounts: every refcount width, cluster sizes 512 B to 2 MiB") {
    if (!have_qemu()) {
        MESSAGE("qemu-img/qemu-io not found: skipped");
        return;
    }
    TempDir dir;
    for (uint64_t cs : {512u, 4096u, 65536u, 2u << 20}) {
        for (unsigned bits : {1u, 2u, 4u, 8u, 16u, 32u, 64u}) {
            if (cs == (2u << 20) && bits != 1 && bits != 16 && bits != 64) continue;  // large clusters: slow, few widths
            CAPTURE(cs);
            CAPTURE(bits);
            const std::string path = dir / "lazy.qcow2";
            std::filesystem::remove(path);
            std::string options = "lazy_refcounts=on,cluster_size=";
            options.append(bytes_str(cs)).append(",refcount_bits=").append(bytes_str(bits));
            REQUIRE(sh(create_cmd(path, options)) == 0);
            // Data, compressed clusters (their allocation flushes the refcounts, so they come in the
            // clean session), then in a session that abort()s: zero clusters (plain, and over
            // allocated data, which keeps its host cluster), new data, a partial cluster. The
            // refcounts of the new clusters never reach the disk and the dirty bit stays.
            std::string c = bytes_str(cs);
            REQUIRE(qemu_io(path, {"write -P 5 0 1M", "write -c -P 9 16M " + c, "write -c -P 10 24M " + c}) == 0);
            int rc = qemu_io(path, {"write -z 0 " + c, "write -z 8M 64k", "write -P 8 1M 1M", "write -P 6 3M 1k",
                                    "write -P 11 20M 300k", "write -P 7 40M 64k", "abort"});
            REQUIRE(rc != 0);  // aborted
            auto h = format::parse_header(read_file(path), std::filesystem::file_size(path));
            REQUIRE(h.dirty());
            rebuild_and_verify(dir, path, true);
        }
    }
}

TEST_CASE("rebuild with extended L2: subclusters, zero and preallocated zero subclusters, compressed") {
    if (!have_qemu()) return;
    TempDir dir;
    for (uint64_t cs : {16384u, 65536u, 2u << 20}) {
        CAPTURE(cs);
        const std::string path = dir / "ext.qcow2";
        std::filesystem::remove(path);
        std::string options = "lazy_refcounts=on,extended_l2=on,cluster_size=";
        options.append(bytes_str(cs));
        REQUIRE(sh(create_cmd(path, options)) == 0);
        std::string c = bytes_str(cs), sub = bytes_str(cs / 32);
        REQUIRE(qemu_io(path, {"write -P 1 " + sub + " " + sub, "write -P 2 4M 1M", "write -c -P 4 12M " + c}) == 0);
        REQUIRE(qemu_io(path, {"write -z " + c + " " + sub, "write -z 4M " + c, "write -P 3 10M " + sub,
                               "write -P 5 7M 1M", "abort"}) != 0);
        rebuild_and_verify(dir, path, true);
    }
}

TEST_CASE("rebuild with internal snapshots: shared L2 tables and data clusters, snapshot extra data") {
    if (!have_qemu()) return;
    TempDir dir;
    for (unsigned bits : {2u, 16u, 64u}) {
        for (uint64_t cs : {512u, 65536u}) {
            CAPTURE(bits);
            CAPTURE(cs);
            const std::string path = dir / "snap.qcow2";
            std::filesystem::remove(path);
            std::string options = "lazy_refcounts=on,cluster_size=";
            options.append(bytes_str(cs)).append(",refcount_bits=").append(bytes_str(bits));
            REQUIRE(sh(create_cmd(path, options)) == 0);
            REQUIRE(qemu_io(path, {"write -P 1 0 2M", "write -c -P 2 8M " + bytes_str(cs)}) == 0);
            std::string snap = "qemu-img snapshot -c s1 ";
            REQUIRE(sh(snap.append(path)) == 0);
            REQUIRE(qemu_io(path, {"write -P 3 1M 64k", "write -P 4 6M 64k"}) == 0);
            snap = "qemu-img snapshot -c s2 ";
            REQUIRE(sh(snap.append(path)) == 0);
            // Copy-on-write out of the shared clusters, new clusters, a discard: refcounts left stale.
            REQUIRE(qemu_io(path, {"write -P 5 0 512k", "write -P 6 6M 4k", "discard 1536k 256k",
                                   "write -P 7 30M 128k", "abort"}) != 0);
            rebuild_and_verify(dir, path, true);
        }
    }
}

TEST_CASE("rebuild with persistent bitmaps: directory, tables and data clusters are counted") {
    if (!have_qemu()) return;
    TempDir dir;
    for (uint64_t cs : {512u, 65536u}) {
        CAPTURE(cs);
        const std::string path = dir / "bitmaps.qcow2";
        std::filesystem::remove(path);
        std::string options = "cluster_size=";
        options.append(bytes_str(cs));
        REQUIRE(sh(create_cmd(path, options)) == 0);
        std::string add = "qemu-img bitmap --add ";
        REQUIRE(sh(add + path + " b0") == 0);
        REQUIRE(sh(add + "-g 512 " + path + " b1") == 0);  // a bitmap table of several entries
        // Writes with the bitmaps enabled: QEMU stores them with data clusters on close.
        REQUIRE(qemu_io(path, {"write -P 1 0 1M", "write -P 2 40M 64k"}) == 0);
        // Stale refcounts the hard way: every refcount block emptied.
        zero_refcount_blocks(path);
        rebuild_and_verify(dir, path, true);
    }
    SUBCASE("bitmaps extension with the autoclear bit clear: QEMU ignores it, so its clusters are free") {
        const std::string path = dir / "bitmaps-ignored.qcow2";
        REQUIRE(sh(create_cmd(path, "cluster_size=4096")) == 0);
        REQUIRE(sh("qemu-img bitmap --add " + path + " b0") == 0);
        REQUIRE(qemu_io(path, {"write -P 1 0 1M"}) == 0);
        auto bytes = read_file(path);
        auto h = format::parse_header(bytes, bytes.size());
        auto meta = format::parse_metadata(std::span(bytes).first(h.cluster_size()), bytes.size());
        meta.header.autoclear_features &= ~format::kAutoclearBitmaps;
        auto cluster0 = format::serialize_metadata(meta);
        std::copy(cluster0.begin(), cluster0.end(), bytes.begin());
        write_file(path, bytes);
        CHECK(check(path).leaks >= 3);  // directory, table, data cluster: referenced by nothing QEMU uses
        zero_refcount_blocks(path);
        rebuild_and_verify(dir, path, true);
    }
    SUBCASE("a crash with lazy refcounts while bitmaps are in use") {
        const std::string path = dir / "bitmaps-lazy.qcow2";
        REQUIRE(sh(create_cmd(path, "lazy_refcounts=on")) == 0);
        REQUIRE(sh("qemu-img bitmap --add " + path + " b0") == 0);
        REQUIRE(qemu_io(path, {"write -P 1 0 1M"}) == 0);
        REQUIRE(qemu_io(path, {"write -P 2 4M 1M", "abort"}) != 0);
        rebuild_and_verify(dir, path, true);
    }
}

TEST_CASE("rebuild with an external data file counts no data clusters") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = dir / "ext-data.qcow2";
    // An absolute data file name: the copy the oracle checks uses the same data file.
    std::string options = "lazy_refcounts=on,data_file=";
    options.append(dir / "data.raw");
    REQUIRE(sh(create_cmd(path, options)) == 0);
    REQUIRE(qemu_io(path, {"write -P 1 0 2M", "write -P 2 40M 64k", "abort"}) != 0);
    // The data clusters need no refcounts and the L2 tables' reached the disk: stale them by hand.
    zero_refcount_blocks(path);
    rebuild_and_verify(dir, path, true);
}

TEST_CASE("rebuild of a consistent image keeps it consistent, twice in a row") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = dir / "clean.qcow2";
    REQUIRE(sh(create_cmd(path, "cluster_size=4096,refcount_bits=8")) == 0);
    REQUIRE(qemu_io(path, {"write -P 1 0 3M", "write -c -P 2 8M 4k"}) == 0);
    REQUIRE(sh("qemu-img snapshot -c s1 " + path) == 0);
    rebuild_and_verify(dir, path, false);
    // Again on the result: the old structure (now the rebuilt one) is skipped over once more.
    std::filesystem::copy_file(dir / "after.qcow2", dir / "again.qcow2");
    rebuild_and_verify(dir, dir / "again.qcow2", false);
}

TEST_CASE("rebuild refuses inconsistent metadata with EIO and writes nothing") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = dir / "bad.qcow2";
    REQUIRE(sh(create_cmd(path, "cluster_size=4096,lazy_refcounts=on")) == 0);
    REQUIRE(qemu_io(path, {"write -P 1 0 64k"}) == 0);
    const auto image = read_file(path);
    const auto h = format::parse_header(image, image.size());
    REQUIRE(image.size() % 4096 == 0);
    const uint64_t l2 = format::load_be64(image.data() + h.l1_table_offset) & format::kL1OffsetMask;
    REQUIRE(l2 != 0);

    auto expect_eio = [&](const std::vector<std::byte>& bytes, const std::string& words) {
        CAPTURE(words);
        io::MemFile file("img", bytes);
        asio::io_context io;
        int calls = 0;
        std::string what;
        CHECK(test::thrown_errno([&] { rebuild(file, io, &calls); }, &what) == EIO);
        CHECK_MESSAGE(what.find(words) != std::string::npos, what);
        CHECK(calls == 0);
        CHECK(file.content() == bytes);
    };

    SUBCASE("an L2 entry pointing past the end of the file") {
        auto bytes = image;
        format::store_be64(bytes.data() + l2 + 8 * 3, format::encode_l2_standard(image.size() + (1 << 20), true, false));
        expect_eio(bytes, "beyond the end");
        expect_eio(bytes, "entry 3: data cluster at " + hex(image.size() + (1 << 20)));
    }
    SUBCASE("a compressed cluster past the end of the file") {
        auto bytes = image;
        format::store_be64(bytes.data() + l2 + 8 * 20, format::encode_l2_compressed(image.size() + 4096 + 100, 700, 12));
        expect_eio(bytes, "beyond the end");
        expect_eio(bytes, "entry 20: compressed cluster at");
    }
    SUBCASE("a compressed cluster inside cluster 0, the header") {
        auto bytes = image;
        format::store_be64(bytes.data() + l2 + 8 * 5, format::encode_l2_compressed(100, 700, 12));
        expect_eio(bytes, "header cluster");
    }
    SUBCASE("an L2 table cut short by the end of the file") {
        auto bytes = image;
        format::store_be64(bytes.data() + h.l1_table_offset + 8, format::encode_l1({image.size(), true}));
        bytes.resize(bytes.size() + 1000);  // the L2 table's cluster starts at the old end: 1000 bytes of it
        expect_eio(bytes, "cut off");
    }
    SUBCASE("a refcount overflowing the width") {
        const std::string snap = dir / "overflow.qcow2";
        REQUIRE(sh(create_cmd(snap, "cluster_size=4096,refcount_bits=2")) == 0);
        REQUIRE(qemu_io(snap, {"write -P 1 0 64k"}) == 0);
        REQUIRE(sh("qemu-img snapshot -c s1 " + snap) == 0);
        auto bytes = read_file(snap);
        // The same image read as 1-bit refcounts: the shared clusters have 2 references.
        bytes[99] = std::byte{0};  // refcount_order (big-endian 32-bit field at 96)
        expect_eio(bytes, "references, more than a 1-bit refcount holds");
    }
}

TEST_CASE("a power cut at any write or flush of a rebuild leaves the old dirty image or the new clean one") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = dir / "cut.qcow2";
    // 512-byte clusters and 64-bit refcounts: many refcount blocks, several table clusters.
    REQUIRE(sh(create_cmd(path, "lazy_refcounts=on,cluster_size=512,refcount_bits=64")) == 0);
    REQUIRE(qemu_io(path, {"write -P 1 0 2M", "write -c -P 3 8M 512"}) == 0);
    REQUIRE(qemu_io(path, {"write -P 2 1M 2M", "abort"}) != 0);
    const auto image = read_file(path);
    const std::string raw_before = convert_raw(path);
    const CheckResult stale = check(path);
    REQUIRE(stale.exit_code == 2);

    long total = 0;
    {
        io::MemFile mem("img", image);
        test::PowerCutFile file(mem);
        asio::io_context io;
        rebuild(file, io);
        total = file.ops;
    }
    REQUIRE(total >= 4);  // blocks, table, flush, header write, flush
    int old_images = 0, new_images = 0;
    auto verify = [&](const std::vector<std::byte>& bytes, bool crashed) {
        CAPTURE(crashed);
        const std::string after = dir / "after-cut.qcow2";
        write_file(after, bytes);
        auto h = format::parse_header(bytes, bytes.size());
        auto r = check(after);
        if (h.dirty()) {  // the old image, as stale as before: its structures were not touched
            ++old_images;
            CHECK(h.refcount_table_offset == format::parse_header(image, image.size()).refcount_table_offset);
            if (crashed) CHECK(std::equal(image.begin(), image.end(), bytes.begin()));
            CHECK(r.exit_code == 2);
            CHECK(r.corruptions == stale.corruptions);
            CHECK(r.leaks == stale.leaks);
        } else {
            ++new_images;
            CHECK_MESSAGE(r.exit_code == 0, r.output);
        }
        CHECK(same_content(raw_before, convert_raw(after)));
    };
    // Cut after `cut` writes and flushes; cut == total is the run that completes.
    for (long cut = 0; cut <= total; ++cut) {
        CAPTURE(cut);
        io::MemFile mem("img", image);
        test::PowerCutFile file(mem);
        file.ops_left = cut;
        asio::io_context io;
        CHECK(test::thrown_errno([&] { rebuild(file, io); }) == (cut < total ? EIO : 0));
        verify(mem.content(), false);  // every write before the cut landed
        mem.crash();
        verify(mem.content(), true);   // only what was flushed survived
    }
    CHECK(old_images >= 2 * total - 1);
    CHECK(new_images >= 2);
    MESSAGE("power cut checked at " << total + 1 << " points, before and after the crash: " << old_images << " old, " << new_images << " new");
}

TEST_CASE("rebuild time and memory scale with the file: a measured run") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = dir / "big.qcow2";
    REQUIRE(sh(create_cmd(path, "lazy_refcounts=on,cluster_size=512,refcount_bits=16", "1G")) == 0);
    REQUIRE(qemu_io(path, {"write -P 1 0 48M", "write -P 2 512M 16M", "abort"}) != 0);
    io::MemFile file("img", read_file(path));
    asio::io_context io;
    auto t0 = std::chrono::steady_clock::now();
    auto result = rebuild(file, io);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    MESSAGE("rebuild of a " << file.size() / (1 << 20) << " MiB image with 512-byte clusters: " << ms << " ms, "
                            << result.clusters_in_use << " clusters in use, table of " << result.table_clusters
                            << " clusters");
    write_file(dir / "big-after.qcow2", file.content());
    auto r = check(dir / "big-after.qcow2");
    CHECK_MESSAGE(r.exit_code == 0, r.output);
}

TEST_CASE("a rebuild that would read more metadata than the scan limit stops with ECANCELED, nothing written") {
    if (!have_qemu()) return;
    TempDir dir;
    const std::string path = dir / "big.qcow2";
    REQUIRE(sh(create_cmd(path, "lazy_refcounts=on,cluster_size=512")) == 0);
    REQUIRE(qemu_io(path, {"write -P 1 0 1M", "write -P 2 32M 1M", "abort"}) != 0);
    const auto before = read_file(path);
    io::MemFile file("img", before);
    asio::io_context io;
    int calls = 0;
    CHECK(test::thrown_errno([&] { rebuild(file, io, &calls, qcow2::ScanLimits{32u << 20, 64 * 1024}); }) == ECANCELED);
    CHECK(calls == 0);
    CHECK(file.content() == before);
}
