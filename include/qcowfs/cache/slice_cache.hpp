// A bounded LRU cache of metadata slices (parts of L2 tables or refcount blocks) keyed by host offset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::io {
class File;
}

namespace qcowfs::cache {

/// One cached slice: `bytes` as on disk (big-endian entries).
struct Slice {
    uint64_t host_offset = 0;
    std::vector<std::byte> bytes;
};

/// Caches fixed-size slices of one host file. Concurrent misses on the same slice share one read.
/// Memory is bounded by `capacity_bytes` (at least a few slices are always kept).
/// Not thread-safe: used from the owning image's strand only.
class SliceCache {
public:
    SliceCache(io::File& file, size_t slice_bytes, size_t capacity_bytes);

    size_t slice_bytes() const { return slice_bytes_; }

    /// Returns the slice at `host_offset` (a multiple of slice_bytes), reading it on a miss.
    /// Throws std::system_error(EIO) if the slice lies (partly) beyond the end of the file, or the
    /// read's error. A failed read is not cached: the next call tries again.
    Task<std::shared_ptr<const Slice>> get(uint64_t host_offset);

    size_t hits() const { return hits_; }
    size_t misses() const { return misses_; }
    size_t cached_slices() const { return map_.size(); }

private:
    struct Entry {
        std::shared_ptr<const Slice> slice;  // null while loading
        std::shared_ptr<AsyncEvent> loaded;  // set when the load finishes (either way)
        std::list<uint64_t>::iterator lru;
    };
    void evict();

    io::File& file_;
    size_t slice_bytes_;
    size_t capacity_slices_;
    std::unordered_map<uint64_t, Entry> map_;
    std::list<uint64_t> lru_;  // front: most recently used
    size_t hits_ = 0;
    size_t misses_ = 0;
};

}  // namespace qcowfs::cache
