// SliceCache: shared loads, failures not cached, write-back of dirty slices and flush ordering.
#include <doctest/doctest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <string>
#include <vector>

#include "qcowfs/cache/slice_cache.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "test_errors.hpp"
#include "test_image_builder.hpp"

using namespace qcowfs;

namespace {

/// A MemFile that yields to the executor before every operation (so concurrent callers overlap)
/// and records writes and flushes, in order, in a log shared with other files.
class LoggingFile final : public io::File {
public:
    LoggingFile(std::string name, std::vector<std::string>& log, size_t size)
        : mem_(name, std::vector<std::byte>(size)), log_(log), name_(std::move(name)) {}

    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
        co_return co_await mem_.read_at(offset, buf);
    }
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
        log_.push_back(name_ + " write " + std::to_string(offset) + "+" + std::to_string(buf.size()));
        co_await mem_.write_at(offset, buf);
    }
    Task<void> flush() override {
        co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
        log_.push_back(name_ + " flush");
        co_await mem_.flush();
    }
    uint64_t size() override { return mem_.size(); }
    const std::string& name() const override { return name_; }

    io::MemFile mem_;

private:
    std::vector<std::string>& log_;
    std::string name_;
};

template <class F>
void run(asio::io_context& io, F f) {
    test::run(io, [&]() -> Task<int> {
        co_await f();
        co_return 0;
    }());
}

uint8_t byte_at(io::MemFile& f, uint64_t off) { return std::to_integer<uint8_t>(f.content().at(off)); }

}  // namespace

TEST_CASE("concurrent misses on one slice share one read") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 64 * 1024);
    cache::SliceCache cache(file, 4096, 64 * 1024);
    asio::io_context io;
    int done = 0;
    for (int i = 0; i < 5; ++i)
        asio::co_spawn(io, [&]() -> Task<void> {
            auto s = co_await cache.get(8192);
            CHECK(s->host_offset == 8192);
            ++done;
        }, asio::detached);
    io.run();
    CHECK(done == 5);
    CHECK(file.mem_.read_count() == 1);
    CHECK(cache.misses() == 1);
    CHECK(cache.hits() == 4);
}

TEST_CASE("a failed read is not cached, and a waiter retries it") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 64 * 1024);
    cache::SliceCache cache(file, 4096, 64 * 1024);
    asio::io_context io;
    file.mem_.inject_failure(EIO, 1);
    int failed = 0, ok = 0;
    for (int i = 0; i < 2; ++i)
        asio::co_spawn(io, [&]() -> Task<void> {
            try {
                co_await cache.get(0);
                ++ok;
            } catch (const std::system_error& e) {
                CHECK(e.code().value() == EIO);
                ++failed;
            }
        }, asio::detached);
    io.run();
    CHECK(failed == 1);  // the reader that hit the fault
    CHECK(ok == 1);      // the waiter looked again and read it itself
    CHECK(file.mem_.read_count() == 1);  // the failed read is not counted by MemFile
    // A slice beyond the end of the file is EIO, and not cached either.
    CHECK(test::thrown_errno([&] { run(io, [&]() -> Task<void> { co_await cache.get(1 << 20); }); }) == EIO);
    CHECK(cache.cached_slices() == 1);
}

TEST_CASE("dirty slices survive eviction pressure and are written by flush") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 64 * 512);
    cache::SliceCache cache(file, 512, 4 * 512);  // room for 4 slices
    asio::io_context io;
    run(io, [&]() -> Task<void> {
        auto s = co_await cache.get_for_write(512);
        s->bytes[0] = std::byte{0xab};
        auto n = co_await cache.create(100 * 512);  // past the end of the file: never read
        n->bytes[7] = std::byte{0xcd};
        for (uint64_t i = 10; i < 40; ++i) co_await cache.get(i * 512);
    });
    CHECK(cache.dirty_slices() == 2);
    CHECK(cache.cached_slices() == 4);
    CHECK(log.empty());  // nothing written before flush
    CHECK(file.mem_.size() == 64 * 512);

    // A hit on a dirty slice sees the modification.
    run(io, [&]() -> Task<void> { CHECK((co_await cache.get(512))->bytes[0] == std::byte{0xab}); });

    run(io, [&]() -> Task<void> { co_await cache.flush(); });
    CHECK(byte_at(file.mem_, 512) == 0xab);
    CHECK(byte_at(file.mem_, 100 * 512 + 7) == 0xcd);
    CHECK(file.mem_.size() == 101 * 512);
    CHECK(cache.dirty_slices() == 0);
    CHECK(log == std::vector<std::string>{"f write 512+512", "f write 51200+512"});

    // Clean now: they can go.
    run(io, [&]() -> Task<void> {
        for (uint64_t i = 40; i < 50; ++i) co_await cache.get(i * 512);
    });
    CHECK(cache.cached_slices() == 4);
    size_t reads = file.mem_.read_count();
    run(io, [&]() -> Task<void> { CHECK((co_await cache.get(512))->bytes[0] == std::byte{0xab}); });
    CHECK(file.mem_.read_count() == reads + 1);
}

TEST_CASE("flush coalesces adjacent dirty slices into one write") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 64 * 512);
    cache::SliceCache cache(file, 512, 64 * 512);
    asio::io_context io;
    run(io, [&]() -> Task<void> {
        for (uint64_t i : {3, 1, 2, 7, 9, 8, 20})
            (co_await cache.get_for_write(i * 512))->bytes[1] = std::byte(i);
        co_await cache.flush();
    });
    CHECK(log == std::vector<std::string>{"f write 512+1536", "f write 3584+1536", "f write 10240+512"});
    for (uint64_t i : {3, 1, 2, 7, 9, 8, 20}) CHECK(byte_at(file.mem_, i * 512 + 1) == i);
}

