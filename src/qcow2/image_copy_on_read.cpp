// Copy-on-read: data a read finds in the backing chain is written into the image behind the read.
//
// A read of the active disk records the ranges it took from the backing file (read_mapped's
// `from_backing`); view_read hands them to start_copy once the read has its data, and the read
// returns at once. start_copy claims the guest subclusters (in-flight set `copying_`: a range two
// reads race on is copied once), copies the bytes and starts copy_runs on the image's lock.
// Each run then takes the guest range exclusively, whole clusters, like a write, looks again at
// what this image maps there, and writes only into subclusters still unallocated — still reading
// the backing chain's bytes, the ones it holds — through write_locked: the write path's planning,
// copy-on-write around partial clusters, allocation, ordering and linking. A racing write, zeroing
// or discard got the range first or comes after; either way its data stays. Copies change no byte
// a read returns, so nothing else (the data cache above, bitmaps) needs to know about them.
#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/log.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

/// A range one copy writes: guest bytes [offset, offset + length), data at `at` in its buffer.
struct Image::CopyRun {
    uint64_t offset = 0;
    uint64_t length = 0;
    size_t at = 0;
};

void Image::set_copy_on_read(bool on) {
    copy_on_read_ = on;
    if (on) copy_stopped_.clear();  // turned on again: a failure before is tried again
}

bool Image::copies_wanted() const { return copy_on_read_ && copies_can_run(); }

bool Image::copies_can_run() const {
    return copy_stopped_.empty() && backing_ && range_lock_ && read_only_reason_.empty();
}

Task<void> Image::copies_done() {
    while (copies_running_ > 0) {
        if (!copies_idle_) copies_idle_ = std::make_shared<AsyncEvent>(co_await asio::this_coro::executor);
        auto idle = copies_idle_;
        co_await idle->wait();
    }
}

void Image::start_copy(const Executor& executor, uint64_t offset, std::span<const std::byte> buf,
                       const std::vector<BackingRead>& from_backing) {
    const uint32_t sb = geometry_.subcluster_bits();
    std::vector<CopyRun> runs;
    uint64_t bytes = 0;
    // Runs of subclusters no other copy has claimed (a subcluster cut by the read's edge counts:
    // the write path fills the rest of it from the backing file).
    for (const BackingRead& r : from_backing) {
        const uint64_t end = r.offset + r.length;
        for (uint64_t pos = r.offset; pos < end;) {
            const uint64_t sc = pos >> sb;
            const uint64_t sc_end = std::min(end, (sc + 1) << sb);
            if (!copying_.contains(sc)) {
                if (!runs.empty() && runs.back().offset + runs.back().length == pos)
                    runs.back().length += sc_end - pos;
                else
                    runs.push_back({pos, sc_end - pos, 0});
                bytes += sc_end - pos;
            }
            pos = sc_end;
        }
    }
    if (runs.empty()) return;
    if (copy_pending_bytes_ + bytes > options_.copy_on_read_pending_bytes) {
        // Copies are not keeping up (a slow image file, or many readers): this read is not
        // copied rather than held in memory; a later read of the range copies it.
        copy_stats_.skipped_bytes += bytes;
        return;
    }
    std::vector<std::byte> data(bytes);
    size_t at = 0;
    for (CopyRun& run : runs) {
        run.at = at;
        std::memcpy(data.data() + at, buf.data() + (run.offset - offset), run.length);
        at += run.length;
        for (uint64_t sc = run.offset >> sb; sc <= (run.offset + run.length - 1) >> sb; ++sc) copying_.insert(sc);
    }
    copy_pending_bytes_ += bytes;
    ++copies_running_;
    asio::co_spawn(executor, copy_runs(std::move(runs), std::move(data)),
                   [self = shared_from_this()](std::exception_ptr error) {
                       // copy_runs handles its own failures; anything else is a bug worth a line.
                       if (!error) return;
                       try {
                           std::rethrow_exception(error);
                       } catch (const std::exception& e) {
                           log::error(self->path() + ": copy-on-read: " + e.what());
                       }
                   });
}

