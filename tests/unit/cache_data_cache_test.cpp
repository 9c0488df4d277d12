// DataCache: read-your-writes, zero ranges, coalesced write-back, the limit, failures, concurrency.
#include <doctest/doctest.h>

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <list>
#include <random>
#include <string>
#include <vector>

#include "qcowfs/cache/data_cache.hpp"
#include "qcowfs/format/error.hpp"
#include "test_errors.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;

namespace {

constexpr size_t KiB = 1024;
constexpr size_t MiB = 1024 * 1024;
// The mechanics tests cache every write; the default policy has tests of its own.
constexpr auto kCacheAll = cache::DataCache::SmallWrites::cache_all;

std::string describe(const char* what, uint64_t offset, uint64_t length) {
    std::string s = what;
    s.append(" ").append(std::to_string(offset)).append("+").append(std::to_string(length));
    return s;
}

/// `lines` as one string, "a | b | c", so that a failed check shows them.
std::string joined(const std::vector<std::string>& lines) {
    std::string s;
    for (const auto& l : lines) {
        if (!s.empty()) s.append(" | ");
        s.append(l);
    }
    return s;
}

/// A disk in a byte vector. Every call yields to the executor first, and reads and writes copy
/// half, yield, then copy the rest, so a read overlapping a write in flight would see it torn.
/// Calls are logged in order; calls that overlap a write in flight are counted in `conflicts`;
/// writes and write_zeroes fail with EIO when `fail_next` > 0 or with probability `fail_rate`.
class FakeTarget final : public cache::CacheTarget {
public:
    explicit FakeTarget(size_t size, uint8_t fill = 0) : disk(size, std::byte{fill}) {}

    uint64_t size() const override { return disk.size(); }

    Task<void> read(uint64_t offset, std::span<std::byte> buf) override {
        co_await yield();
        log.push_back(describe("read", offset, buf.size()));
        CHECK(offset + buf.size() <= disk.size());  // the cache never reads past the end
        auto op = begin_op(offset, buf.size(), false);
        size_t half = buf.size() / 2;
        std::memcpy(buf.data(), disk.data() + offset, half);
        co_await yield();
        std::memcpy(buf.data() + half, disk.data() + offset + half, buf.size() - half);
        in_flight_.erase(op);
    }

    Task<void> write(uint64_t offset, std::span<const std::byte> data) override {
        co_await yield();
        maybe_fail("write");
        log.push_back(describe("write", offset, data.size()));
        REQUIRE(offset + data.size() <= disk.size());
        auto op = begin_op(offset, data.size(), true);
        size_t half = data.size() / 2;
        std::memcpy(disk.data() + offset, data.data(), half);
        co_await yield();
        std::memcpy(disk.data() + offset + half, data.data() + half, data.size() - half);
        in_flight_.erase(op);
        ++writes;
        largest_write = std::max(largest_write, data.size());
    }

    Task<void> write_zeroes(uint64_t offset, uint64_t length, bool discard) override {
        co_await yield();
        maybe_fail("write_zeroes");
        log.push_back(describe(discard ? "discard" : "zero", offset, length));
        REQUIRE(offset + length <= disk.size());
        auto op = begin_op(offset, length, true);
        co_await yield();
        std::fill_n(disk.begin() + static_cast<ptrdiff_t>(offset), length, std::byte{0});
        in_flight_.erase(op);
    }

    Task<void> flush() override {
        co_await yield();
        log.push_back("flush");
    }

    size_t count(const std::string& prefix) const {
        return std::count_if(log.begin(), log.end(), [&](const std::string& l) { return l.rfind(prefix, 0) == 0; });
    }

    std::vector<std::byte> disk;
    std::vector<std::string> log;
    int fail_next = 0;  // fail this many writes, after `skip` more succeed
    int skip = 0;
    double fail_rate = 0;
    std::mt19937 rng{1};
    int conflicts = 0;
    size_t writes = 0;
    size_t largest_write = 0;

private:
    struct Op {
        uint64_t begin, end;
        bool write;
    };
    static Task<void> yield() { co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable); }
    void maybe_fail(const char* what) {
        bool fails = fail_rate > 0 && std::uniform_real_distribution<>(0, 1)(rng) < fail_rate;
        if (fail_next > 0 && skip > 0) {
            --skip;
        } else if (fail_next > 0) {
            --fail_next;
            fails = true;
        }
        if (fails) fail(EIO, std::string("injected failure of ").append(what));
    }
    std::list<Op>::iterator begin_op(uint64_t offset, uint64_t length, bool write) {
        Op op{offset, offset + length, write};
        for (const Op& o : in_flight_)
            if ((o.write || write) && o.begin < op.end && op.begin < o.end) ++conflicts;
        return in_flight_.insert(in_flight_.end(), op);
    }
    std::list<Op> in_flight_;
};

