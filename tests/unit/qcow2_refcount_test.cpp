// Refcounts over images made by qemu-img, with `qemu-img check` as the oracle: allocation, frees,
// refcount blocks and table growth for every refcount width, errors, and crashes at every write.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/refcount.hpp"
#include "test_errors.hpp"
#include "test_host_files.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;
using namespace qcowfs::test::host;

namespace {




/// A fresh qcow2 image from qemu-img.
std::vector<std::byte> make_image(const TempDir& dir, uint64_t cluster_size, unsigned refcount_bits,
                                  const std::string& size = "64M") {
    std::string path = dir.path + "/new.qcow2";
    std::filesystem::remove(path);
    std::string cmd = "qemu-img create -q -f qcow2 -o cluster_size=" + std::to_string(cluster_size) +
                      ",refcount_bits=" + std::to_string(refcount_bits) + " " + path + " " + size;
    REQUIRE(std::system(cmd.c_str()) == 0);
    return read_file(path);
}

struct CheckResult {
    int exit_code = -1;  // 0 clean, 3 leaks only, 2 corruptions
    uint64_t leaks = 0;
    uint64_t corruptions = 0;
    std::string output;
};

uint64_t json_number(const std::string& json, const std::string& key) {
    auto pos = json.find("\"" + key + "\":");
    if (pos == std::string::npos) return 0;
    return std::stoull(json.substr(pos + key.size() + 3));
}

/// Writes the pages given (offset -> bytes) to a file of at least `min_size` bytes (sparse where
/// nothing was written) and runs `qemu-img check` on it.
CheckResult check_pages(const TempDir& dir, const std::map<uint64_t, std::vector<std::byte>>& pages, uint64_t size) {
    std::string path = dir.path + "/check.qcow2";
    std::filesystem::remove(path);
    int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    REQUIRE(fd >= 0);
    for (auto& [off, bytes] : pages) {
        bool zero = std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; });
        if (!zero) REQUIRE(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(off)) == ssize_t(bytes.size()));
    }
    REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
    ::close(fd);
    std::string out = dir.path + "/check.json";
    int status = std::system(("qemu-img check -f qcow2 --output=json " + path + " >" + out + " 2>&1").c_str());
    CheckResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::ifstream in(out);
    r.output.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    r.leaks = json_number(r.output, "leaks");
    r.corruptions = json_number(r.output, "corruptions");
    return r;
}

CheckResult check_bytes(const TempDir& dir, const std::vector<std::byte>& content, uint64_t min_size = 0) {
    std::map<uint64_t, std::vector<std::byte>> pages;
    pages[0] = content;
    return check_pages(dir, pages, std::max<uint64_t>(content.size(), min_size));
}

/// An in-memory file that stores only the pages written (a qcow2 image with 64 KiB clusters and
/// 1-bit refcounts puts its second refcount block at 32 GiB), with MemFile's flush semantics.
class SparseFile final : public io::File {
public:
    static constexpr uint64_t kPage = 4096;
    explicit SparseFile(const std::vector<std::byte>& content) {
        write_sync(0, content);
        durable_ = pages_;
        durable_size_ = size_;
    }
    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        if (offset >= size_) co_return 0;
        size_t n = std::min<uint64_t>(buf.size(), size_ - offset);
        for (size_t done = 0; done < n;) {
            uint64_t page = (offset + done) / kPage, in = (offset + done) % kPage;
            size_t len = std::min<uint64_t>(n - done, kPage - in);
            auto it = pages_.find(page);
            if (it == pages_.end())
                std::memset(buf.data() + done, 0, len);
            else
                std::memcpy(buf.data() + done, it->second.data() + in, len);
            done += len;
        }
        co_return n;
    }
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        write_sync(offset, buf);
        co_return;
    }
    Task<void> flush() override {
        durable_ = pages_;
        durable_size_ = size_;
        co_return;
    }
    uint64_t size() override { return size_; }
    const std::string& name() const override { return name_; }

    /// The content as pages keyed by byte offset, for check_pages.
    std::map<uint64_t, std::vector<std::byte>> pages() const {
        std::map<uint64_t, std::vector<std::byte>> out;
        for (auto& [page, bytes] : pages_) out[page * kPage] = bytes;
        return out;
    }

