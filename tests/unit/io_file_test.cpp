// io::open_file over a real temporary file: io_uring reads and writes, concurrency, EOF, errors.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <algorithm>
#include <cstdlib>
#include <cstring>
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

namespace {
/// Pages of [offset, offset + length) of `path` in the page cache (mincore).
size_t resident_pages(const std::string& path, size_t offset, size_t length) {
    int fd = ::open(path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    void* map = ::mmap(nullptr, offset + length, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    REQUIRE(map != MAP_FAILED);
    const size_t page = 4096;
    std::vector<unsigned char> in((offset + length) / page);
    REQUIRE(::mincore(map, offset + length, in.data()) == 0);
    ::munmap(map, offset + length);
    size_t n = 0;
    for (size_t i = offset / page; i < in.size(); ++i) n += in[i] & 1;
    return n;
}
}  // namespace

TEST_CASE("streaming writes (1 MiB or more, page-aligned) go around the page cache; the others through it") {
    TempFile tmp(0);
    struct statfs fs;
    REQUIRE(::statfs(tmp.path.c_str(), &fs) == 0);
    int probe = ::open(tmp.path.c_str(), O_WRONLY | O_DIRECT);
    if (probe < 0 || fs.f_type == TMPFS_MAGIC) {
        if (probe >= 0) ::close(probe);
        MESSAGE("skipped: " << tmp.path << " is on a file system without O_DIRECT (or tmpfs, which caches anyway)");
        return;
    }
    ::close(probe);
    constexpr size_t kMiB = 1 << 20;
    auto* mem = static_cast<std::byte*>(std::aligned_alloc(4096, 4 * kMiB + 4096));
    REQUIRE(mem != nullptr);
    for (size_t i = 0; i < 4 * kMiB + 4096; ++i) mem[i] = std::byte(expected(i * 7));
    struct Write {
        uint64_t offset;
        std::span<const std::byte> data;
        bool direct;  // expected path
    };
    const std::vector<Write> writes{
        {0, {mem, 2 * kMiB}, true},                       // aligned, 2 MiB
        {2 * kMiB, {mem + 1, 2 * kMiB}, false},           // memory not aligned
        {4 * kMiB + 512, {mem, kMiB}, false},             // offset not aligned to a page
        {6 * kMiB, {mem, 256 * 1024}, false},             // aligned but small
        {8 * kMiB, {mem + 4096, kMiB + 4096}, true},      // aligned, not a power of two
    };
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, true);
    bool read_ok = true;
    asio::co_spawn(io, [&]() -> Task<void> {
        for (const Write& w : writes) co_await file->write_at(w.offset, w.data);
        for (const Write& w : writes) {
            std::vector<std::byte> back(w.data.size());
            size_t n = co_await file->read_at(w.offset, back);
            read_ok &= n == back.size() && std::equal(back.begin(), back.end(), w.data.begin());
        }
    }, asio::detached);
    io.run();
    CHECK(read_ok);
    std::free(mem);
    // The reads above fill the cache again: write once more and look before reading.
    io.restart();
    auto again = io::open_file(io.get_executor(), tmp.path, true);
    int fd = ::open(tmp.path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::fdatasync(fd) == 0);
    REQUIRE(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
    ::close(fd);
    auto* mem2 = static_cast<std::byte*>(std::aligned_alloc(4096, 4 * kMiB + 4096));
    REQUIRE(mem2 != nullptr);
    std::memset(mem2, 0x5a, 4 * kMiB + 4096);
    std::vector<Write> writes2;
    for (const Write& w : writes)
        writes2.push_back({w.offset, {mem2 + (w.data.data() - writes[0].data.data()), w.data.size()}, w.direct});
    asio::co_spawn(io, [&]() -> Task<void> {
        for (const Write& w : writes2) co_await again->write_at(w.offset, w.data);
    }, asio::detached);
    io.run();
    std::free(mem2);
    for (const Write& w : writes2) {
        INFO("write at ", w.offset, " of ", w.data.size(), " bytes");
        const size_t first = w.offset / 4096 * 4096;
        const size_t pages = (w.offset + w.data.size() - first + 4095) / 4096;
        const size_t cached = resident_pages(tmp.path, first, pages * 4096);
        if (w.direct)
            CHECK(cached == 0);
        else
            CHECK(cached == pages);
    }
}