template <class F>
void run(asio::io_context& io, F f) {
    test::run(io, [&]() -> Task<int> {
        co_await f();
        co_return 0;
    }());
}

std::vector<std::byte> pattern(size_t n, uint32_t seed) {
    std::vector<std::byte> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>((i * 131 + seed * 7919 + i / 251) & 0xff));
    return v;
}

std::vector<std::byte> read_cache(asio::io_context& io, cache::DataCache& c, uint64_t offset, size_t n) {
    std::vector<std::byte> buf(n, std::byte{0xee});
    run(io, [&]() -> Task<void> { co_await c.read(offset, buf); });
    return buf;
}

void write_cache(asio::io_context& io, cache::DataCache& c, uint64_t offset, const std::vector<std::byte>& data) {
    run(io, [&]() -> Task<void> { co_await c.write(offset, data); });
}

void zero_cache(asio::io_context& io, cache::DataCache& c, uint64_t offset, uint64_t n, bool discard) {
    run(io, [&]() -> Task<void> { co_await c.write_zeroes(offset, n, discard); });
}

void flush_cache(asio::io_context& io, cache::DataCache& c) {
    run(io, [&]() -> Task<void> { co_await c.flush(); });
}

/// The model's view: `disk` with `data` written at `offset`.
void apply(std::vector<std::byte>& model, uint64_t offset, const std::vector<std::byte>& data) {
    std::copy(data.begin(), data.end(), model.begin() + static_cast<ptrdiff_t>(offset));
}

std::vector<std::byte> slice(const std::vector<std::byte>& v, uint64_t offset, size_t n) {
    return {v.begin() + static_cast<ptrdiff_t>(offset), v.begin() + static_cast<ptrdiff_t>(offset + n)};
}

}  // namespace

TEST_CASE("data cache: reads see cached writes; a fully cached read does not touch the target") {
    asio::io_context io;
    FakeTarget target(256 * KiB);
    target.disk = pattern(256 * KiB, 1);
    auto model = target.disk;
    cache::DataCache c(target, 16 * MiB, kCacheAll);

    auto a = pattern(8 * KiB, 2);
    write_cache(io, c, 12 * KiB, a);
    apply(model, 12 * KiB, a);
    CHECK(c.dirty_bytes() == 8 * KiB);
    CHECK_FALSE(c.empty());
    CHECK(target.log.empty());  // nothing reaches the target before a write-back

    // Partly cached: one target read for the uncached parts, the write laid over it.
    CHECK(read_cache(io, c, 8 * KiB, 16 * KiB) == slice(model, 8 * KiB, 16 * KiB));
    CHECK(target.count("read") == 1);

    // Fully cached: the target is not read.
    CHECK(read_cache(io, c, 13 * KiB, 6 * KiB) == slice(model, 13 * KiB, 6 * KiB));
    CHECK(read_cache(io, c, 12 * KiB, 8 * KiB) == slice(model, 12 * KiB, 8 * KiB));
    CHECK(target.count("read") == 1);

    // Two cached pieces with a gap: still one target read, only over the gap.
    auto b = pattern(4 * KiB, 3);
    write_cache(io, c, 24 * KiB, b);
    apply(model, 24 * KiB, b);
    CHECK(read_cache(io, c, 12 * KiB, 16 * KiB) == slice(model, 12 * KiB, 16 * KiB));
    CHECK(target.log.back() == "read 20480+4096");

    // Past the end of the disk: zeros, and the target is read only inside it.
    auto tail = read_cache(io, c, 252 * KiB, 8 * KiB);
    CHECK(slice(tail, 0, 4 * KiB) == slice(model, 252 * KiB, 4 * KiB));
    CHECK(slice(tail, 4 * KiB, 4 * KiB) == std::vector<std::byte>(4 * KiB));
    CHECK(target.log.back() == "read 258048+4096");
    CHECK(read_cache(io, c, 300 * KiB, 4 * KiB) == std::vector<std::byte>(4 * KiB));
}