private:
    void write_sync(uint64_t offset, std::span<const std::byte> buf) {
        for (size_t done = 0; done < buf.size();) {
            uint64_t page = (offset + done) / kPage, in = (offset + done) % kPage;
            size_t len = std::min<uint64_t>(buf.size() - done, kPage - in);
            auto& p = pages_[page];
            p.resize(kPage);
            std::memcpy(p.data() + in, buf.data() + done, len);
            done += len;
        }
        size_ = std::max<uint64_t>(size_, offset + buf.size());
    }
    std::string name_ = "sparse";
    std::map<uint64_t, std::vector<std::byte>> pages_, durable_;
    uint64_t size_ = 0, durable_size_ = 0;
};

format::Header header_of(io::File& file, asio::io_context& io) {
    std::vector<std::byte> probe(format::kHeaderProbeBytes);
    probe.resize(test::run(io, file.read_at(0, probe)));
    return format::parse_header(probe, file.size());
}

/// The image's side of a table move: point the header at the new table, then flush.
void update_header_on_move(qcow2::Refcounts& rc, io::File& file, int* moves = nullptr) {
    rc.on_table_moved = [&file, moves](uint64_t offset, uint32_t clusters) -> Task<void> {
        std::array<std::byte, 12> b;
        format::store_be64(b.data(), offset);
        format::store_be32(b.data() + 8, clusters);
        co_await file.write_at(48, b);
        co_await file.flush();
        if (moves) ++*moves;
    };
}

template <class T>
T run(asio::io_context& io, Task<T> task) {
    return test::run(io, std::move(task));
}

void run_void(asio::io_context& io, Task<void> task) {
    test::run(io, [](Task<void> t) -> Task<int> {
        co_await std::move(t);
        co_return 0;
    }(std::move(task)));
}

}  // namespace

TEST_CASE("allocate, free and reuse for every refcount width and cluster size; qemu-img check agrees") {
    if (!have_qemu()) {
        MESSAGE("qemu-img not found: skipped");
        return;
    }
    TempDir dir;
    for (uint64_t cs : {512u, 4096u, 65536u}) {
        for (unsigned order = 0; order <= 6; ++order) {
            unsigned bits = 1u << order;
            CAPTURE(cs);
            CAPTURE(bits);
            auto image = make_image(dir, cs, bits);
            SparseFile file(image);
            asio::io_context io;
            auto header = header_of(file, io);
            qcow2::Refcounts rc(file, header, 256 * 1024);
            int moves = 0;
            update_header_on_move(rc, file, &moves);
            run_void(io, rc.load());

            // Enough clusters for at least one new refcount block; where the first table covers
            // few enough clusters, enough to outgrow it too.
            uint64_t e = rc.block_entries();
            uint64_t coverage = cs / 8 * e * header.refcount_table_clusters;
            bool grows = coverage <= 65536;
            uint64_t n = grows ? coverage + e : e + 5;
            uint64_t end_before = div_ceil(image.size(), cs);

            std::map<uint64_t, uint64_t> ranges;  // first cluster -> count
            static const uint64_t kChunks[] = {1, 3, 64, 500, 1, 4096, 7};
            uint64_t allocated = 0, end = 0, first_allocation = 0;
            for (size_t i = 0; allocated < n; ++i) {
                uint64_t count = std::min(n - allocated, kChunks[i % 7] * (n > 100000 ? 16 : 1));
                uint64_t first = run(io, rc.allocate(count)).value;
                REQUIRE(first != 0);
                // Disjoint from every earlier allocation.
                auto next = ranges.lower_bound(first);
                if (next != ranges.end()) REQUIRE(first + count <= next->first);
                if (next != ranges.begin()) REQUIRE(std::prev(next)->first + std::prev(next)->second <= first);
                ranges[first] = count;
                if (allocated == 0) first_allocation = first;
                allocated += count;
                end = std::max(end, first + count);
            }
            run_void(io, rc.flush());
            CHECK(moves == (grows ? 1 : 0));
            if (grows) CHECK(rc.table_clusters() > header.refcount_table_clusters);
            // The first allocation reuses nothing: it starts at the end of the file qemu-img made.
            CHECK(first_allocation == end_before);
            const uint64_t old_table = header.refcount_table_offset / cs;
            run_void(io, [&]() -> Task<void> {
                for (auto [first, count] : ranges)
                    for (uint64_t c = first; c < first + count; c += 1 + count / 5) CHECK(co_await rc.get(HostCluster{c}) == 1);
                CHECK(co_await rc.get(HostCluster{0}) == 1);                 // the header
                CHECK(co_await rc.get(HostCluster{end + 2 * e}) == 0);       // far beyond everything
            }());

            // Every allocated cluster is referenced by nothing: exactly n leaks, no corruption. The
            // file is extended over the clusters, as the data written into them would.
            uint64_t file_end = std::max<uint64_t>(file.size(), end * cs);
            auto r = check_pages(dir, file.pages(), file_end);
            CHECK_MESSAGE(r.exit_code == 3, r.output);
            CHECK(r.leaks == n);
            CHECK(r.corruptions == 0);

            // Free them all: clean.
            run_void(io, [&]() -> Task<void> {
                for (auto [first, count] : ranges) co_await rc.update(HostCluster{first}, count, -1);
                co_await rc.flush();
                for (auto [first, count] : ranges) CHECK(co_await rc.get(HostCluster{first + count - 1}) == 0);
            }());
            r = check_pages(dir, file.pages(), file_end);
            CHECK_MESSAGE(r.exit_code == 0, r.output);
            CHECK(r.leaks == 0);
            CHECK(r.corruptions == 0);

            // The freed clusters come back first. A table that moved freed its old cluster, which
            // was then reused for data (free again now) or for a new refcount block (in use).
            bool old_table_free = grows && run(io, rc.get(HostCluster{old_table})) == 0;
            uint64_t again = run(io, rc.allocate(1)).value;
            CHECK(again == (old_table_free ? old_table : end_before));
            CHECK(again * cs < file_end);
        }
    }
}

