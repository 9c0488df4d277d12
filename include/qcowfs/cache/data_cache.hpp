// The data write-back cache of one writable disk: writes land in memory, go to the image coalesced.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>
#include <span>

#include "qcowfs/util/task.hpp"

namespace qcowfs::cache {

/// The disk a DataCache writes back to (the active disk of a qcow2 image). Every method may be
/// called concurrently from coroutines of one image and throws std::system_error on failure.
class CacheTarget {
public:
    virtual ~CacheTarget() = default;
    /// Virtual size in bytes.
    virtual uint64_t size() const = 0;
    /// Fills `buf` with the disk's bytes at `offset` (past size(): zeros).
    virtual Task<void> read(uint64_t offset, std::span<std::byte> buf) = 0;
    /// Writes `data` at `offset`; the range lies inside size().
    virtual Task<void> write(uint64_t offset, std::span<const std::byte> data) = 0;
    /// Makes [offset, offset + length) read as zeros without a data buffer. `discard`: give the
    /// space back (fallocate PUNCH_HOLE); otherwise keep or reserve it as the format allows
    /// (FALLOC_FL_ZERO_RANGE).
    virtual Task<void> write_zeroes(uint64_t offset, uint64_t length, bool discard) = 0;
    /// Returns once everything written to the target so far is on stable storage.
    virtual Task<void> flush() = 0;
};

/// Write-back cache of guest data for one disk, shared by every handle of that disk.
///
/// write() copies the data into memory and returns. Two kinds of write go to the target at once
/// instead (under the same range lock, replacing what was cached under them): a write of 256 KiB
/// or more, which is already as large as a coalesced write-back, and — with
/// SmallWrites::cache_streams, the default — a small write that neither continues the previous
/// write nor falls inside cached data: a random write, which the cache could not join with
/// anything and would only copy twice (measured: 4 KiB random writes at queue depth 32 into an
/// empty image ran at a third of the speed through the cache). write_zeroes() records a known-zero range
/// without a buffer. read() returns the target's bytes with every cached change laid over them.
/// Dirty data goes to the target coalesced (adjacent ranges in one target write, in offset order)
/// when the cached data passes `limit_bytes` (the writer that pushed it over waits for the
/// write-back: back-pressure), on write_back() and on flush(). Requests on overlapping ranges
/// are ordered by a RangeLock: a read never sees half of a write, and two write-backs of one
/// range reach the target in the order the data was written.
///
/// Errors: a failed target write leaves its data cached and dirty; the error is thrown to the
/// caller that triggered the write-back (write(), write_back(), flush()), and later flushes try
/// again.
///
/// Not thread-safe: all calls under the image's lock.
class DataCache {
public:
    /// Which writes under 256 KiB are cached.
    enum class SmallWrites {
        cache_streams,  // those that continue the previous write or rewrite cached data
        cache_all,      // all of them
    };

    DataCache(CacheTarget& target, size_t limit_bytes, SmallWrites small = SmallWrites::cache_streams);
    ~DataCache();
    DataCache(const DataCache&) = delete;
    DataCache& operator=(const DataCache&) = delete;

    /// Reads through the cache. `offset + buf.size()` may pass size(): that part reads as zeros.
    Task<void> read(uint64_t offset, std::span<std::byte> buf);
    /// Caches `data` at `offset` (inside the target's size). May wait for a write-back. A large
    /// write is written to the target before this returns, replacing what was cached there.
    Task<void> write(uint64_t offset, std::span<const std::byte> data);
    /// Caches "reads as zeros" for the range (inside the target's size), no buffer kept; written
    /// back as target.write_zeroes(…, discard). A later write over part of it splits it.
    Task<void> write_zeroes(uint64_t offset, uint64_t length, bool discard);
    /// Writes every cached change to the target (not necessarily durable).
    Task<void> write_back();
    /// write_back(), then target.flush(): everything written so far is durable.
    Task<void> flush();
    /// Forgets cached changes at or beyond `size` (the disk is being shrunk to `size`); a change
    /// that straddles it is cut.
    void truncate(uint64_t size);

    /// Bytes of cached data buffers (zero ranges count nothing).
    size_t dirty_bytes() const;
    /// True if nothing is cached.
    bool empty() const;
    /// The guest ranges with cached changes (data or zeros), adjacent ones merged, as
    /// (offset, length), at most `max` of them (the rest folded into the last one's report by
    /// the caller); for saying exactly what a failed write-back loses.
    std::vector<std::pair<uint64_t, uint64_t>> dirty_ranges(size_t max) const;

private:
    struct State;
    std::unique_ptr<State> state_;
};

}  // namespace qcowfs::cache