TEST_CASE("data cache: overlapping writes replace the parts they cover") {
    asio::io_context io;
    FakeTarget target(64 * KiB, 0x11);
    auto model = target.disk;
    cache::DataCache c(target, 16 * MiB, kCacheAll);

    struct W {
        uint64_t offset;
        size_t length;
    };
    // In the middle of, across the ends of, and over several earlier writes; a rewrite in place.
    std::vector<W> writes{{4096, 8192}, {6000, 1000}, {2000, 3000}, {11000, 4000}, {20000, 100},
                          {20100, 100}, {19000, 5000}, {0, 30000}, {5, 7},      {29999, 2}};
    uint32_t seed = 10;
    for (auto w : writes) {
        auto d = pattern(w.length, seed++);
        write_cache(io, c, w.offset, d);
        apply(model, w.offset, d);
        CHECK(read_cache(io, c, 0, 64 * KiB) == model);
    }
    CHECK(c.dirty_bytes() == 30001);
    flush_cache(io, c);
    CHECK(target.disk == model);
    CHECK(c.empty());
    CHECK(c.dirty_bytes() == 0);
    CHECK(target.conflicts == 0);
}

TEST_CASE("data cache: zero ranges take no buffer, read as zeros and go back as write_zeroes") {
    asio::io_context io;
    FakeTarget target(4 * MiB, 0xff);
    auto model = target.disk;
    cache::DataCache c(target, 16 * MiB, kCacheAll);

    zero_cache(io, c, 4096, 2 * MiB, true);
    std::fill_n(model.begin() + 4096, 2 * MiB, std::byte{0});
    CHECK(c.dirty_bytes() == 0);
    CHECK_FALSE(c.empty());
    CHECK(read_cache(io, c, 0, 3 * MiB) == slice(model, 0, 3 * MiB));

    // A write in the middle splits it; a non-discard zero range beside it stays apart.
    auto d = pattern(8192, 5);
    write_cache(io, c, 1 * MiB, d);
    apply(model, 1 * MiB, d);
    zero_cache(io, c, 3 * MiB, 4096, false);
    zero_cache(io, c, 3 * MiB + 4096, 4096, true);
    std::fill_n(model.begin() + 3 * MiB, 8192, std::byte{0});
    CHECK(c.dirty_bytes() == 8192);
    CHECK(read_cache(io, c, 0, 4 * MiB) == model);

    // Writing zeros over data drops the data buffer.
    zero_cache(io, c, 1 * MiB + 4096, 4096, true);
    std::fill_n(model.begin() + 1 * MiB + 4096, 4096, std::byte{0});
    CHECK(c.dirty_bytes() == 4096);

    target.log.clear();
    flush_cache(io, c);
    CHECK(target.disk == model);
    CHECK(joined(target.log) == "discard 4096+1044480 | write 1048576+4096 | discard 1052672+1048576 | zero 3145728+4096 | discard 3149824+4096 | flush");
    CHECK(c.empty());
}

TEST_CASE("data cache: adjacent small writes reach the target as few large writes") {
    asio::io_context io;
    FakeTarget target(8 * MiB);
    cache::DataCache c(target, 64 * MiB, kCacheAll);
    auto model = target.disk;

    SUBCASE("sequential") {
        for (uint64_t off = 0; off < 4 * MiB; off += 4 * KiB) {
            auto d = pattern(4 * KiB, static_cast<uint32_t>(off / 4096));
            write_cache(io, c, off, d);
            apply(model, off, d);
        }
    }
    SUBCASE("shuffled") {
        std::vector<uint64_t> offsets;
        for (uint64_t off = 0; off < 4 * MiB; off += 4 * KiB) offsets.push_back(off);
        std::shuffle(offsets.begin(), offsets.end(), std::mt19937(7));
        for (uint64_t off : offsets) {
            auto d = pattern(4 * KiB, static_cast<uint32_t>(off / 4096));
            write_cache(io, c, off, d);
            apply(model, off, d);
        }
    }
    CHECK(c.dirty_bytes() == 4 * MiB);
    flush_cache(io, c);
    CHECK(target.disk == model);
    CHECK(joined(target.log) == "write 0+1048576 | write 1048576+1048576 | write 2097152+1048576 | write 3145728+1048576 | flush");
}

