// Copy-on-read and fallocate's populate over backing chains made by qemu-img: what is copied and how
// often, a slow base read once, races with writes, read-only and snapshot views left alone, and
// qemu-img map / check / compare (after detaching the base) as the oracle.
#include <doctest/doctest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <regex>
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
constexpr uint64_t MiB = 1024 * KiB;

/// A host file that records every read and write and can make each read wait (a slow base) or
/// each write (a slow overlay).
class CountingFile final : public io::File {
public:
    CountingFile(std::unique_ptr<io::File> inner, std::chrono::microseconds delay,
                 std::chrono::microseconds write_delay = {})
        : inner_(std::move(inner)), delay_(delay), write_delay_(write_delay) {}
    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        if (delay_.count()) {
            asio::steady_timer t(co_await asio::this_coro::executor, delay_);
            co_await t.async_wait(asio::use_awaitable);
        }
        reads.emplace_back(offset, buf.size());
        co_return co_await inner_->read_at(offset, buf);
    }
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        if (write_delay_.count()) {
            asio::steady_timer t(co_await asio::this_coro::executor, write_delay_);
            co_await t.async_wait(asio::use_awaitable);
        }
        writes.emplace_back(offset, buf.size());
        co_await inner_->write_at(offset, buf);
    }
    Task<void> flush() override { co_await inner_->flush(); }
    Task<void> discard(uint64_t offset, uint64_t length) override { co_await inner_->discard(offset, length); }
    Task<void> allocate(uint64_t offset, uint64_t length) override { co_await inner_->allocate(offset, length); }
    Task<void> truncate(uint64_t size) override { co_await inner_->truncate(size); }
    uint64_t size() override { return inner_->size(); }
    std::pair<bool, uint64_t> data_run(uint64_t offset) override { return inner_->data_run(offset); }
    const std::string& name() const override { return inner_->name(); }
    void set_lock(io::LockMode mode) override {
        inner_->set_lock(mode);
        lock_mode_ = mode;
    }

    /// Bytes written by writes of at least `min` bytes (data clusters, not metadata).
    uint64_t written(uint64_t min) const {
        uint64_t n = 0;
        for (auto [off, len] : writes) n += len >= min ? len : 0;
        return n;
    }

    std::vector<std::pair<uint64_t, uint64_t>> reads, writes;  // (offset, length)

private:
    std::unique_ptr<io::File> inner_;
    std::chrono::microseconds delay_;
    std::chrono::microseconds write_delay_;
};

/// Runs `tasks` at once on the current executor and returns when all have finished (the first
/// failure is rethrown).
Task<void> all_of(std::vector<Task<void>> tasks) {
    auto ex = co_await asio::this_coro::executor;
    auto left = std::make_shared<size_t>(tasks.size());  // counted before any starts
    auto done = std::make_shared<AsyncEvent>(ex);
    auto error = std::make_shared<std::exception_ptr>();
    for (auto& t : tasks)
        asio::co_spawn(ex, std::move(t), [left, done, error](std::exception_ptr e) {
            if (e && !*error) *error = e;
            if (--*left == 0) done->set();
        });
    if (!tasks.empty()) co_await done->wait();
    if (*error) std::rethrow_exception(*error);
}

/// A chain base.* <- [mid.qcow2 <-] top.qcow2 in a temporary directory, opened as a Disk whose
/// files are CountingFiles.
struct Chain {
    TempDir dir{"cor"};
    asio::io_context io;
    std::map<std::string, CountingFile*> files;  // by file name, as last opened
    std::chrono::microseconds base_delay{0};     // every read of a file other than top.qcow2 waits this long
    std::chrono::microseconds top_write_delay{0};  // every write of top.qcow2 waits this long
    uint64_t size = 8 * MiB;

