// The data write-back cache: guest writes held in memory under range locks, written back coalesced.
#include "qcowfs/cache/data_cache.hpp"

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/this_coro.hpp>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qcowfs/cache/range_lock.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/async_mutex.hpp"

namespace qcowfs::cache {

namespace {
// Largest single target write built from adjacent dirty data, and the size up to which a data
// extent grows by appending the write that follows it.
constexpr uint64_t kMaxWriteBytes = 1 << 20;
// A write of at least this many bytes goes straight to the target instead of being cached:
// caching it would copy it twice (into the cache, then into a write-back call) to save nothing,
// as it is already as large as a coalesced write-back. Smaller writes go straight to the target
// too unless they continue the previous write or rewrite cached data (see DataCache::write).
constexpr uint64_t kWriteThroughBytes = 256 << 10;
// Runs of one write-back in flight at once.
constexpr size_t kParallelRuns = 16;
// What one cached extent costs besides its buffer (map node, bookkeeping). Counted against the
// limit, so that many small zero ranges cannot grow the map without bound.
constexpr size_t kExtentOverhead = 64;
constexpr uint64_t kEnd = std::numeric_limits<uint64_t>::max();
}  // namespace

// Invariants (all under the image's lock):
// - extents_ holds non-overlapping, non-empty ranges; a data extent's buffer is exactly `length`
//   bytes; dirty_ is the sum of those lengths.
// - The map changes inside a range only while the changer holds an exclusive lock on it
//   (write(), write_zeroes(), a write-back's removal of what it wrote), or in truncate().
//   Exception: a write appends to the data extent just before it, which may extend an extent
//   that lies in another request's locked range; the bytes inside that range do not change.
// - A read holds a shared lock on its range across the target read and the overlay, and a
//   write-back holds an exclusive lock on the range it writes from snapshot to removal, so the
//   target bytes under a read cannot change, and what a write-back removes is what it wrote.
// Lock order: writeback_ (AsyncMutex) before any range lock. Nobody waits for writeback_ while
// holding a range lock: a writer over the limit makes room before it takes its own range lock.
struct DataCache::State {
    struct Extent {
        uint64_t length = 0;
        bool zero = false;             // reads as zeros; no buffer
        bool discard = false;          // zero extents: written back with discard
        std::vector<std::byte> data;   // data extents: the `length` bytes
    };
    /// One target call of a write-back: bytes copied out of the map, so the map may change
    /// (outside the locked range) while the call is in flight.
    struct Call {
        uint64_t offset = 0;
        uint64_t length = 0;
        bool zero = false;
        bool discard = false;
        std::vector<std::byte> data;
    };

    State(CacheTarget& target, size_t limit_bytes, SmallWrites small)
        : target_(target), limit_(limit_bytes), small_(small) {}

    CacheTarget& target_;
    size_t limit_;
    SmallWrites small_;
    std::map<uint64_t, Extent> extents_;  // guest offset -> extent
    size_t dirty_ = 0;                    // bytes in data buffers
    std::optional<RangeLock> ranges_;     // made on first use, with the first caller's executor
    AsyncMutex writeback_;                // one write-back at a time (see lock order above)
    uint64_t sweep_ = 0;                  // where the next limit-triggered write-back starts
    uint64_t stream_end_ = kEnd;          // where the last write ended: a write there continues it

    RangeLock& ranges(const Executor& ex) {
        if (!ranges_) ranges_.emplace(ex);
        return *ranges_;
    }

    size_t memory() const { return dirty_ + extents_.size() * kExtentOverhead; }

    /// Whether a small write of [offset, offset + length) is worth caching: it continues the
    /// previous write (a sequential stream, which the cache joins into large target writes) or it
    /// falls inside one cached data extent (rewritten in place). Anything else — a random write —
    /// gains nothing from the cache but a second copy and a later write-back, so it goes to the
    /// target at once. Notes where this write ends for the next call.
    bool worth_caching(uint64_t offset, uint64_t length) {
        if (small_ == SmallWrites::cache_all) return true;
        const bool continues = offset == stream_end_;
        stream_end_ = offset + length;
        if (continues) return true;
        auto it = extents_.upper_bound(offset);
        if (it == extents_.begin()) return false;
        --it;
        return !it->second.zero && offset + length <= end_of(it);
    }

    static uint64_t end_of(const std::map<uint64_t, Extent>::const_iterator& it) {
        return it->first + it->second.length;
    }