TEST_CASE("data cache: a write that would pass the limit waits for a write-back first") {
    asio::io_context io;
    FakeTarget target(1 * MiB);
    auto model = target.disk;
    const size_t limit = 64 * KiB;
    cache::DataCache c(target, limit, kCacheAll);

    // 15 sequential 4 KiB writes fit: nothing is written.
    uint64_t off = 0;
    for (; off < 60 * KiB; off += 4 * KiB) {
        auto d = pattern(4 * KiB, static_cast<uint32_t>(off));
        write_cache(io, c, off, d);
        apply(model, off, d);
    }
    CHECK(target.writes == 0);
    CHECK(c.dirty_bytes() == 60 * KiB);

    // The 16th would pass the limit: the cached data is written back (coalesced) before it is
    // cached, and it returns only then.
    auto d = pattern(4 * KiB, 99);
    write_cache(io, c, off, d);
    apply(model, off, d);
    CHECK(joined(target.log) == "write 0+61440");
    CHECK(c.dirty_bytes() == 4 * KiB);
    CHECK(slice(target.disk, 0, 60 * KiB) == slice(model, 0, 60 * KiB));

    // Random writes never leave more than the limit cached, and all reach the target.
    std::mt19937 rng(3);
    for (int i = 0; i < 300; ++i) {
        uint64_t o = std::uniform_int_distribution<uint64_t>(0, 1 * MiB - 8 * KiB)(rng);
        auto w = pattern(std::uniform_int_distribution<size_t>(1, 8 * KiB)(rng), static_cast<uint32_t>(i));
        write_cache(io, c, o, w);
        apply(model, o, w);
        CHECK(c.dirty_bytes() <= limit);
    }
    CHECK(target.writes > 10);
    CHECK(read_cache(io, c, 0, 1 * MiB) == model);
    flush_cache(io, c);
    CHECK(target.disk == model);
    CHECK(target.conflicts == 0);
}

TEST_CASE("data cache: flush writes back, then flushes the target") {
    asio::io_context io;
    FakeTarget target(1 * MiB);
    cache::DataCache c(target, 16 * MiB, kCacheAll);

    // Nothing cached: flush still makes the target durable.
    flush_cache(io, c);
    CHECK(joined(target.log) == "flush");

    target.log.clear();
    write_cache(io, c, 8192, pattern(100, 1));
    zero_cache(io, c, 0, 4096, false);
    run(io, [&]() -> Task<void> { co_await c.write_back(); });
    CHECK(joined(target.log) == "zero 0+4096 | write 8192+100");  // write_back does not flush
    CHECK(c.empty());

    target.log.clear();
    write_cache(io, c, 500, pattern(10, 2));
    flush_cache(io, c);
    CHECK(joined(target.log) == "write 500+10 | flush");
}

