// io::open_file over a real temporary file: io_uring reads and writes, concurrency, EOF, errors.
#include <doctest/doctest.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/util/workers.hpp"

using namespace qcowfs;

// Fault injection for write-behind: while fail_write_back_wait is set, a sync_file_range that
// waits for write-back fails with it, as it does when the disk failed a write. Every other call
// goes to the C library's.
namespace {
std::atomic<int> fail_write_back_wait{0};
}
extern "C" int sync_file_range(int fd, __off64_t offset, __off64_t count, unsigned int flags) {
    if ((flags & SYNC_FILE_RANGE_WAIT_AFTER) && fail_write_back_wait.load() != 0) {
        errno = fail_write_back_wait.load();
        return -1;
    }
    using Real = int (*)(int, __off64_t, __off64_t, unsigned int);
    static Real real = reinterpret_cast<Real>(::dlsym(RTLD_NEXT, "sync_file_range"));
    return real(fd, offset, count, flags);
}

// Watching small writes (the combining test below): while write_gate_armed is set, a pwritev at
// offset 0 waits until write_gate_open is set, and one that covers write_fail_at fails with EIO.
// pwritev calls of more than one piece (writes combined) are counted. qcowfs writes only with
// pwritev.
namespace {
std::atomic<bool> write_gate_armed{false}, write_gate_entered{false}, write_gate_open{false};
std::atomic<int64_t> write_fail_at{-1};
std::atomic<int> pwritev_calls{0};
bool write_covers_failure(off_t offset, size_t length) {
    const int64_t at = write_fail_at.load();
    return at >= 0 && at >= offset && at < offset + static_cast<int64_t>(length);
}
}  // namespace
extern "C" ssize_t pwritev(int fd, const struct iovec* iov, int count, off_t offset) {
    if (write_gate_armed.load()) {
        if (offset == 0) {
            write_gate_entered = true;
            while (!write_gate_open.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        if (count > 1) ++pwritev_calls;
        size_t length = 0;
        for (int i = 0; i < count; ++i) length += iov[i].iov_len;
        if (write_covers_failure(offset, length)) {
            errno = EIO;
            return -1;
        }
    }
    using Real = ssize_t (*)(int, const struct iovec*, int, off_t);
    static Real real = reinterpret_cast<Real>(::dlsym(RTLD_NEXT, "pwritev"));
    return real(fd, iov, count, offset);
}

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

/// Drops `path` from the page cache, then reads the one page at `page_at` back into it (with
/// readahead off): a file of which exactly one page is cached.
void cache_only_page(const std::string& path, off_t page_at) {
    int fd = ::open(path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::fdatasync(fd) == 0);
    REQUIRE(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
    REQUIRE(::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM) == 0);  // no readahead: only that page
    char page[4096];
    REQUIRE(::pread(fd, page, sizeof page, page_at) == static_cast<ssize_t>(sizeof page));
    ::close(fd);
}

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
    cache_only_page(tmp.path, 200 * 1024);

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

/// Whether `path`'s page cache can be watched: not on tmpfs, where the cache is the file.
bool page_cache_visible(const std::string& path) {
    struct statfs fs;
    REQUIRE(::statfs(path.c_str(), &fs) == 0);
    if (fs.f_type != TMPFS_MAGIC) return true;
    MESSAGE("skipped: " << path << " is on tmpfs, whose pages are the file itself");
    return false;
}

TEST_CASE("streaming writes (1 MiB or more) are written behind and leave the page cache; the others stay") {
    TempFile tmp(0);
    if (!page_cache_visible(tmp.path)) return;
    constexpr size_t kMiB = 1 << 20;
    auto* mem = static_cast<std::byte*>(std::aligned_alloc(4096, 4 * kMiB + 4096));
    REQUIRE(mem != nullptr);
    for (size_t i = 0; i < 4 * kMiB + 4096; ++i) mem[i] = std::byte(expected(i * 7));
    struct Write {
        uint64_t offset;
        std::span<const std::byte> data;
        bool stream;  // expected path
    };
    const std::vector<Write> writes{
        {0, {mem, 2 * kMiB}, true},                  // 2 MiB
        {2 * kMiB, {mem + 1, 2 * kMiB}, true},       // memory not aligned: no matter
        {4 * kMiB + 512, {mem, kMiB}, true},         // offset not aligned to a page
        {6 * kMiB, {mem, 256 * 1024}, false},        // small
        {8 * kMiB, {mem + 4096, kMiB + 4096}, true}, // not a power of two
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
    // The reads above fill the cache again: write once more, flush, and look before reading.
    io.restart();
    int fd = ::open(tmp.path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::fdatasync(fd) == 0);
    REQUIRE(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
    ::close(fd);
    std::memset(mem, 0x5a, 4 * kMiB + 4096);
    asio::co_spawn(io, [&]() -> Task<void> {
        for (const Write& w : writes) co_await file->write_at(w.offset, w.data);
        co_await file->flush();
    }, asio::detached);
    io.run();
    std::free(mem);
    for (const Write& w : writes) {
        INFO("write at ", w.offset, " of ", w.data.size(), " bytes");
        const size_t first = w.offset / 4096 * 4096;
        const size_t pages = (w.offset + w.data.size() - first + 4095) / 4096;
        const size_t cached = resident_pages(tmp.path, first, pages * 4096);
        if (w.stream)
            CHECK(cached <= 2);  // a partial page at either end may stay
        else
            CHECK(cached == pages);
    }
}

TEST_CASE("a long stream holds a bounded part of the page cache before any flush, and reads back") {
    TempFile tmp(0);
    if (!page_cache_visible(tmp.path)) return;
    constexpr size_t kMiB = 1 << 20, kTotal = 48 * kMiB;
    std::vector<std::byte> chunk(kMiB);
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, true);
    bool read_ok = true;
    size_t early_cached = SIZE_MAX, late_cached = 0;
    asio::co_spawn(io, [&]() -> Task<void> {
        for (size_t at = 0; at < kTotal; at += kMiB) {
            for (size_t i = 0; i < kMiB; i += 4096) chunk[i] = std::byte(at / kMiB + i / 4096);
            co_await file->write_at(at, chunk);
        }
        // Everything but the last few MiB has been written back and dropped by now.
        early_cached = resident_pages(tmp.path, 0, 32 * kMiB);
        late_cached = resident_pages(tmp.path, kTotal - 4 * kMiB, 4 * kMiB);
        std::vector<std::byte> back(kMiB);
        for (size_t at = 0; at < kTotal; at += kMiB) {
            size_t n = co_await file->read_at(at, back);
            bool same = n == back.size();
            for (size_t i = 0; same && i < kMiB; i += 4096) same = back[i] == std::byte(at / kMiB + i / 4096);
            read_ok &= same;
        }
    }, asio::detached);
    io.run();
    CHECK(read_ok);
    CHECK(early_cached == 0);
    CHECK(late_cached > 0);  // the newest writes are still in the cache: dropped by the window, not by chance
}

TEST_CASE("a write-back error seen while writing behind fails the next flush, once") {
    TempFile tmp(0);
    constexpr size_t kMiB = 1 << 20;
    std::vector<std::byte> chunk(kMiB, std::byte{0x11});
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, true);
    int first = 0, second = -1;
    std::string said;
    fail_write_back_wait = EIO;
    asio::co_spawn(io, [&]() -> Task<void> {
        for (size_t at = 0; at < 16 * kMiB; at += kMiB) co_await file->write_at(at, chunk);  // waits from the 9th
        fail_write_back_wait = 0;
        try {
            co_await file->flush();
        } catch (const std::system_error& e) {
            first = e.code().value();
            said = e.what();
        }
        second = 0;
        try {
            co_await file->flush();
        } catch (const std::system_error& e) {
            second = e.code().value();
        }
    }, asio::detached);
    io.run();
    fail_write_back_wait = 0;
    CHECK(first == EIO);
    CHECK(said.find(tmp.path) != std::string::npos);
    CHECK(second == 0);  // said once, as fdatasync says a write-back error once
}

TEST_CASE("small writes of an image on two workers are combined while one writes: each gets its bytes and its own error") {
    // Worker 0's write at offset 0 is held inside pwritev; meanwhile worker 1's coroutines write
    // eight adjacent 4 KiB pieces. They must wait for the writer (the inode lock would make them
    // spin) and be written together with one pwritev; the piece the disk fails gets EIO, alone.
    TempFile tmp(1 << 20);
    Workers workers(2);
    auto lock = ImageLockRef::make();
    auto file = io::open_file(workers.image_executor(lock), tmp.path, true);
    constexpr int kPieces = 8;
    constexpr uint64_t kBase = 65536, kPiece = 4096;
    const int64_t bad = static_cast<int64_t>(kBase + 5 * kPiece);
    std::vector<std::vector<std::byte>> data;
    for (int i = 0; i <= kPieces; ++i) data.emplace_back(kPiece, std::byte(0xa0 + i));
    std::atomic<int> finished{0}, started{0};
    std::vector<int> error(kPieces + 1, -1);
    std::vector<std::string> message(kPieces + 1);
    auto write = [&](int i, uint64_t offset) -> Task<void> {
        ++started;
        try {
            co_await file->write_at(offset, data[i]);
            error[i] = 0;
        } catch (const std::system_error& e) {
            error[i] = e.code().value();
            message[i] = e.what();
        }
    };
    pwritev_calls = 0;
    write_gate_open = false;
    write_gate_entered = false;
    write_fail_at = bad;
    write_gate_armed = true;
    asio::post(workers.context(0), [&] {
        asio::co_spawn(workers.image_executor(lock), write(kPieces, 0), [&](std::exception_ptr) { ++finished; });
    });
    std::thread opener([&] {
        while (!write_gate_entered) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        asio::post(workers.context(1), [&] {
            for (int i = 0; i < kPieces; ++i)
                asio::co_spawn(workers.image_executor(lock), write(i, kBase + i * kPiece), [&](std::exception_ptr) { ++finished; });
        });
        while (started < kPieces + 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // until they are parked
        write_gate_open = true;
    });
    std::thread watchdog([&] {
        auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (finished < kPieces + 1 && std::chrono::steady_clock::now() < limit) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        workers.stop();
    });
    workers.run_all();
    opener.join();
    watchdog.join();
    write_gate_armed = false;
    write_fail_at = -1;
    REQUIRE(finished == kPieces + 1);
    CHECK(pwritev_calls >= 1);  // the parked pieces went out together
    for (int i = 0; i <= kPieces; ++i) {
        const uint64_t offset = i == kPieces ? 0 : kBase + i * kPiece;
        INFO("piece at ", offset);
        if (static_cast<int64_t>(offset) == bad) {
            CHECK(error[i] == EIO);
            CHECK(message[i].find(tmp.path) != std::string::npos);
            CHECK(message[i].find(std::to_string(offset)) != std::string::npos);
        } else {
            CHECK(error[i] == 0);
        }
    }
    // What the file holds: every piece but the failed one, the rest as it was.
    std::ifstream in(tmp.path, std::ios::binary);
    std::vector<char> back(1 << 20);
    in.read(back.data(), static_cast<std::streamsize>(back.size()));
    REQUIRE(in.gcount() == static_cast<std::streamsize>(back.size()));
    for (uint64_t at = 0; at < kBase + kPieces * kPiece; ++at) {
        char want = expected(at);
        if (at < kPiece)
            want = static_cast<char>(0xa0 + kPieces);
        else if (at >= kBase && static_cast<int64_t>(at / kPiece * kPiece) != bad)
            want = static_cast<char>(0xa0 + (at - kBase) / kPiece);
        if (back[at] != want) {
            FAIL_CHECK("byte ", at, " is ", int(back[at]), ", expected ", int(want));
            break;
        }
    }
}

namespace {
/// Whether the kernel has cachestat (Linux 6.5), without which read_to_copy reads as read_at.
bool kernel_has_cachestat(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    struct {
        uint64_t off, len;
    } range{0, 4096};
    uint64_t stat[5] = {};
    const bool has = ::syscall(451, fd, &range, stat, 0) == 0 || errno != ENOSYS;
    ::close(fd);
    if (!has) MESSAGE("page-cache checks skipped: this kernel has no cachestat (before 6.5)");
    return has;
}
}  // namespace

TEST_CASE("reads to copy of ranges not in the page cache leave it as it was; every read to copy returns the right bytes") {
    // read_to_copy (a copy-on-write's read of old data) reads an aligned range of which no page
    // is cached with O_DIRECT: no page enters the cache, and no readahead past the range.
    // Cached, unaligned and end-of-file ranges go as read_at does.
    constexpr size_t kSize = (2 << 20) - 1000;  // the last page is partial
    TempFile tmp(kSize);
    const bool watch = page_cache_visible(tmp.path) && kernel_has_cachestat(tmp.path);
    cache_only_page(tmp.path, (1 << 20) + 65536);

    auto* mem = static_cast<std::byte*>(std::aligned_alloc(4096, 512 * 1024));
    REQUIRE(mem != nullptr);
    struct Case {
        uint64_t offset;
        size_t length;
        size_t shift;     // of the buffer from a page boundary
        bool to_copy;     // read_to_copy, else read_at
        size_t got = 0;
        bool good = false;
    };
    std::vector<Case> cases{
        {0, 65536, 0, true},                    // aligned, not cached: direct
        {(1 << 20), 262144, 0, true},           // holds the cached page: through the cache
        {512 * 1024 + 4096, 65536, 512, true},  // memory not aligned: through the cache
        {(2 << 20) - 65536, 65536, 0, true},    // ends past the end of the file
        {256 * 1024, 65536, 0, false},          // read_at, for contrast: fills the cache
    };
    asio::io_context io;
    auto file = io::open_file(io.get_executor(), tmp.path, false);
    asio::co_spawn(io, [&]() -> Task<void> {
        for (Case& c : cases) {
            std::span<std::byte> buf(mem + c.shift, c.length);
            std::memset(buf.data(), 0xee, buf.size());
            if (c.to_copy)
                c.got = co_await file->read_to_copy(c.offset, buf);
            else
                c.got = co_await file->read_at(c.offset, buf);
            c.good = true;
            for (size_t i = 0; i < c.got; ++i) c.good &= buf[i] == std::byte(expected(c.offset + i));
        }
    }, asio::detached);
    io.run();
    std::free(mem);
    for (const Case& c : cases) {
        INFO("offset ", c.offset, " length ", c.length, " shift ", c.shift);
        CHECK(c.got == std::min<uint64_t>(c.length, kSize - c.offset));
        CHECK(c.good);
    }
    if (!watch) return;
    CHECK(resident_pages(tmp.path, 0, 256 * 1024) == 0);  // the direct read, and no readahead after it
    CHECK(resident_pages(tmp.path, 256 * 1024, 65536) > 0);  // the same look sees read_at's pages
}