    /// The first extent that ends after `offset` (it may start before it), or end().
    std::map<uint64_t, Extent>::iterator first_ending_after(uint64_t offset) {
        auto it = extents_.upper_bound(offset);
        if (it != extents_.begin() && end_of(std::prev(it)) > offset) --it;
        return it;
    }

    void check_range(uint64_t offset, uint64_t length, const char* what) const {
        uint64_t size = target_.size();
        if (offset > size || length > size - offset) {
            std::string m = what;
            m.append(" of ").append(std::to_string(length)).append(" bytes at ").append(hex(offset));
            m.append(" passes the end of the disk (").append(hex(size)).append(")");
            fail(EINVAL, m);
        }
    }

    /// Cuts `x` (at `offset`) down to its first `length` bytes.
    void shrink(Extent& x, uint64_t length) {
        if (!x.zero) {
            dirty_ -= x.length - length;
            x.data.resize(length);
            if (x.data.capacity() > 2 * x.data.size()) x.data.shrink_to_fit();
        }
        x.length = length;
    }

    /// Adds the part of `it` from `at` to its end as an extent of its own; `it` is left as is.
    void split_off_tail(std::map<uint64_t, Extent>::iterator it, uint64_t at) {
        const Extent& x = it->second;
        Extent tail{end_of(it) - at, x.zero, x.discard, {}};
        if (!x.zero) {
            auto from = x.data.begin() + static_cast<ptrdiff_t>(at - it->first);
            tail.data.assign(from, x.data.end());
            dirty_ += tail.length;
        }
        extents_.emplace_hint(std::next(it), at, std::move(tail));
    }

    /// Forgets every cached change in [begin, end); extents straddling either end are cut.
    void carve(uint64_t begin, uint64_t end) {
        if (begin >= end) return;
        auto it = extents_.lower_bound(begin);
        if (it != extents_.begin()) {
            auto before = std::prev(it);
            if (end_of(before) > begin) {
                if (end_of(before) > end) split_off_tail(before, end);
                shrink(before->second, begin - before->first);
            }
        }
        while (it != extents_.end() && it->first < end) {
            if (end_of(it) > end) split_off_tail(it, end);
            if (!it->second.zero) dirty_ -= it->second.length;
            it = extents_.erase(it);
        }
    }

    void insert_data(uint64_t offset, std::span<const std::byte> bytes) {
        uint64_t n = bytes.size();
        // A rewrite inside one data extent: in place.
        auto it = extents_.upper_bound(offset);
        if (it != extents_.begin()) {
            auto before = std::prev(it);
            if (!before->second.zero && offset + n <= end_of(before)) {
                std::memcpy(before->second.data.data() + (offset - before->first), bytes.data(), n);
                return;
            }
        }
        carve(offset, offset + n);
        // A sequential write: grow the data extent that ends here.
        auto next = extents_.lower_bound(offset);
        if (next != extents_.begin()) {
            auto before = std::prev(next);
            if (!before->second.zero && end_of(before) == offset && before->second.length + n <= kMaxWriteBytes) {
                before->second.data.insert(before->second.data.end(), bytes.begin(), bytes.end());
                before->second.length += n;
                dirty_ += n;
                return;
            }
        }
        extents_.emplace_hint(next, offset, Extent{n, false, false, {bytes.begin(), bytes.end()}});
        dirty_ += n;
    }

    void insert_zero(uint64_t offset, uint64_t length, bool discard) {
        carve(offset, offset + length);
        uint64_t begin = offset, end = offset + length;
        // Zero ranges cost no buffer: merge with equal neighbours on both sides.
        auto next = extents_.lower_bound(offset);
        if (next != extents_.end() && next->first == end && next->second.zero && next->second.discard == discard) {
            end = end_of(next);
            next = extents_.erase(next);
        }
        if (next != extents_.begin()) {
            auto before = std::prev(next);
            if (before->second.zero && before->second.discard == discard && end_of(before) == begin) {
                before->second.length = end - before->first;
                return;
            }
        }
        extents_.emplace_hint(next, begin, Extent{end - begin, true, discard, {}});
    }

    /// The next range a write-back should write, starting at or after `cursor` and ending at or
    /// before `limit`: one zero extent, or adjacent data extents up to kMaxWriteBytes.
    std::optional<std::pair<uint64_t, uint64_t>> next_run(uint64_t cursor, uint64_t limit) {
        auto it = first_ending_after(cursor);
        if (it == extents_.end()) return std::nullopt;
        uint64_t begin = std::max(it->first, cursor);
        if (begin >= limit) return std::nullopt;
        uint64_t end = end_of(it);
        if (!it->second.zero) {
            for (auto n = std::next(it); n != extents_.end() && n->first == end && !n->second.zero &&
                                         end - begin < kMaxWriteBytes;
                 ++n)
                end = end_of(n);
            end = std::min(end, begin + kMaxWriteBytes);
        }
        return std::pair{begin, std::min(end, limit)};
    }

