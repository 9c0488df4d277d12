// PooledBuffer: a dropped buffer serves the next request of its size class, whichever thread
// dropped it; large buffers are never kept; the cache keeps a bounded number.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "qcowfs/util/buffer_pool.hpp"

using namespace qcowfs;

TEST_CASE("PooledBuffer: a dropped buffer is reused for a request of its size class") {
    std::byte* first = nullptr;
    {
        PooledBuffer a(5000);
        CHECK(a.size() == 5000);
        std::memset(a.data(), 0x5a, a.size());  // all of it is writable
        first = a.data();
    }
    PooledBuffer b(8192);  // 5000 and 8192 share the 8 KiB class
    CHECK(b.data() == first);
    PooledBuffer c(5000);  // the cached one is taken: a new one
    CHECK(c.data() != first);
}

TEST_CASE("PooledBuffer: a buffer dropped on another thread serves this one") {
    PooledBuffer a(20000);
    std::byte* p = a.data();
    std::thread([buf = std::move(a)]() mutable { buf = PooledBuffer(); }).join();
    PooledBuffer b(30000);
    CHECK(b.data() == p);
}

TEST_CASE("PooledBuffer: large buffers are not kept, and the cache is bounded") {
    const size_t big = detail::BufferCache::kMaxCachedBytes + 1;
    CHECK(detail::pooled_capacity(big) == big);  // exactly what was asked, no rounding up
    CHECK(detail::pooled_capacity(1) == 4096);
    CHECK(detail::pooled_capacity(4097) == 8192);
    auto& cache = detail::buffer_cache();
    std::byte* large = detail::allocate_buffer(big);
    CHECK_FALSE(cache.give(large, big));
    detail::free_buffer(large);
    // Fill the cache with buffers of an unusual class; past kCachedBuffers it refuses.
    const size_t cls = 64 << 10;
    std::vector<std::byte*> taken;
    while (std::byte* q = cache.take(cls)) taken.push_back(q);  // what earlier cases left
    std::vector<std::byte*> kept;
    size_t refused = 0;
    for (size_t i = 0; i < 2 * detail::BufferCache::kCachedBuffers; ++i) {
        auto* q = detail::allocate_buffer(cls);
        if (cache.give(q, cls)) kept.push_back(q);
        else detail::free_buffer(q), ++refused;
    }
    CHECK(kept.size() <= detail::BufferCache::kCachedBuffers);
    CHECK(refused >= detail::BufferCache::kCachedBuffers);
    // Empty it again so later cases start as they would.
    while (std::byte* q = cache.take(cls)) detail::free_buffer(q);
    for (std::byte* q : taken) detail::free_buffer(q);
}

TEST_CASE("PooledBuffer: 1 MiB buffers (the largest read) are kept, within the byte budget") {
    using detail::BufferCache;
    const size_t mib = 1 << 20;
    CHECK(detail::pooled_capacity(mib) == mib);
    auto& cache = detail::buffer_cache();
    std::vector<std::byte*> taken;
    while (std::byte* q = cache.take(mib)) taken.push_back(q);
    std::vector<std::byte*> kept;
    for (size_t i = 0; i < BufferCache::kCachedBuffers; ++i) {
        auto* q = detail::allocate_buffer(mib);
        if (cache.give(q, mib)) kept.push_back(q);
        else detail::free_buffer(q);
    }
    CHECK(kept.size() >= 1);
    CHECK(kept.size() * mib <= BufferCache::kBudgetBytes);  // 16 slots, but 8 MiB at most
    CHECK(kept.size() < BufferCache::kCachedBuffers);
    {
        PooledBuffer b(mib);  // a 1 MiB reply comes from the cache
        CHECK(std::find(kept.begin(), kept.end(), b.data()) != kept.end());
    }
    while (std::byte* q = cache.take(mib)) detail::free_buffer(q);
    for (std::byte* q : taken) detail::free_buffer(q);
}
