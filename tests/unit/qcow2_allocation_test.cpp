// Allocation per request: once warm, an open image's writes (into new clusters, in place, copy-on-
// write from a backing file) and reads allocate nothing per request. Counted by replacing the
// global operator new of this test binary (not under AddressSanitizer, which has its own).
#include <doctest/doctest.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "test_host_files.hpp"
#include "test_image_builder.hpp"

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define QCOWFS_TEST_NO_NEW_COUNT 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define QCOWFS_TEST_NO_NEW_COUNT 1
#endif

namespace {
std::atomic<uint64_t> news{0};  // calls of any global operator new, in this process
}

#ifndef QCOWFS_TEST_NO_NEW_COUNT
namespace {
void* counted(std::size_t n, std::size_t align) {
    news.fetch_add(1, std::memory_order_relaxed);
    if (n == 0) n = 1;
    void* p = align <= alignof(std::max_align_t) ? std::malloc(n) : std::aligned_alloc(align, (n + align - 1) / align * align);
    if (!p) throw std::bad_alloc();
    return p;
}
}  // namespace
void* operator new(std::size_t n) { return counted(n, 0); }
void* operator new[](std::size_t n) { return counted(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    try {
        return counted(n, 0);
    } catch (...) {
        return nullptr;
    }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif

using namespace qcowfs;
using namespace qcowfs::test::host;

namespace {

constexpr uint64_t kCluster = 64 << 10;
constexpr int kRequests = 256;

struct Opened {
    TempDir dir;
    asio::io_context io;
    std::shared_ptr<qcow2::Image> image;

    explicit Opened(bool with_backing) {
        const std::string img = dir.path + "/img.qcow2";
        std::string out;
        if (with_backing) {
            REQUIRE(sh("qemu-img create -f qcow2 " + dir.path + "/base.qcow2 64M", &out) == 0);
            REQUIRE(sh("qemu-io -c 'write -P 0x5a 0 64M' " + dir.path + "/base.qcow2", &out) == 0);
            REQUIRE(sh("cd " + dir.path + " && qemu-img create -f qcow2 -b base.qcow2 -F qcow2 " + img, &out) == 0);
        } else {
            REQUIRE(sh("qemu-img create -f qcow2 " + img + " 64M", &out) == 0);
        }
        qcow2::OpenOptions o;
        o.opener = [this](const std::string& path, bool w) { return io::open_file(io.get_executor(), path, w); };
        o.writable = true;
        image = test::run(io, qcow2::Image::open(img, o));
    }
    ~Opened() {
        if (image) test::run(io, image->close());
    }

    /// operator new calls made by `requests` 4 KiB requests, each at 1 KiB into cluster
    /// first + i: a write (of `fill`) or a read.
    uint64_t news_for(bool write, uint64_t first, int requests, std::byte fill = std::byte{0x33}) {
        std::vector<std::byte> buf(4096, fill);
        auto view = image->active();
        const uint64_t before = news.load();
        test::run(io, [&]() -> Task<void> {
            for (int i = 0; i < requests; ++i) {
                const uint64_t at = (first + i) * kCluster + 1024;
                if (write)
                    co_await image->write(at, buf);
                else
                    co_await view->read(at, buf);
            }
        }());
        return news.load() - before;
    }
};

}  // namespace

TEST_CASE("once warm, writes into new clusters, in place and with copy-on-write, and reads allocate nothing") {
#ifdef QCOWFS_TEST_NO_NEW_COUNT
    MESSAGE("skipped: a sanitizer build has its own operator new");
    return;
#else
    if (!have_qemu()) return;
    for (bool backing : {false, true}) {
        CAPTURE(backing);
        Opened o(backing);
        // Warm: the L2 table and refcount block are loaded, the first frames and buffers exist.
        o.news_for(true, 0, 16);
        o.news_for(false, 0, 16);
        // New clusters (copy-on-write around the 4 KiB when there is a backing file).
        CHECK(o.news_for(true, 16, kRequests) <= kRequests / 32);
        // The same clusters again, in place.
        CHECK(o.news_for(true, 16, kRequests, std::byte{0x44}) <= kRequests / 32);
        CHECK(o.news_for(false, 16, kRequests) <= kRequests / 32);
        // Reads of clusters never written (backing file or zeros).
        CHECK(o.news_for(false, 16 + kRequests, kRequests) <= kRequests / 32);
    }
#endif
}