    /// What [begin, end) holds now, as target calls in offset order: adjacent data pieces joined
    /// into one buffer, adjacent zero pieces of one kind joined.
    std::vector<Call> snapshot(uint64_t begin, uint64_t end) {
        std::vector<Call> calls;
        for (auto it = first_ending_after(begin); it != extents_.end() && it->first < end; ++it) {
            const Extent& x = it->second;
            uint64_t from = std::max(it->first, begin), to = std::min(end_of(it), end);
            bool joins = !calls.empty() && calls.back().offset + calls.back().length == from &&
                         calls.back().zero == x.zero && calls.back().discard == x.discard;
            if (!joins) calls.push_back(Call{from, 0, x.zero, x.discard, {}});
            Call& c = calls.back();
            c.length += to - from;
            if (!x.zero) {
                auto first = x.data.begin() + static_cast<ptrdiff_t>(from - it->first);
                c.data.insert(c.data.end(), first, first + static_cast<ptrdiff_t>(to - from));
            }
        }
        return calls;
    }

    /// Writes one run back: under an exclusive range lock from its snapshot until what it wrote
    /// is removed. Throws the target's error; what failed stays cached.
    Task<void> write_run(uint64_t begin, uint64_t end) {
        auto guard =
            co_await ranges(co_await asio::this_coro::executor).lock(begin, end - begin, RangeLock::Mode::exclusive);
        // Requests queued ahead of us may have changed the range while we waited: take what is
        // there now. From here on only truncate() can change it.
        std::vector<Call> calls = snapshot(begin, end);
        for (Call& c : calls) {
            if (c.zero)
                co_await target_.write_zeroes(c.offset, c.length, c.discard);
            else
                co_await target_.write(c.offset, c.data);
            carve(c.offset, c.offset + c.length);
        }
    }

    /// A large write: to the target directly, under an exclusive lock on its range, then the
    /// cached changes it overwrote are dropped. Goes out in target writes of at most
    /// kMaxWriteBytes, like a write-back. If the target fails, they stay cached (they were
    /// acknowledged; the failed write's range is undefined, as after any failed write).
    Task<void> write_through(uint64_t offset, std::span<const std::byte> data) {
        auto guard = co_await ranges(co_await asio::this_coro::executor)
                         .lock(offset, data.size(), RangeLock::Mode::exclusive);
        for (uint64_t done = 0; done < data.size(); done += kMaxWriteBytes)
            co_await target_.write(offset + done, data.subspan(done, std::min<uint64_t>(kMaxWriteBytes, data.size() - done)));
        carve(offset, offset + data.size());
    }

    /// Writes back the cached changes in [from, to), in offset order, up to kParallelRuns runs
    /// at a time (runs are disjoint, so their order does not matter; the target overlaps their
    /// I/O). With `until_half`, stops once memory() is at most half the limit. The caller holds
    /// writeback_. Throws the first target error once the runs in flight have ended; a run
    /// that failed stays cached.
    Task<void> write_range(uint64_t from, uint64_t to, bool until_half) {
        const Executor ex = co_await asio::this_coro::executor;
        uint64_t cursor = from;
        for (;;) {
            if (until_half && memory() <= limit_ / 2) co_return;
            std::vector<std::pair<uint64_t, uint64_t>> batch;
            while (batch.size() < kParallelRuns) {
                auto run = next_run(cursor, to);
                if (!run) break;
                batch.push_back(*run);
                cursor = run->second;
            }
            if (batch.empty()) co_return;
            sweep_ = cursor;
            if (batch.size() == 1) {
                co_await write_run(batch[0].first, batch[0].second);
                continue;
            }
            size_t pending = batch.size();
            std::exception_ptr error;
            auto done = std::make_shared<AsyncEvent>(ex);
            for (auto [begin, end] : batch)
                asio::co_spawn(ex, write_run(begin, end), [&pending, &error, done](std::exception_ptr e) {
                    if (e && !error) error = e;
                    if (--pending == 0) done->set();
                });
            co_await done->wait();
            if (error) std::rethrow_exception(error);
        }
    }

