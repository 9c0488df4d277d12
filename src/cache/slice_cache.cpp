// Bounded LRU slice cache with shared in-flight loads, dirty tracking and ordered write-back.
#include "qcowfs/cache/slice_cache.hpp"

#include <algorithm>
#include <boost/asio/this_coro.hpp>
#include <cstring>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"

namespace qcowfs::cache {

namespace {
// Largest single write flush() builds from adjacent dirty slices.
constexpr size_t kMaxCoalescedBytes = 1 << 20;
}  // namespace

SliceCache::SliceCache(io::File& file, size_t slice_bytes, size_t capacity_bytes)
    : file_(file), slice_bytes_(slice_bytes), capacity_slices_(std::max<size_t>(4, capacity_bytes / slice_bytes)) {}

Task<std::shared_ptr<const Slice>> SliceCache::get(uint64_t host_offset) {
    co_return co_await load(host_offset);
}

Task<std::shared_ptr<Slice>> SliceCache::get_for_write(uint64_t host_offset) {
    auto slice = co_await load(host_offset);
    // No co_await between here and the caller's modification: the mark covers it.
    mark_dirty(host_offset);
    co_return slice;
}

Task<SliceCache::Entry*> SliceCache::settled(uint64_t host_offset) {
    for (;;) {
        auto it = map_.find(host_offset);
        if (it == map_.end()) co_return nullptr;
        if (it->second.slice) co_return &it->second;
        // A read of this slice is in flight: wait for it, then look again (it may have failed).
        auto loaded = it->second.loaded;
        co_await loaded->wait();
    }
}

Task<std::shared_ptr<Slice>> SliceCache::create(uint64_t host_offset) {
    if (Entry* e = co_await settled(host_offset)) {
        // Cached (perhaps just read): overwrite it with zeros.
        std::fill(e->slice->bytes.begin(), e->slice->bytes.end(), std::byte{0});
        lru_.splice(lru_.begin(), lru_, e->lru);
        mark_dirty(host_offset);
        co_return e->slice;
    }
    auto slice = std::make_shared<Slice>();
    slice->host_offset = host_offset;
    slice->bytes.resize(slice_bytes_);
    lru_.push_front(host_offset);
    map_.emplace(host_offset, Entry{slice, nullptr, lru_.begin()});
    mark_dirty(host_offset);
    evict();
    co_return slice;
}

Task<std::shared_ptr<Slice>> SliceCache::load(uint64_t host_offset) {
    if (Entry* e = co_await settled(host_offset)) {
        ++hits_;
        lru_.splice(lru_.begin(), lru_, e->lru);
        co_return e->slice;
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
    it->second.loaded = nullptr;
    loaded->set();
    evict();
    co_return slice;
}

void SliceCache::mark_dirty(uint64_t host_offset) {
    ++map_.at(host_offset).version;
    dirty_.insert(host_offset);
}

void SliceCache::depends_on(SliceCache& other) {
    for (SliceCache* c = &other; c; c = c->dependency_)
        if (c == this) fail(EINVAL, "slice cache dependency would form a cycle");
    dependency_ = &other;
}

Task<void> SliceCache::flush() {
    // One flush at a time: a second one waits, then runs in full (it may find new dirty slices).
    auto guard = co_await flush_mutex_.lock();

    // Ordering rule: whatever the dependency holds is on stable storage before our first write.
    if (dependency_) {
        co_await dependency_->flush();
        if (dependency_->unsynced_) {
            co_await dependency_->file_.flush();
            dependency_->unsynced_ = false;
        }
    }
    co_await write_dirty();
}

Task<void> SliceCache::sync() {
    co_await flush();
    co_await file_.flush();
    unsynced_ = false;
}

Task<void> SliceCache::write_dirty() {
    // Snapshot runs of adjacent dirty slices (bytes copied, so later modifications cannot tear a
    // write in flight). Slices stay in dirty_ (and so stay cached) until their write succeeds, and
    // leave it only if nobody marked them again meanwhile.
    struct Run {
        uint64_t offset = 0;
        std::vector<std::byte> bytes;
        std::vector<std::pair<uint64_t, uint64_t>> versions;  // (slice offset, version copied)
    };
    std::vector<Run> runs;
    for (uint64_t off : dirty_) {
        if (runs.empty() || runs.back().offset + runs.back().bytes.size() != off ||
            runs.back().bytes.size() + slice_bytes_ > kMaxCoalescedBytes)
            runs.push_back(Run{off, {}, {}});
        const Entry& e = map_.at(off);
        runs.back().bytes.insert(runs.back().bytes.end(), e.slice->bytes.begin(), e.slice->bytes.end());
        runs.back().versions.emplace_back(off, e.version);
    }
    for (auto& run : runs) {
        co_await file_.write_at(run.offset, run.bytes);
        unsynced_ = true;
        for (auto [off, version] : run.versions) {
            auto it = map_.find(off);
            if (it != map_.end() && it->second.version == version) dirty_.erase(off);
        }
    }
    evict();
}

void SliceCache::evict() {
    // Walk from the least recently used end; slices still loading and dirty slices stay.
    auto pos = lru_.end();
    while (map_.size() > capacity_slices_ && pos != lru_.begin()) {
        --pos;
        auto it = map_.find(*pos);
        if (!it->second.slice || dirty_.count(*pos)) continue;
        pos = lru_.erase(pos);
        map_.erase(it);
    }
}

}  // namespace qcowfs::cache