TEST_CASE("refcount overflow and underflow are EIO and change nothing, for every width") {
    if (!have_qemu()) return;
    TempDir dir;
    for (unsigned order = 0; order <= 6; ++order) {
        CAPTURE(order);
        io::MemFile file("img", make_image(dir, 512, 1u << order, "1M"));
        asio::io_context io;
        qcow2::Refcounts rc(file, header_of(file, io), 64 * 1024);
        run_void(io, rc.load());
        const uint64_t max = format::max_refcount(order);
        uint64_t a = run(io, rc.allocate(3)).value;
        // Raise the last of the three to the maximum (two steps where max does not fit in int64).
        run_void(io, [&]() -> Task<void> {
            uint64_t left = max - 1;
            while (left) {
                int64_t step = static_cast<int64_t>(std::min<uint64_t>(left, INT64_MAX));
                co_await rc.update(HostCluster{a + 2}, 1, step);
                left -= static_cast<uint64_t>(step);
            }
            co_await rc.flush();
        }());
        CHECK(run(io, rc.get(HostCluster{a + 2})) == max);
        auto before = file.content();

        std::string what;
        CHECK(test::thrown_errno([&] { run_void(io, rc.update(HostCluster{a}, 3, 1)); }, &what) == EIO);
        // With 1-bit refcounts 1 is already the maximum, so the first cluster is the one named.
        CHECK(what.find("cluster " + std::to_string(order == 0 ? a : a + 2)) != std::string::npos);
        CHECK(test::thrown_errno([&] { run_void(io, rc.update(HostCluster{a}, 3, -2)); }, &what) == EIO);  // a, a+1 are 1
        CHECK(what.find("cluster " + std::to_string(a)) != std::string::npos);
        CHECK(test::thrown_errno([&] { run_void(io, rc.update(HostCluster{a + 3}, 1, -1)); }) == EIO);    // free cluster
        CHECK(test::thrown_errno([&] { run_void(io, rc.update(HostCluster{100000}, 1, -1)); }) == EIO);   // beyond the table
        if (order == 0) CHECK(test::thrown_errno([&] { run_void(io, rc.update(HostCluster{a + 3}, 1, 2)); }) == EIO);
        CHECK(run(io, rc.get(HostCluster{a})) == 1);
        CHECK(run(io, rc.get(HostCluster{a + 1})) == 1);
        CHECK(run(io, rc.get(HostCluster{a + 2})) == max);
        CHECK(run(io, rc.get(HostCluster{a + 3})) == 0);
        run_void(io, rc.flush());
        CHECK(file.content() == before);

        // Back to 1: qemu-img sees three leaked clusters and nothing worse.
        run_void(io, [&]() -> Task<void> {
            uint64_t left = max - 1;
            while (left) {
                int64_t step = static_cast<int64_t>(std::min<uint64_t>(left, INT64_MAX));
                co_await rc.update(HostCluster{a + 2}, 1, -step);
                left -= static_cast<uint64_t>(step);
            }
            co_await rc.flush();
        }());
        auto r = check_bytes(dir, file.content(), (a + 3) * 512);
        CHECK_MESSAGE(r.exit_code == 3, r.output);
        CHECK(r.leaks == 3);
        CHECK(r.corruptions == 0);
    }
}