TEST_CASE("create zero-fills without reading, even over a cached slice") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 8 * 512);
    asio::io_context io;
    run(io, [&]() -> Task<void> { co_await file.mem_.write_at(1024, test::bytes_of(0x55, 512)); });
    cache::SliceCache cache(file, 512, 8 * 512);
    run(io, [&]() -> Task<void> {
        CHECK((co_await cache.get(1024))->bytes[3] == std::byte{0x55});
        auto s = co_await cache.create(1024);
        CHECK(s->bytes[3] == std::byte{0});
        co_await cache.create(2048);
        co_await cache.flush();
    });
    CHECK(file.mem_.read_count() == 1);
    CHECK(byte_at(file.mem_, 1024 + 3) == 0);
}

TEST_CASE("depends_on: the dependency is written and synced before any of our slices") {
    std::vector<std::string> log;
    LoggingFile image("img", log, 64 * 512);
    cache::SliceCache blocks(image, 512, 64 * 512);
    cache::SliceCache table(image, 512, 64 * 512);
    cache::SliceCache l2(image, 512, 64 * 512);
    table.depends_on(blocks);
    l2.depends_on(table);
    asio::io_context io;

    SUBCASE("whole chain dirty") {
        run(io, [&]() -> Task<void> {
            (co_await l2.get_for_write(10 * 512))->bytes[0] = std::byte{1};
            (co_await table.get_for_write(5 * 512))->bytes[0] = std::byte{2};
            (co_await blocks.create(20 * 512))->bytes[0] = std::byte{3};
            co_await l2.flush();
        });
        CHECK(log == std::vector<std::string>{"img write 10240+512", "img flush", "img write 2560+512", "img flush",
                                              "img write 5120+512"});
        CHECK(l2.dirty_slices() + table.dirty_slices() + blocks.dirty_slices() == 0);
    }
    SUBCASE("only the far dependency dirty: still flushed first, no redundant sync") {
        run(io, [&]() -> Task<void> {
            (co_await l2.get_for_write(10 * 512))->bytes[0] = std::byte{1};
            (co_await blocks.get_for_write(20 * 512))->bytes[0] = std::byte{3};
            co_await l2.flush();
        });
        CHECK(log == std::vector<std::string>{"img write 10240+512", "img flush", "img write 5120+512"});
    }
    SUBCASE("nothing dirty in the dependencies: no sync") {
        run(io, [&]() -> Task<void> {
            (co_await l2.get_for_write(10 * 512))->bytes[0] = std::byte{1};
            co_await l2.flush();
        });
        CHECK(log == std::vector<std::string>{"img write 5120+512"});
    }
    SUBCASE("a dependency written by its own earlier flush is synced before we write") {
        run(io, [&]() -> Task<void> {
            (co_await blocks.get_for_write(20 * 512))->bytes[0] = std::byte{3};
            co_await blocks.flush();
            (co_await table.get_for_write(5 * 512))->bytes[0] = std::byte{2};
            co_await table.sync();
        });
        CHECK(log == std::vector<std::string>{"img write 10240+512", "img flush", "img write 2560+512", "img flush"});
    }
    SUBCASE("cycles are refused") {
        CHECK(test::thrown_errno([&] { blocks.depends_on(l2); }) == EINVAL);
        CHECK(test::thrown_errno([&] { blocks.depends_on(blocks); }) == EINVAL);
    }
}

TEST_CASE("a slice modified while its flush is in flight stays dirty") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 8 * 512);
    cache::SliceCache cache(file, 512, 8 * 512);
    asio::io_context io;
    run(io, [&]() -> Task<void> { (co_await cache.get_for_write(512))->bytes[0] = std::byte{1}; });
    bool flushed = false;
    asio::co_spawn(io, [&]() -> Task<void> {
        co_await cache.flush();
        flushed = true;
    }, asio::detached);
    asio::co_spawn(io, [&]() -> Task<void> {
        // Runs while the flush waits for its write (LoggingFile yields first).
        (co_await cache.get_for_write(512))->bytes[0] = std::byte{2};
    }, asio::detached);
    io.restart();
    io.run();
    CHECK(flushed);
    CHECK(byte_at(file.mem_, 512) == 1);  // the copy taken when the flush started
    CHECK(cache.dirty_slices() == 1);
    run(io, [&]() -> Task<void> { co_await cache.flush(); });
    CHECK(byte_at(file.mem_, 512) == 2);
    CHECK(cache.dirty_slices() == 0);
}

TEST_CASE("a failed write keeps the slices dirty for the next flush") {
    std::vector<std::string> log;
    LoggingFile file("f", log, 8 * 512);
    cache::SliceCache cache(file, 512, 8 * 512);
    asio::io_context io;
    run(io, [&]() -> Task<void> {
        (co_await cache.get_for_write(512))->bytes[0] = std::byte{7};
        (co_await cache.get_for_write(4 * 512))->bytes[0] = std::byte{8};
    });
    file.mem_.inject_failure(ENOSPC, 1);
    CHECK(test::thrown_errno([&] { run(io, [&]() -> Task<void> { co_await cache.flush(); }); }) == ENOSPC);
    CHECK(cache.dirty_slices() == 2);
    run(io, [&]() -> Task<void> { co_await cache.flush(); });
    CHECK(cache.dirty_slices() == 0);
    CHECK(byte_at(file.mem_, 512) == 7);
    CHECK(byte_at(file.mem_, 4 * 512) == 8);
}
