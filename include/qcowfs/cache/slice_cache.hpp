// A bounded LRU cache of metadata slices (parts of L2 tables or refcount blocks) keyed by host offset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <set>
#include <unordered_map>
#include <vector>

#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/async_mutex.hpp"
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
/// Memory is bounded by `capacity_bytes` (at least a few slices are always kept), except that dirty
/// slices are never evicted: they stay until flush() has written them.
///
/// Write-back: get_for_write() and create() hand out a slice for modification and mark it dirty;
/// nothing is written until flush(). Write ordering between caches is expressed with depends_on():
/// a cache writes its dirty slices only after the cache it depends on has been flushed and its file
/// synced (e.g. the L2 cache depends on the refcount cache: a refcount increase reaches the disk
/// before the L2 entry that uses the cluster).
///
/// Not thread-safe: used under the owning image's lock only.
class SliceCache {
public:
    SliceCache(io::File& file, size_t slice_bytes, size_t capacity_bytes);

    size_t slice_bytes() const { return slice_bytes_; }

    /// Returns the slice at `host_offset` (a multiple of slice_bytes), reading it on a miss.
    /// Throws std::system_error(EIO) if the slice lies (partly) beyond the end of the file, or the
    /// read's error. A failed read is not cached: the next call tries again.
    Task<std::shared_ptr<const Slice>> get(uint64_t host_offset);

    /// As get(), then marks the slice dirty and returns it for modification. Modify it before the
    /// next co_await (or call get_for_write again after one): a flush() that started earlier keeps
    /// the slice dirty only if it was marked again after that flush copied it. Readers holding the
    /// slice see the modification. Throws as get().
    Task<std::shared_ptr<Slice>> get_for_write(uint64_t host_offset);

    /// Returns a zero-filled dirty slice at `host_offset` without reading the file: for metadata in
    /// a newly allocated cluster, whose old content is garbage. A cached slice at that offset is
    /// zeroed in place. Waits only for a read of that slice already in flight; does not fail.
    Task<std::shared_ptr<Slice>> create(uint64_t host_offset);

    /// Writes every dirty slice, adjacent ones coalesced into one write, in offset order. First
    /// flushes the cache this one depends on and syncs (File::flush) that cache's file if it wrote
    /// anything not yet synced, so dependencies reach stable storage first; this happens on every
    /// flush(), even with nothing dirty here. Does not sync this cache's own file (see sync()).
    /// Concurrent flushes are serialized. On a write error the slices not written stay dirty and
    /// the error is thrown.
    Task<void> flush();

    /// flush(), then File::flush() of this cache's file: everything this cache holds is durable.
    Task<void> sync();

    /// Before writing any of its dirty slices, this cache flushes `other` and syncs `other`'s file.
    /// Lasts for the life of the cache; replaces an earlier dependency. Throws
    /// std::system_error(EINVAL) if it would create a cycle.
    void depends_on(SliceCache& other);

    size_t hits() const { return hits_; }
    size_t misses() const { return misses_; }
    size_t cached_slices() const { return map_.size(); }
    size_t dirty_slices() const { return dirty_.size(); }

private:
    struct Entry {
        std::shared_ptr<Slice> slice;        // null while loading
        std::shared_ptr<AsyncEvent> loaded;  // set when the load finishes (either way)
        std::list<uint64_t>::iterator lru;
        uint64_t version = 0;  // bumped each time the slice is handed out for writing
    };
    Task<std::shared_ptr<Slice>> load(uint64_t host_offset);
    /// The cached entry once no read of it is in flight, or nullptr if it is not cached. The
    /// pointer stays valid until the caller's next co_await.
    Task<Entry*> settled(uint64_t host_offset);
    void mark_dirty(uint64_t host_offset);
    Task<void> write_dirty();
    void evict();

    io::File& file_;
    size_t slice_bytes_;
    size_t capacity_slices_;
    std::unordered_map<uint64_t, Entry> map_;
    std::list<uint64_t> lru_;  // front: most recently used
    std::set<uint64_t> dirty_;  // offsets of dirty slices; each is in map_ and never evicted
    SliceCache* dependency_ = nullptr;
    bool unsynced_ = false;  // slices written since this cache last synced its file
    AsyncMutex flush_mutex_;  // serializes flush()
    size_t hits_ = 0;
    size_t misses_ = 0;
};

}  // namespace qcowfs::cache
