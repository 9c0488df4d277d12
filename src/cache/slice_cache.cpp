// Bounded LRU slice cache with shared in-flight loads.
#include "qcowfs/cache/slice_cache.hpp"

#include <algorithm>
#include <boost/asio/this_coro.hpp>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"

namespace qcowfs::cache {

SliceCache::SliceCache(io::File& file, size_t slice_bytes, size_t capacity_bytes)
    : file_(file), slice_bytes_(slice_bytes), capacity_slices_(std::max<size_t>(4, capacity_bytes / slice_bytes)) {}

Task<std::shared_ptr<const Slice>> SliceCache::get(uint64_t host_offset) {
    for (;;) {
        auto it = map_.find(host_offset);
        if (it == map_.end()) break;
        if (it->second.slice) {
            ++hits_;
            lru_.splice(lru_.begin(), lru_, it->second.lru);
            co_return it->second.slice;
        }
        // Another coroutine is reading this slice: wait for it, then look again (it may have failed).
        auto loaded = it->second.loaded;
        co_await loaded->wait();
    }

    ++misses_;
    auto loaded = std::make_shared<AsyncEvent>(co_await asio::this_coro::executor);
    lru_.push_front(host_offset);
    map_.emplace(host_offset, Entry{nullptr, loaded, lru_.begin()});

    auto slice = std::make_shared<Slice>();
    slice->host_offset = host_offset;
    slice->bytes.resize(slice_bytes_);
    std::exception_ptr error;
    try {
        size_t n = co_await file_.read_at(host_offset, slice->bytes);
        if (n != slice_bytes_)
            corrupt("metadata at offset " + std::to_string(host_offset) + " lies beyond the end of " + file_.name());
    } catch (...) {
        error = std::current_exception();
    }

    auto it = map_.find(host_offset);
    if (error) {
        lru_.erase(it->second.lru);
        map_.erase(it);
        loaded->set();
        std::rethrow_exception(error);
    }
    it->second.slice = slice;
    loaded->set();
    evict();
    co_return slice;
}

void SliceCache::evict() {
    // Walk from the least recently used end; slices still loading stay.
    auto pos = lru_.end();
    while (map_.size() > capacity_slices_ && pos != lru_.begin()) {
        --pos;
        auto it = map_.find(*pos);
        if (!it->second.slice) continue;
        pos = lru_.erase(pos);
        map_.erase(it);
    }
}

}  // namespace qcowfs::cache