TEST_CASE("data cache: a failed write-back keeps the data dirty and a later flush writes it") {
    asio::io_context io;
    FakeTarget target(1 * MiB, 0x22);
    auto model = target.disk;
    cache::DataCache c(target, 16 * KiB, kCacheAll);

    auto a = pattern(4 * KiB, 1), b = pattern(4 * KiB, 2);
    write_cache(io, c, 0, a);
    apply(model, 0, a);
    zero_cache(io, c, 64 * KiB, 4 * KiB, true);
    std::fill_n(model.begin() + 64 * KiB, 4 * KiB, std::byte{0});
    write_cache(io, c, 128 * KiB, b);
    apply(model, 128 * KiB, b);

    // The first target call fails (runs go out in parallel, so others may succeed): the failed
    // data stays cached, reads still see everything, and the target is not flushed.
    auto flushed = [&] { return joined(target.log).find("flush") != std::string::npos; };
    target.log.clear();
    target.fail_next = 1;
    std::string what;
    CHECK(test::thrown_errno([&] { flush_cache(io, c); }, &what) == EIO);
    CHECK(what.find("injected") != std::string::npos);
    CHECK_FALSE(flushed());
    CHECK(c.dirty_bytes() >= 4 * KiB);
    CHECK(read_cache(io, c, 0, 256 * KiB) == slice(model, 0, 256 * KiB));

    // A later flush writes what is left.
    flush_cache(io, c);
    CHECK(c.dirty_bytes() == 0);

    write_cache(io, c, 0, a);  // fits under the limit: no write-back
    write_cache(io, c, 4 * KiB, a);
    apply(model, 4 * KiB, a);
    CHECK(c.dirty_bytes() == 8 * KiB);

    // A write that needs room fails with the write-back's error and is not cached.
    target.fail_next = 1;
    auto big = pattern(8 * KiB, 3);
    CHECK(test::thrown_errno([&] { write_cache(io, c, 512 * KiB, big); }) == EIO);
    CHECK(read_cache(io, c, 0, 1 * MiB) == model);

    // Later flushes succeed and write everything.
    flush_cache(io, c);
    CHECK(target.disk == model);
    CHECK(c.empty());
    CHECK(target.log.back() == "flush");
    CHECK(target.conflicts == 0);
}

TEST_CASE("data cache: a large write goes to the target at once and replaces what was cached under it") {
    asio::io_context io;
    FakeTarget target(4 * MiB, 0x44);
    auto model = target.disk;
    cache::DataCache c(target, 16 * MiB, kCacheAll);

    // Two small cached writes, one inside the large write's range and one straddling its end.
    auto a = pattern(8 * KiB, 1), b = pattern(8 * KiB, 2), big = pattern(1 * MiB, 3);
    write_cache(io, c, 64 * KiB, a);
    apply(model, 64 * KiB, a);
    write_cache(io, c, 1 * MiB + 60 * KiB, b);
    apply(model, 1 * MiB + 60 * KiB, b);
    CHECK(target.writes == 0);

    // The large write reaches the target before write() returns, in one call, and is not cached:
    // only the part of b past its end stays dirty.
    write_cache(io, c, 64 * KiB, big);
    apply(model, 64 * KiB, big);
    CHECK(target.writes == 1);
    CHECK(target.largest_write == 1 * MiB);
    CHECK(c.dirty_bytes() == 4 * KiB);
    CHECK(read_cache(io, c, 0, 4 * MiB) == model);

    // If the target fails it, the write fails and what was cached before stays cached.
    auto d = pattern(4 * KiB, 4), big2 = pattern(512 * KiB, 5);
    write_cache(io, c, 2 * MiB, d);
    apply(model, 2 * MiB, d);
    target.fail_next = 1;
    CHECK(test::thrown_errno([&] { write_cache(io, c, 2 * MiB - 4 * KiB, big2); }) == EIO);
    CHECK(c.dirty_bytes() == 8 * KiB);
    CHECK(read_cache(io, c, 0, 4 * MiB) == model);

    // A write larger than the largest target write goes out in pieces of that size, in order.
    auto huge = pattern(3 * MiB, 6);
    target.log.clear();
    write_cache(io, c, 1 * MiB, huge);
    apply(model, 1 * MiB, huge);
    CHECK(joined(target.log) == "write 1048576+1048576 | write 2097152+1048576 | write 3145728+1048576");
    CHECK(c.dirty_bytes() == 0);

    flush_cache(io, c);
    CHECK(target.disk == model);
    CHECK(c.empty());
    CHECK(target.conflicts == 0);
}