    /// Back-pressure: if caching `incoming` more bytes would pass the limit, writes back (this
    /// coroutine waits) until memory() is at most half the limit. The sweep resumes where the
    /// previous one stopped and wraps around, so the oldest part of a sequential stream goes
    /// first. Throws the target's error.
    Task<void> make_room(size_t incoming) {
        if (memory() + incoming <= limit_) co_return;
        auto guard = co_await writeback_.lock();
        if (memory() + incoming <= limit_) co_return;  // a write-back we waited for made room
        uint64_t start = sweep_;
        co_await write_range(start, kEnd, true);
        if (start > 0) co_await write_range(0, start, true);
    }
};

DataCache::DataCache(CacheTarget& target, size_t limit_bytes, SmallWrites small)
    : state_(std::make_unique<State>(target, limit_bytes, small)) {}

DataCache::~DataCache() = default;

Task<void> DataCache::read(uint64_t offset, std::span<std::byte> buf) {
    State& s = *state_;
    uint64_t size = s.target_.size();
    // Past the disk's end: zeros, nothing to lock or read.
    uint64_t inside = offset >= size ? 0 : std::min<uint64_t>(buf.size(), size - offset);
    std::fill(buf.begin() + static_cast<ptrdiff_t>(inside), buf.end(), std::byte{0});
    if (inside == 0) co_return;
    uint64_t end = offset + inside;

    auto guard = co_await s.ranges(co_await asio::this_coro::executor).lock(offset, inside, RangeLock::Mode::shared);

    // One target read spanning every part no extent covers (none if the range is fully cached).
    uint64_t gap_begin = end, gap_end = offset, pos = offset;
    for (auto it = s.first_ending_after(offset); it != s.extents_.end() && it->first < end; ++it) {
        if (it->first > pos) {
            gap_begin = std::min(gap_begin, pos);
            gap_end = it->first;
        }
        pos = State::end_of(it);
    }
    if (pos < end) {
        gap_begin = std::min(gap_begin, pos);
        gap_end = end;
    }
    if (gap_begin < gap_end) co_await s.target_.read(gap_begin, buf.subspan(gap_begin - offset, gap_end - gap_begin));

    // The shared lock kept writers out: the extents in range are the ones seen above.
    for (auto it = s.first_ending_after(offset); it != s.extents_.end() && it->first < end; ++it) {
        uint64_t from = std::max(it->first, offset), to = std::min(State::end_of(it), end);
        std::byte* dst = buf.data() + (from - offset);
        if (it->second.zero)
            std::memset(dst, 0, to - from);
        else
            std::memcpy(dst, it->second.data.data() + (from - it->first), to - from);
    }
}

Task<void> DataCache::write(uint64_t offset, std::span<const std::byte> data) {
    State& s = *state_;
    s.check_range(offset, data.size(), "write");
    if (data.empty()) co_return;
    if (data.size() >= kWriteThroughBytes || !s.worth_caching(offset, data.size()))
        co_return co_await s.write_through(offset, data);
    // Make room first, without holding our range: the write-back may need that range. If it
    // fails, this write is not cached and its caller gets the error.
    co_await s.make_room(data.size() + kExtentOverhead);
    auto guard =
        co_await s.ranges(co_await asio::this_coro::executor).lock(offset, data.size(), RangeLock::Mode::exclusive);
    s.insert_data(offset, data);
}

Task<void> DataCache::write_zeroes(uint64_t offset, uint64_t length, bool discard) {
    State& s = *state_;
    s.check_range(offset, length, "write_zeroes");
    if (length == 0) co_return;
    co_await s.make_room(kExtentOverhead);
    auto guard = co_await s.ranges(co_await asio::this_coro::executor).lock(offset, length, RangeLock::Mode::exclusive);
    s.insert_zero(offset, length, discard);
}

Task<void> DataCache::write_back() {
    auto guard = co_await state_->writeback_.lock();
    co_await state_->write_range(0, kEnd, false);
}

Task<void> DataCache::flush() {
    co_await write_back();
    co_await state_->target_.flush();
}

void DataCache::truncate(uint64_t size) { state_->carve(size, kEnd); }

size_t DataCache::dirty_bytes() const { return state_->dirty_; }

bool DataCache::empty() const { return state_->extents_.empty(); }

std::vector<std::pair<uint64_t, uint64_t>> DataCache::dirty_ranges(size_t max) const {
    std::vector<std::pair<uint64_t, uint64_t>> out;
    for (const auto& [offset, e] : state_->extents_) {
        if (!out.empty() && out.back().first + out.back().second == offset) {
            out.back().second += e.length;
            continue;
        }
        if (out.size() == max) break;
        out.emplace_back(offset, e.length);
    }
    return out;
}

}  // namespace qcowfs::cache