    void sh_ok(const std::string& cmd) {
        std::string out;
        REQUIRE_MESSAGE(sh("cd " + dir.path + " && " + cmd, &out) == 0, (cmd + ": " + out));
    }
    std::string out_of(const std::string& cmd) {
        std::string out;
        CHECK_MESSAGE(sh("cd " + dir.path + " && " + cmd, &out) == 0, (cmd + ": " + out));
        return out;
    }
    /// base.qcow2 (or base.raw) with data, a zero cluster and holes; then the overlays.
    void make(const std::string& base_options = "-o cluster_size=64k", const std::string& top_options = "-o cluster_size=64k",
              bool raw_base = false, bool compressed_base = false, bool mid = false, uint64_t top_size = 0) {
        const std::string s = std::to_string(size);
        const std::string base = raw_base ? "base.raw" : "base.qcow2";
        const std::string fmt = raw_base ? "raw" : "qcow2";
        if (raw_base)
            sh_ok("truncate -s " + s + " base.raw");
        else
            sh_ok("qemu-img create -f qcow2 " + base_options + " base.qcow2 " + s);
        sh_ok("qemu-io -f " + fmt + " -c 'write -P 0x5a 0 1M' -c 'write -P 0x3c 3M 100k' -c 'write -P 0x77 " +
              std::to_string(size - 200 * KiB) + " 200k' -c 'write -z 1M 64k' " + base);
        if (compressed_base) {
            sh_ok("qemu-img convert -c -O qcow2 " + base_options + " base.qcow2 base-c.qcow2 && mv base-c.qcow2 base.qcow2");
        }
        std::string below = base, below_fmt = fmt;
        if (mid) {
            sh_ok("qemu-img create -f qcow2 -o cluster_size=32k -b " + base + " -F " + fmt + " mid.qcow2 " + s);
            sh_ok("qemu-io -c 'write -P 0x11 512k 100k' -c 'write -P 0x12 5M 64k' mid.qcow2");
            below = "mid.qcow2", below_fmt = "qcow2";
        }
        sh_ok("qemu-img create -f qcow2 " + top_options + " -b " + below + " -F " + below_fmt + " top.qcow2 " +
              std::to_string(top_size ? top_size : size));
        // A cluster of the overlay's own, which copy-on-read must leave as it is.
        sh_ok("qemu-io -c 'write -P 0xee 128k 8k' top.qcow2");
        sh_ok("qemu-img convert -O raw top.qcow2 chain.raw");
    }
    std::unique_ptr<qcow2::Disk> open(bool writable = true, size_t pending = 32 * MiB) {
        qcow2::OpenOptions o;
        o.opener = [this](const std::string& path, bool w) -> std::unique_ptr<io::File> {
            const std::string name = path.substr(path.rfind('/') + 1);
            const bool top = name == "top.qcow2";
            auto f = std::make_unique<CountingFile>(io::open_file(io.get_executor(), path, w),
                                                    top ? std::chrono::microseconds{0} : base_delay,
                                                    top ? top_write_delay : std::chrono::microseconds{0});
            files[name] = f.get();
            return f;
        };
        o.writable = writable;
        o.copy_on_read_pending_bytes = pending;
        auto disk = run(qcow2::Disk::open(dir / "top.qcow2", o, {}));
        disk->set_copy_on_read(true);
        return disk;
    }
    template <class T>
    T run(Task<T> task) {
        return test::run(io, std::move(task));
    }
    /// Reads [0, disk size) through `disk`'s active view in pieces of `step`, `parallel` pieces
    /// in flight, and returns the bytes; then waits for the copies.
    std::vector<std::byte> read_all(qcow2::Disk& disk, uint64_t step, int parallel = 1) {
        const uint64_t n = disk.size();
        std::vector<std::byte> out(n);
        auto view = run(disk.view(""));
        run([&]() -> Task<void> {
            for (uint64_t at = 0; at < n; at += step * parallel) {
                std::vector<Task<void>> reads;
                for (int k = 0; k < parallel && at + k * step < n; ++k) {
                    const uint64_t off = at + k * step, len = std::min(step, n - off);
                    reads.push_back(disk.read(*view, off, std::span(out).subspan(off, len)));
                }
                co_await all_of(std::move(reads));
            }
            co_await disk.image().copies_done();
        }());
        return out;
    }
    /// Closes the disk (waits for copies, flushes, leaves the image clean).
    void close(std::unique_ptr<qcow2::Disk>& disk) {
        run(disk->write_back());
        run(disk->close());
        disk.reset();
    }
    /// The (start, length) of every range qemu-img map calls data that lies below top.qcow2.
    std::vector<std::pair<uint64_t, uint64_t>> data_below_top() {
        std::string map = out_of("qemu-img map --output=json top.qcow2");
        std::vector<std::pair<uint64_t, uint64_t>> below;
        static const std::regex entry(R"re("start": (\d+), "length": (\d+), "depth": (\d+),.*"data": (true|false))re");
        for (auto it = std::sregex_iterator(map.begin(), map.end(), entry); it != std::sregex_iterator(); ++it) {
            const auto& m = *it;
            if (m[4] == "true" && m[3] != "0") below.emplace_back(std::stoull(m[1]), std::stoull(m[2]));
        }
        return below;
    }
    void expect_check_clean() {
        std::string out;
        CHECK_MESSAGE(sh("cd " + dir.path + " && qemu-img check top.qcow2", &out) == 0, out);
    }
    /// After the disk is closed: every range with data in the chain is allocated in top.qcow2,
    /// qemu-img check is clean, and with the base detached top.qcow2 reads as the chain did.
    void expect_populated(const std::string& what) {
        auto below = data_below_top();
        CHECK_MESSAGE(below.empty(), (what + ": data left below the overlay, first at " +
                                      (below.empty() ? std::string() : std::to_string(below[0].first))));
        std::string out;
        CHECK_MESSAGE(sh("cd " + dir.path + " && qemu-img check top.qcow2", &out) == 0, (what + ": " + out));
        sh_ok("qemu-img rebase -u -b '' top.qcow2");
        CHECK_MESSAGE(sh("cd " + dir.path + " && qemu-img compare -F raw top.qcow2 chain.raw", &out) == 0, (what + ": " + out));
    }
};

