// io::open_file over a real temporary file: io_uring reads and writes, concurrency, EOF, errors.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"

using namespace qcowfs;

namespace {

struct TempFile {
    std::string path;
    explicit TempFile(size_t size) {
        char name[] = "/tmp/qcowfs-io-test-XXXXXX";
        int fd = ::mkstemp(name);
        REQUIRE(fd >= 0);
        path = name;
        std::vector<char> data(size);
        for (size_t i = 0; i < size; ++i) data[i] = static_cast<char>((i * 131) >> 7);
        REQUIRE(::write(fd, data.data(), size) == static_cast<ssize_t>(size));
        ::close(fd);
    }
    ~TempFile() { ::unlink(path.c_str()); }
};

char expected(size_t i) { return static_cast<char>((i * 131) >> 7); }

}  // namespace

TEST_CASE("many concurrent reads of one file, on several threads, all return the right bytes") {
    TempFile tmp(4 << 20);
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, false);
    constexpr int kReads = 200;
    int ok = 0, done = 0;
    for (int r = 0; r < kReads; ++r) {
        asio::co_spawn(io, [&, r]() -> Task<void> {
            uint64_t off = (uint64_t(r) * 7919 * 4096 + r * 13) % ((4 << 20) - 70000);
            std::vector<std::byte> buf(65536 + r);
            size_t n = co_await file->read_at(off, buf);
            bool good = n == buf.size();
            for (size_t i = 0; good && i < n; i += 97) good = buf[i] == std::byte(expected(off + i));
            ok += good;
            ++done;
        }, asio::detached);
    }
    // One thread: the counters need no lock, and io_uring still runs every read concurrently.
    io.run();
    CHECK(done == kReads);
    CHECK(ok == kReads);
}

TEST_CASE("reads stop at the end of the file; writes extend it and read back") {
    TempFile tmp(10000);
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, true);
    CHECK(file->size() == 10000);
    std::vector<std::byte> buf(4096);
    size_t n = 0;
    asio::co_spawn(io, [&]() -> Task<void> { n = co_await file->read_at(8000, buf); }, asio::detached);
    io.run();
    CHECK(n == 2000);
    io.restart();
    asio::co_spawn(io, [&]() -> Task<void> { n = co_await file->read_at(20000, buf); }, asio::detached);
    io.run();
    CHECK(n == 0);

    std::vector<std::byte> out(5000, std::byte{0x7e});
    io.restart();
    asio::co_spawn(io, [&]() -> Task<void> {
        co_await file->write_at(9000, out);
        co_await file->flush();
        n = co_await file->read_at(9000, buf);
    }, asio::detached);
    io.run();
    CHECK(file->size() == 14000);
    CHECK(n == 4096);
    CHECK(buf[0] == std::byte{0x7e});
    CHECK(buf[4095] == std::byte{0x7e});
}

TEST_CASE("opening a missing file names it and keeps errno") {
    asio::io_context io;
    try {
        io::open_file(io.get_executor(), "/nonexistent/qcowfs-test", false);
        FAIL("opened");
    } catch (const std::system_error& e) {
        CHECK(e.code().value() == ENOENT);
        CHECK(std::string(e.what()).find("/nonexistent/qcowfs-test") != std::string::npos);
    }
}

TEST_CASE("a read-only file refuses writes with the system's error") {
    TempFile tmp(100);
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, false);
    std::vector<std::byte> out(10);
    int code = 0;
    asio::co_spawn(io, [&]() -> Task<void> {
        try {
            co_await file->write_at(0, out);
        } catch (const std::system_error& e) {
            code = e.code().value();
        }
    }, asio::detached);
    io.run();
    CHECK(code == EBADF);
}

TEST_CASE("MemFile: empty reads and writes touch nothing, as pread/pwrite of 0 bytes") {
    // An empty span's data() is null: memcpy with it is undefined (UBSan in build-asan/ aborts).
    io::MemFile file("mem", std::vector<std::byte>(10, std::byte{0x42}));
    asio::io_context io;
    size_t n = 1;
    asio::co_spawn(io, [&]() -> Task<void> {
        n = co_await file.read_at(0, std::span<std::byte>());
        co_await file.write_at(100, std::span<const std::byte>());  // a 0-byte pwrite does not extend the file
        co_await file.write_at(4, std::span<const std::byte>());
    }, asio::detached);
    io.run();
    CHECK(n == 0);
    CHECK(file.size() == 10);
    CHECK(file.content() == std::vector<std::byte>(10, std::byte{0x42}));
}

TEST_CASE("reads served partly from the page cache and partly from the disk return the right bytes") {
    // read_at copies what the page cache holds at once (preadv2 RWF_NOWAIT) and reads the rest
    // through the ring: a range whose first page is cached and the rest not takes both paths.
    constexpr size_t kSize = 1 << 20;
    TempFile tmp(kSize);
    int fd = ::open(tmp.path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::fdatasync(fd) == 0);
    REQUIRE(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
    REQUIRE(::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM) == 0);  // no readahead: only that page
    char page[4096];
    REQUIRE(::pread(fd, page, sizeof page, 200 * 1024) == static_cast<ssize_t>(sizeof page));
    ::close(fd);

    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, false);
    struct Case {
        uint64_t offset;
        size_t length;
        size_t got = 0;
        bool good = false;
    };
    std::vector<Case> cases{{200 * 1024, 65536}, {200 * 1024 + 100, 300000}, {0, 4096}, {kSize - 5000, 8192}};
    for (Case& c : cases) {
        asio::co_spawn(io, [&c, &file]() -> Task<void> {
            std::vector<std::byte> buf(c.length);
            c.got = co_await file->read_at(c.offset, buf);
            c.good = true;
            for (size_t i = 0; i < c.got; ++i) c.good &= buf[i] == std::byte(expected(c.offset + i));
        }, asio::detached);
    }
    io.run();
    for (const Case& c : cases) {
        INFO("offset ", c.offset, " length ", c.length);
        CHECK(c.got == std::min<uint64_t>(c.length, kSize - c.offset));
        CHECK(c.good);
    }
}