TEST_CASE("load rejects a corrupt refcount table") {
    if (!have_qemu()) return;
    TempDir dir;
    auto image = make_image(dir, 4096, 16, "1M");
    asio::io_context io;
    io::MemFile probe("img", image);
    auto header = header_of(probe, io);
    const uint64_t table = header.refcount_table_offset;
    const uint64_t block = format::load_be64(image.data() + table);
    REQUIRE(block != 0);

    auto load_with = [&](uint64_t entry_index, uint64_t value, format::Header h) {
        auto bytes = image;
        format::store_be64(bytes.data() + table + 8 * entry_index, value);
        io::MemFile file("img", bytes);
        qcow2::Refcounts rc(file, h, 64 * 1024);
        return test::thrown_message([&] { run_void(io, rc.load()); });
    };
    CHECK(load_with(0, block, header).empty());
    CHECK(load_with(1, block + 512, header).find("not cluster aligned") != std::string::npos);
    CHECK(load_with(1, 1 << 30, header).find("beyond the end") != std::string::npos);
    CHECK(load_with(0, block | 1, header).find("reserved bits") != std::string::npos);
    auto moved = header;
    moved.refcount_table_offset = 1 << 30;
    CHECK(load_with(0, block, moved).find("beyond the end") != std::string::npos);
    moved.refcount_table_offset = table + 512;
    CHECK(load_with(0, block, moved).find("invalid refcount table offset") != std::string::npos);
}

TEST_CASE("an increase far beyond the table grows it; one spanning whole blocks places them outside") {
    if (!have_qemu()) return;
    TempDir dir;
    SUBCASE("far cluster, 512-byte clusters, 64-bit refcounts") {
        io::MemFile file("img", make_image(dir, 512, 64, "1M"));
        asio::io_context io;
        auto header = header_of(file, io);
        qcow2::Refcounts rc(file, header, 64 * 1024);
        int moves = 0;
        update_header_on_move(rc, file, &moves);
        run_void(io, rc.load());
        const uint64_t far = 10000;  // the first table describes 64 * 64 clusters
        run_void(io, rc.update(HostCluster{far}, 3, 1));
        run_void(io, rc.flush());
        CHECK(moves == 1);
        CHECK(format::load_be64(file.content().data() + 48) == rc.table_offset());
        CHECK(run(io, rc.get(HostCluster{far + 2})) == 1);
        CHECK(run(io, rc.get(HostCluster{header.refcount_table_offset / 512})) == 0);  // the old table is free
        auto r = check_bytes(dir, file.content(), (far + 3) * 512);
        CHECK_MESSAGE(r.exit_code == 3, r.output);
        CHECK(r.leaks == 3);
        CHECK(r.corruptions == 0);
    }
    SUBCASE("a range covering whole unallocated blocks") {
        io::MemFile file("img", make_image(dir, 4096, 64, "1M"));
        asio::io_context io;
        qcow2::Refcounts rc(file, header_of(file, io), 64 * 1024);
        run_void(io, rc.load());
        const uint64_t e = rc.block_entries();  // 512
        run_void(io, rc.update(HostCluster{3 * e}, 2 * e, 1));
        run_void(io, rc.flush());
        for (uint64_t c = 3 * e; c < 5 * e; c += 37) CHECK(run(io, rc.get(HostCluster{c})) == 1);
        auto r = check_bytes(dir, file.content(), 5 * e * 4096);
        CHECK_MESSAGE(r.exit_code == 3, r.output);
        CHECK(r.leaks == 2 * e);
        CHECK(r.corruptions == 0);
    }
}

TEST_CASE("a table that must grow without a header updater fails before writing") {
    if (!have_qemu()) return;
    TempDir dir;
    io::MemFile file("img", make_image(dir, 512, 64, "1M"));
    asio::io_context io;
    qcow2::Refcounts rc(file, header_of(file, io), 64 * 1024);
    run_void(io, rc.load());
    auto before = file.content();
    CHECK(test::thrown_errno([&] { run_void(io, rc.update(HostCluster{10000}, 1, 1)); }) == EIO);
    CHECK(file.content() == before);
}

TEST_CASE("concurrent allocations on one strand never share a cluster") {
    if (!have_qemu()) return;
    TempDir dir;
    io::MemFile mem("img", make_image(dir, 512, 16, "1M"));
    test::PowerCutFile file(mem);
    file.yield_ = true;  // every read waits, so the allocations interleave
    asio::io_context io;
    qcow2::Refcounts rc(file, header_of(file, io), 4096);
    run_void(io, rc.load());
    std::vector<std::pair<uint64_t, uint64_t>> got;
    for (int i = 0; i < 40; ++i)
        asio::co_spawn(io, [&, i]() -> Task<void> {
            uint64_t count = 1 + i % 5;
            got.emplace_back((co_await rc.allocate(count)).value, count);
        }, asio::detached);
    io.restart();
    io.run();
    REQUIRE(got.size() == 40);
    std::set<uint64_t> seen;
    for (auto [first, count] : got)
        for (uint64_t c = first; c < first + count; ++c) CHECK(seen.insert(c).second);
}