/// Every byte of the base file that data reads (of at least a cluster) touched more than once.
uint64_t bytes_read_twice(const CountingFile& f, uint64_t from) {
    std::map<uint64_t, int> seen;  // 512-byte sector -> reads
    uint64_t twice = 0;
    for (auto [off, len] : f.reads) {
        if (len < 64 * KiB || off < from) continue;
        for (uint64_t s = off / 512; s < (off + len + 511) / 512; ++s)
            if (++seen[s] == 2) twice += 512;
    }
    return twice;
}

}  // namespace

TEST_CASE("copy-on-read fills the overlay from every kind of chain; the base can then be detached") {
    if (!have_qemu()) return;
    struct Variant {
        const char* name;
        std::string base, top;
        bool raw = false, compressed = false, mid = false;
        uint64_t top_size = 0;
        uint64_t step = 64 * KiB;
        int parallel = 1;
    };
    const Variant variants[] = {
        {"two levels, aligned reads", "-o cluster_size=64k", "-o cluster_size=64k"},
        {"two levels, unaligned parallel reads", "-o cluster_size=64k", "-o cluster_size=64k", false, false, false, 0,
         96 * KiB + 512, 6},
        {"three levels", "-o cluster_size=64k", "-o cluster_size=64k", false, false, true, 0, 128 * KiB, 3},
        {"compressed base", "-o cluster_size=64k", "-o cluster_size=64k", false, true},
        {"extended L2 overlay, partial subclusters", "-o cluster_size=64k",
         "-o cluster_size=64k,extended_l2=on", false, false, false, 0, 3 * KiB, 8},
        {"raw base", "", "-o cluster_size=64k", true, false, false, 0, 256 * KiB, 2},
        {"small base clusters, big overlay clusters", "-o cluster_size=4k", "-o cluster_size=256k", false, false, false, 0,
         100 * KiB, 4},
        {"big base clusters, small overlay clusters", "-o cluster_size=1M", "-o cluster_size=16k"},
        {"overlay larger than the base", "-o cluster_size=64k", "-o cluster_size=64k", false, false, false, 12 * MiB},
        {"overlay smaller than the base", "-o cluster_size=64k", "-o cluster_size=64k", false, false, false, 5 * MiB},
    };
    for (const Variant& v : variants) {
        CAPTURE(v.name);
        Chain c;
        c.make(v.base, v.top, v.raw, v.compressed, v.mid, v.top_size);
        auto disk = c.open();
        auto got = c.read_all(*disk, v.step, v.parallel);
        CHECK_MESSAGE(got == read_file(c.dir / "chain.raw"), v.name);
        CHECK(disk->image().copy_stats().copied_bytes > 0);
        // A second pass reads everything from the overlay.
        const size_t base_reads = c.files.count("base.qcow2") ? c.files["base.qcow2"]->reads.size() : 0;
        c.read_all(*disk, v.step, v.parallel);
        if (c.files.count("base.qcow2")) CHECK_MESSAGE(c.files["base.qcow2"]->reads.size() == base_reads, v.name);
        c.close(disk);
        c.expect_populated(v.name);
    }
}