Task<void> Image::copy_runs(std::vector<CopyRun> runs, std::vector<std::byte> data) {
    const uint32_t sb = geometry_.subcluster_bits();
    for (const CopyRun& run : runs) {
        std::string failure;
        int code = 0;
        // A copy once started runs to its end even if copy-on-read was turned off meanwhile, or
        // the image is closing (close turns it off, then waits for the copies): the read that
        // started it may have been the reader's last before it closed the file.
        if (copies_can_run()) {
            try {
                co_await copy_range(run.offset, std::span<const std::byte>(data).subspan(run.at, run.length));
            } catch (const std::system_error& e) {
                code = errno_of(e);
                failure = describe(e);
            }
        }
        for (uint64_t sc = run.offset >> sb; sc <= (run.offset + run.length - 1) >> sb; ++sc) copying_.erase(sc);
        // EROFS: the image stopped taking writes (closed, marked corrupt): nothing to report here.
        if (code && code != EROFS && copy_stopped_.empty()) {
            copy_stopped_ = failure;
            log::error(path_ + ": copy-on-read stopped: " + failure);
        }
    }
    copy_pending_bytes_ -= data.size();
    if (--copies_running_ == 0 && copies_idle_) {
        copies_idle_->set();
        copies_idle_.reset();
    }
}

Task<void> Image::copy_range(uint64_t offset, std::span<const std::byte> data) {
    const uint64_t ss = geometry_.subcluster_size();
    const uint64_t end = offset + data.size();
    const uint64_t limit = std::min(div_ceil(end, ss) * ss, std::max(size(), end));
    // A subcluster is copied when the backing chain has data anywhere in it, not only in the
    // part this read saw: a read racing on its other part found it claimed by this copy, and the
    // write path fills the rest of it from the backing file. Backing images are never written,
    // so what they map is the same now as at the read.
    MapRun known{false, 0};
    uint64_t known_from = 0;
    uint64_t run_from = offset, run_to = offset;  // the subclusters to fill, not yet filled
    for (uint64_t pos = offset; pos < end;) {
        const uint64_t sc_from = pos / ss * ss, sc_to = std::min(sc_from + ss, limit);
        bool has_data = false;
        for (uint64_t p = sc_from; p < sc_to && !has_data;) {
            if (p < known_from || p >= known.end) {
                known = co_await map_below(p, limit);
                known_from = p;
            }
            has_data = known.data;
            p = known.end;
        }
        const uint64_t piece_to = std::min(end, sc_from + ss);
        if (has_data && run_to == pos) {
            run_to = piece_to;
        } else if (has_data) {
            if (run_from < run_to) co_await fill_unallocated(run_from, data.subspan(run_from - offset, run_to - run_from));
            run_from = pos, run_to = piece_to;
        }
        pos = piece_to;
    }
    if (run_from < run_to) co_await fill_unallocated(run_from, data.subspan(run_from - offset, run_to - run_from));
}

Task<void> Image::fill_unallocated(uint64_t offset, std::span<const std::byte> data) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    check_writable();
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
    }
    const uint64_t first = offset / cs * cs;
    const uint64_t last = div_ceil(offset + data.size(), cs) * cs;
    auto guard = co_await range_lock_->lock(first, last - first, cache::RangeLock::Mode::exclusive);
    check_writable();
    const uint64_t end = std::min(offset + data.size(), size());  // a shrink may have come in between
    // Under the range lock no entry of these clusters changes until the writes below are linked.
    std::vector<std::pair<uint64_t, uint64_t>> runs;  // (offset, end) still unallocated here
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        for (uint64_t pos = offset; pos < end;) {
            const uint64_t cluster_end = std::min(end, (pos | g.cluster_mask()) + 1);
            const std::optional<format::L2Entry> e = co_await active_entry(GuestOffset{pos});
            while (pos < cluster_end) {
                const uint32_t sc = g.subcluster_index(GuestOffset{pos});
                const uint64_t sc_end = std::min(cluster_end, pos - g.offset_in_cluster(pos) + (uint64_t{sc + 1} << g.subcluster_bits()));
                const format::SubclusterType type =
                    e ? format::subcluster_type(*e, sc, g) : format::SubclusterType::unallocated_plain;
                if (type == format::SubclusterType::unallocated_plain || type == format::SubclusterType::unallocated_alloc) {
                    if (!runs.empty() && runs.back().second == pos)
                        runs.back().second = sc_end;
                    else
                        runs.emplace_back(pos, sc_end);
                }
                pos = sc_end;
            }
        }
    }
    for (auto [from, to] : runs) {
        co_await write_locked(from, data.subspan(from - offset, to - from));
        copy_stats_.copied_bytes += to - from;
    }
}

}  // namespace qcowfs::qcow2