TEST_CASE("data cache: by default a random small write goes to the target at once, a stream is cached") {
    asio::io_context io;
    FakeTarget target(4 * MiB, 0x44);
    auto model = target.disk;
    cache::DataCache c(target, 16 * MiB);
    auto put = [&](uint64_t offset, size_t n, uint32_t seed) {
        auto d = pattern(n, seed);
        write_cache(io, c, offset, d);
        apply(model, offset, d);
    };

    // Scattered 4 KiB writes: each reaches the target before write() returns, nothing is cached.
    put(3 * MiB, 4 * KiB, 1);
    put(1 * MiB, 4 * KiB, 2);
    put(2 * MiB + 512, 4 * KiB, 3);
    CHECK(joined(target.log) == "write 3145728+4096 | write 1048576+4096 | write 2097664+4096");
    CHECK(c.empty());

    // A stream: the first write goes to the target, every write continuing it is cached and the
    // write-back joins them.
    target.log.clear();
    for (uint64_t off = 64 * KiB; off < 64 * KiB + 64 * 4 * KiB; off += 4 * KiB) put(off, 4 * KiB, static_cast<uint32_t>(off));
    CHECK(joined(target.log) == "write 65536+4096");
    CHECK(c.dirty_bytes() == 63 * 4 * KiB);

    // A rewrite inside cached data is cached in place. Only the previous write counts as the
    // stream: a write straddling the cached run's end now goes to the target and replaces the
    // cached bytes it covers, and the write continuing that one is cached again.
    target.log.clear();
    put(100 * KiB, 1000, 4);
    CHECK(target.log.empty());
    CHECK(c.dirty_bytes() == 63 * 4 * KiB);
    put(316 * KiB, 16 * KiB, 5);
    CHECK(joined(target.log) == "write 323584+16384");
    CHECK(c.dirty_bytes() == 62 * 4 * KiB);
    put(332 * KiB, 4 * KiB, 6);
    CHECK(joined(target.log) == "write 323584+16384");
    CHECK(c.dirty_bytes() == 63 * 4 * KiB);
    CHECK(read_cache(io, c, 0, 4 * MiB) == model);

    target.log.clear();
    flush_cache(io, c);
    CHECK(joined(target.log) == "write 69632+253952 | write 339968+4096 | flush");
    CHECK(target.disk == model);
    CHECK(c.empty());
    CHECK(target.conflicts == 0);
}

TEST_CASE("data cache: truncate forgets changes at and beyond the new size") {
    asio::io_context io;
    FakeTarget target(64 * KiB, 0x33);
    auto model = target.disk;
    cache::DataCache c(target, 16 * MiB, kCacheAll);

    auto a = pattern(4000, 1), b = pattern(3000, 2);
    write_cache(io, c, 1000, a);  // [1000, 5000): cut at 3000
    write_cache(io, c, 9000, b);  // beyond: dropped
    zero_cache(io, c, 6000, 2000, false);
    apply(model, 1000, slice(a, 0, 2000));
    c.truncate(3000);
    CHECK(c.dirty_bytes() == 2000);
    CHECK(read_cache(io, c, 0, 64 * KiB) == model);

    zero_cache(io, c, 2000, 8000, true);  // [2000, 10000): cut at 2500
    std::fill_n(model.begin() + 2000, 500, std::byte{0});
    c.truncate(2500);
    CHECK(c.dirty_bytes() == 1000);
    target.log.clear();
    flush_cache(io, c);
    CHECK(joined(target.log) == "write 1000+1000 | discard 2000+500 | flush");
    // The fake target does not shrink: what lies past 2500 is what it always held.
    CHECK(slice(target.disk, 0, 2500) == slice(model, 0, 2500));
    CHECK(slice(target.disk, 2500, 64 * KiB - 2500) == std::vector<std::byte>(64 * KiB - 2500, std::byte{0x33}));

    c.truncate(0);
    CHECK(c.empty());
}

TEST_CASE("data cache: requests outside the disk fail with EINVAL") {
    asio::io_context io;
    FakeTarget target(64 * KiB);
    cache::DataCache c(target, 16 * MiB, kCacheAll);
    CHECK(test::thrown_errno([&] { write_cache(io, c, 64 * KiB - 1, pattern(2, 1)); }) == EINVAL);
    CHECK(test::thrown_errno([&] { zero_cache(io, c, 1, UINT64_MAX, false); }) == EINVAL);
    CHECK(c.empty());
    write_cache(io, c, 64 * KiB - 2, pattern(2, 1));  // up to the end is fine
    CHECK(c.dirty_bytes() == 2);
}