TEST_CASE("copy-on-read: a slow base is read once per cluster, and reads racing on a range copy it once") {
    if (!have_qemu()) return;
    Chain c;
    c.base_delay = std::chrono::microseconds(1500);
    c.make();
    auto disk = c.open();
    // Sequential reads, one at a time.
    auto got = c.read_all(*disk, 64 * KiB);
    CHECK(got == read_file(c.dir / "chain.raw"));
    CHECK(bytes_read_twice(*c.files["base.qcow2"], 64 * KiB) == 0);

    // Eight readers of one fresh range at once: one copy, one host write of its data.
    c.close(disk);
    Chain d;
    d.base_delay = std::chrono::microseconds(1500);
    d.make();
    disk = d.open();
    auto view = d.run(disk->view(""));
    const uint64_t off = 3 * MiB, len = 128 * KiB;  // base clusters with data (0x3c for 100k)
    const uint64_t before = d.files["top.qcow2"]->written(64 * KiB);
    std::vector<std::vector<std::byte>> bufs(8, std::vector<std::byte>(len));
    d.run([&]() -> Task<void> {
        std::vector<Task<void>> reads;
        for (auto& b : bufs) reads.push_back(disk->read(*view, off, b));
        co_await all_of(std::move(reads));
        co_await disk->image().copies_done();
    }());
    for (auto& b : bufs) CHECK(b == bufs[0]);
    CHECK(disk->image().copy_stats().copied_bytes == len);
    CHECK(d.files["top.qcow2"]->written(64 * KiB) - before == len);
    d.close(disk);
    auto below = d.data_below_top();
    // Plain variables: clang 14 cannot capture structured bindings in doctest's lambdas.
    for (const auto& range : below) {
        const uint64_t start = range.first, end = range.first + range.second;
        CHECK_MESSAGE((end <= off || start >= off + len), start);
    }
}

TEST_CASE("copy-on-read: a close right after a read still finishes every copy the read started") {
    // `cat` closes the file as soon as its last read returns: the close must not drop the copies
    // of that read (it turns copy-on-read off for new reads, then waits for the running ones).
    if (!have_qemu()) return;
    Chain c;
    c.make();
    auto disk = c.open();
    auto view = c.run(disk->view(""));
    std::vector<std::byte> buf(1 * MiB);  // two runs from the base: [0, 128k) and [192k, 1M)
    c.run([&]() -> Task<void> {
        co_await disk->read(*view, 0, buf);
        co_await disk->write_back();
        co_await disk->close();
    }());
    disk.reset();
    for (const auto& range : c.data_below_top()) {
        const uint64_t start = range.first;
        CHECK_MESSAGE(start >= 1 * MiB, start);
    }
    c.expect_check_clean();
}