TEST_CASE("a power cut at any write or flush leaves at most leaks, never corruption") {
    if (!have_qemu()) return;
    TempDir dir;
    const auto image = make_image(dir, 512, 64, "1M");  // 4096 clusters described by the first table

    // Allocates past the first table (so it moves), frees part, allocates again; flushes between.
    auto scenario = [](qcow2::Refcounts& rc) -> Task<void> {
        co_await rc.load();
        std::vector<std::pair<uint64_t, uint64_t>> ranges;
        for (int i = 0; i < 170; ++i) {
            uint64_t count = 1 + (i * 7) % 60;
            ranges.emplace_back((co_await rc.allocate(count)).value, count);
            if (i % 20 == 19) co_await rc.flush();
        }
        for (size_t i = 0; i < ranges.size(); i += 2) co_await rc.update(HostCluster{ranges[i].first}, ranges[i].second, -1);
        co_await rc.flush();
        for (int i = 0; i < 20; ++i) co_await rc.allocate(1 + i % 9);
        co_await rc.flush();
    };

    // A full run first: how many writes and flushes there are.
    long total = 0;
    {
        io::MemFile mem("img", image);
        test::PowerCutFile file(mem);
        asio::io_context io;
        qcow2::Refcounts rc(file, header_of(file, io), 64 * 1024);
        int moves = 0;
        update_header_on_move(rc, file, &moves);
        run_void(io, scenario(rc));
        CHECK(moves >= 1);
        total = file.ops;
        auto r = check_bytes(dir, mem.content());
        CHECK_MESSAGE((r.exit_code == 0 || r.exit_code == 3), r.output);
        CHECK(r.corruptions == 0);
    }
    REQUIRE(total > 10);
    int checked = 0;
    for (long cut = 0; cut < total; ++cut) {
        CAPTURE(cut);
        io::MemFile mem("img", image);
        test::PowerCutFile file(mem);
        asio::io_context io;
        qcow2::Refcounts rc(file, header_of(file, io), 64 * 1024);
        update_header_on_move(rc, file);
        file.ops_left = cut;
        CHECK(test::thrown_errno([&] { run_void(io, scenario(rc)); }) == EIO);
        mem.crash();
        auto r = check_bytes(dir, mem.content());
        CHECK_MESSAGE((r.exit_code == 0 || r.exit_code == 3), r.output);
        CHECK(r.corruptions == 0);
        ++checked;
    }
    MESSAGE("power cut checked at " << checked << " points");
}

TEST_CASE("the allocator asks placement_check and hands out nothing over metadata") {
    if (!have_qemu()) return;
    TempDir dir;
    io::MemFile file("img", make_image(dir, 512, 16, "1M"));
    asio::io_context io;
    qcow2::Refcounts rc(file, header_of(file, io), 64 * 1024);
    run_void(io, rc.load());
    // The next free cluster, as the allocator would pick it, is declared metadata by the check
    // (as an L1 table whose refcount is 0 would be).
    uint64_t next = run(io, rc.allocate(1)).value;
    run_void(io, rc.update(HostCluster{next}, 1, -1));  // back to 0: the next search starts there
    std::vector<std::pair<uint64_t, uint64_t>> asked;
    rc.placement_check = [&](uint64_t first, uint64_t count) -> std::optional<std::string> {
        asked.emplace_back(first, count);
        if (first <= next && next < first + count) return std::string("the L1 table");
        return std::nullopt;
    };
    std::string what;
    CHECK(test::thrown_errno([&] { run(io, rc.allocate(2)); }, &what) == EIO);
    CHECK(what.find("the L1 table") != std::string::npos);
    CHECK(!rc.placement_problem().empty());
    CHECK(what.find(rc.placement_problem()) != std::string::npos);
    REQUIRE(!asked.empty());
    CHECK(asked.front() == std::make_pair(next, uint64_t{2}));
    CHECK(run(io, rc.get(HostCluster{next})) == 0);  // nothing changed
    CHECK(run(io, rc.get(HostCluster{next + 1})) == 0);
    // Elsewhere the allocator goes on as before.
    rc.placement_check = [&](uint64_t, uint64_t) -> std::optional<std::string> { return std::nullopt; };
    CHECK(run(io, rc.allocate(1)).value == next);
}