TEST_CASE("data cache: a write-back in flight and a rewrite of its range reach the target in order") {
    asio::io_context io;
    FakeTarget target(64 * KiB);
    cache::DataCache c(target, 16 * MiB, kCacheAll);
    auto a = pattern(8 * KiB, 1), b = pattern(4 * KiB, 2);
    write_cache(io, c, 0, a);

    std::vector<std::string> events;
    auto model = target.disk;
    apply(model, 0, a);
    apply(model, 2 * KiB, b);
    asio::co_spawn(io, [&]() -> Task<void> {
        co_await c.write_back();
        events.push_back("write_back");
    }, [](std::exception_ptr e) { CHECK_FALSE(e); });
    asio::co_spawn(io, [&]() -> Task<void> {
        co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
        co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
        // The write-back is writing [0, 8 KiB) now: this write waits for it.
        co_await c.write(2 * KiB, b);
        events.push_back("write");
        co_await c.flush();
        events.push_back("flush");
    }, [](std::exception_ptr e) { CHECK_FALSE(e); });
    io.restart();
    io.run();
    CHECK(joined(events) == "write_back | write | flush");
    CHECK(joined(target.log) == "write 0+8192 | write 2048+4096 | flush");
    CHECK(target.disk == model);
    CHECK(target.conflicts == 0);
}

TEST_CASE("data cache: concurrent reads, writes and write-backs agree with a reference model") {
    for (int seed = 0; seed < 24; ++seed) {
        CAPTURE(seed);
        const size_t disk_size = 256 * KiB;
        asio::io_context io;
        FakeTarget target(disk_size, 0x5a);
        target.disk = pattern(disk_size, 1000 + static_cast<uint32_t>(seed));
        target.rng.seed(static_cast<uint32_t>(seed));
        bool failures = seed % 3 == 2;
        if (failures) target.fail_rate = 0.2;
        auto model = target.disk;
        // Both policies: every small write cached, or only streams and rewrites (the default).
        cache::DataCache c(target, (seed % 2 ? 16 : 64) * KiB,
                           seed % 4 < 2 ? kCacheAll : cache::DataCache::SmallWrites::cache_streams);

        int bad_reads = 0, ops = 0, failed_writes = 0, unexpected = 0;
        uint32_t stamp = 0;
        for (int worker = 0; worker < 8; ++worker) {
            asio::co_spawn(io, [&, worker]() -> Task<void> {
                std::mt19937 rng(static_cast<uint32_t>(seed * 100 + worker));
                auto pick = [&](uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng); };
                for (int i = 0; i < 60; ++i) {
                    uint64_t length = pick(1, pick(0, 3) == 0 ? 40 * KiB : 6 * KiB);
                    uint64_t offset = pick(0, disk_size - length);
                    int kind = static_cast<int>(pick(0, 99));
                    ++ops;
                    try {
                        if (kind < 40) {
                            auto d = pattern(length, ++stamp);
                            co_await c.write(offset, d);
                            apply(model, offset, d);  // no co_await between its caching and here
                        } else if (kind < 55) {
                            bool discard = pick(0, 1) == 1;
                            co_await c.write_zeroes(offset, length, discard);
                            std::fill_n(model.begin() + static_cast<ptrdiff_t>(offset), length, std::byte{0});
                        } else if (kind < 90) {
                            // Reads past the end too, sometimes.
                            uint64_t n = length + (pick(0, 9) == 0 ? 8 * KiB : 0);
                            std::vector<std::byte> buf(n);
                            co_await c.read(offset, buf);
                            auto expect = std::vector<std::byte>(n);
                            uint64_t inside = std::min<uint64_t>(n, disk_size - offset);
                            std::copy_n(model.begin() + static_cast<ptrdiff_t>(offset), inside, expect.begin());
                            if (buf != expect) ++bad_reads;
                        } else if (kind < 96) {
                            co_await c.write_back();
                        } else {
                            co_await c.flush();
                        }
                    } catch (const std::system_error& e) {
                        if (!failures || e.code().value() != EIO) ++unexpected;
                        if (kind < 55) ++failed_writes;
                    }
                }
            }, [&](std::exception_ptr e) {
                if (e) ++unexpected;
            });
        }
        io.run();
        CHECK(ops == 8 * 60);
        CHECK(bad_reads == 0);
        CHECK(unexpected == 0);
        CHECK(target.conflicts == 0);
        if (failures) CHECK(failed_writes + target.count("write") > 0);

        target.fail_rate = 0;
        flush_cache(io, c);
        CHECK(c.empty());
        CHECK(target.disk == model);
    }
}