TEST_CASE("copy-on-read never overwrites a write that got there first, nor one that came after") {
    if (!have_qemu()) return;
    Chain c;
    c.base_delay = std::chrono::microseconds(500);
    c.make("-o cluster_size=64k", "-o cluster_size=64k,extended_l2=on");
    auto disk = c.open();
    auto view = c.run(disk->view(""));
    auto expected = read_file(c.dir / "chain.raw");
    const auto mine = test::bytes_of(0xab, 4 * KiB);
    c.run([&]() -> Task<void> {
        std::vector<std::byte> buf(192 * KiB);
        // The read's copy is started but has not run when the write takes the range.
        co_await disk->image().active()->read(0, buf);
        co_await disk->image().write(10 * KiB, mine);
        // A read whose copy runs while a write to its range waits (the write comes after).
        co_await disk->image().active()->read(256 * KiB, buf);
        asio::co_spawn(co_await asio::this_coro::executor, disk->image().write(300 * KiB, mine), asio::detached);
        co_await disk->image().copies_done();
    }());
    std::memcpy(expected.data() + 10 * KiB, mine.data(), mine.size());
    std::memcpy(expected.data() + 300 * KiB, mine.data(), mine.size());
    CHECK(c.read_all(*disk, 64 * KiB) == expected);
    c.close(disk);
    c.expect_check_clean();
}

TEST_CASE("copy-on-read leaves read-only images and snapshots alone, and can be turned off") {
    if (!have_qemu()) return;
    Chain c;
    c.make();
    c.sh_ok("qemu-img snapshot -c snap1 top.qcow2");
    const auto image_before = read_file(c.dir / "top.qcow2");

    auto disk = c.open(false);
    CHECK(c.read_all(*disk, 64 * KiB) == read_file(c.dir / "chain.raw"));
    CHECK(c.files["top.qcow2"]->writes.empty());
    c.close(disk);

    disk = c.open();
    auto snap = c.run(disk->view("1"));
    std::vector<std::byte> buf(1 * MiB);
    c.run(disk->read(*snap, 0, buf));
    c.run(disk->image().copies_done());
    CHECK(disk->image().copy_stats().copied_bytes == 0);

    disk->set_copy_on_read(false);
    c.read_all(*disk, 64 * KiB);
    CHECK(disk->image().copy_stats().copied_bytes == 0);
    CHECK(c.files["top.qcow2"]->writes.empty());
    c.close(disk);
    CHECK(read_file(c.dir / "top.qcow2") == image_before);
}

TEST_CASE("copy-on-read skips reads when too much is pending, and still reads right") {
    if (!have_qemu()) return;
    Chain c;
    c.make();
    // Writes of the overlay (small ones reach the page cache without waiting) are slow, so the
    // copies of 8 reads in flight pile up.
    c.top_write_delay = std::chrono::milliseconds(2);
    auto disk = c.open(true, 64 * KiB);
    CHECK(c.read_all(*disk, 64 * KiB, 8) == read_file(c.dir / "chain.raw"));
    CHECK(disk->image().copy_stats().skipped_bytes > 0);
    CHECK(disk->image().copy_stats().copied_bytes > 0);
    c.close(disk);
    c.expect_check_clean();
}

TEST_CASE("fallocate mode 0 copies the chain's data into the overlay in one pass, skipping allocated clusters") {
    if (!have_qemu()) return;
    Chain c;
    c.make();
    auto disk = c.open();
    disk->set_copy_on_read(false);
    auto& top = *c.files["top.qcow2"];
    const uint64_t before = top.written(64 * KiB);
    const size_t writes_before = top.writes.size();
    c.run(disk->fill(qcow2::Fill::allocate, 0, 4 * MiB, false));
    // [0, 4M) less the overlay's own cluster at 128k, in a few large writes.
    CHECK(top.written(64 * KiB) - before == 4 * MiB - 64 * KiB);
    CHECK(top.writes.size() - writes_before <= 8);
    c.close(disk);
    auto below = c.data_below_top();
    for (const auto& range : below) {
        const uint64_t start = range.first;
        CHECK_MESSAGE(start >= 4 * MiB, start);
    }
    c.expect_check_clean();
    std::string out;
    CHECK_MESSAGE(sh("cd " + c.dir.path + " && qemu-img compare top.qcow2 chain.raw", &out) == 0, out);
}
