// Zeroing guest ranges: zero flags and unallocated entries for whole clusters, zeros as data for the rest.
#include <algorithm>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

Task<std::vector<uint64_t>> Image::zero_in_table(uint64_t first, uint64_t count, bool discard, bool unmap) {
    const ClusterGeometry& g = geometry_;
    const uint32_t cb = g.cluster_bits;
    const bool v3 = meta_.header.version >= 3;
    // unmap: the clusters lie past the end of the disk or of the backing file, so unallocated
    // reads as zeros there (or is never read) whatever the version.
    const bool shows_through = backing_ != nullptr && !unmap;
    std::vector<uint64_t> need_data;
    const uint64_t l1_index = first / g.l2_entries();
    if (l1_index >= l1_.size()) co_return need_data;
    const bool mapped = format::decode_l1(l1_[l1_index], cb).l2_offset != 0;
    if (!mapped && !shows_through) co_return need_data;  // reads zeros already
    // v2 has no zero flag: only data can hide the backing file where it reaches; past its end an
    // unallocated cluster reads as zeros.
    auto backing_reaches = [&](uint64_t c) { return !v3 && shows_through && (c << cb) < backing_->size(); };
    if (!v3) {
        for (uint64_t c = first; c < first + count; ++c)
            if (backing_reaches(c)) need_data.push_back(c);
        if (!mapped) co_return need_data;  // the rest reads zeros already
    }
    const HostOffset l2_table = co_await l2_for_write(l1_index);
    for (uint64_t c = first; c < first + count; ++c) {
        if (backing_reaches(c)) continue;  // gets zeros written as data by the caller
        uint64_t index = c % g.l2_entries();
        auto [raw, bitmap] = co_await load_l2_entry(l2_table, index);
        format::L2Entry e = co_await decode_l2_checked(raw, bitmap, c << cb);
        bool keep = false;  // keep the host cluster as a preallocated zero cluster
        if (data_file_) {
            // Data clusters sit at their guest offset; a raw data file must read as the disk does.
            keep = has_host(e) && !unmap;
            co_await data_file_->discard(c << cb, g.cluster_size());
        } else if (has_host(e)) {
            const bool ours = co_await check_host_cluster(e.host(), {"data cluster of guest offset ", c << cb, true}, e.copied);
            keep = ours && !discard && v3 && !unmap;
            if (!keep) {
                free_later(g.host_cluster(e.host()), 1);
                // Give the space back now: only this entry uses it, and a crash before the new
                // entry is on disk leaves it pointing at zeros, which is what was asked for.
                if (ours) co_await file_->discard(e.host_offset, g.cluster_size());
            }
        } else if (e.compressed) {
            auto [cf, cn] = compressed_clusters(e);
            free_later(cf, cn);
        }
        bool zero = keep || shows_through || (!discard && !unmap);  // else unallocated reads as zeros too
        if (!v3) zero = false;
        auto [new_raw, new_bitmap] = zeroed_l2_entry(e.host(), keep, zero);
        co_await store_l2_entry(l2_table, index, new_raw, new_bitmap);
    }
    co_return need_data;
}

Task<void> Image::write_zeroes(uint64_t offset, uint64_t length, bool discard) {
    check_writable();
    if (offset > size() || length > size() - offset)
        fail(EINVAL, "zeroing " + std::to_string(length) + " bytes at " + std::to_string(offset) +
                         " passes the end of the disk (" + std::to_string(size()) + " bytes)");
    if (length == 0) co_return;
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
    }
    if (bitmaps_) bitmaps_->mark(offset, length);  // zeroing and discarding change the data too
    const uint64_t cs = geometry_.cluster_size();
    uint64_t first = offset / cs * cs;
    uint64_t last = (offset + length + cs - 1) / cs * cs;
    auto guard = co_await range_lock_->lock(first, last - first, cache::RangeLock::Mode::exclusive);
    co_await zero_locked(offset, length, discard);
}

Task<void> Image::zero_locked(uint64_t offset, uint64_t length, bool discard) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint64_t end = offset + length;
    const uint64_t last = (end + cs - 1) / cs * cs;

    // Whole clusters get metadata; a partial head and tail (and a last cluster cut by the end
    // of the disk) get zeros written as data.
    uint64_t whole_from = (offset + cs - 1) / cs * cs;
    uint64_t whole_to = end == size() ? last : end / cs * cs;
    if (whole_from >= whole_to) whole_from = whole_to = offset;
    std::vector<std::byte> zeros;
    auto write_zero_data = [&](uint64_t at, uint64_t n) -> Task<void> {
        while (n) {
            uint64_t k = std::min<uint64_t>(n, 1 << 20);
            zeros.resize(std::max<size_t>(zeros.size(), k));
            co_await write_locked(at, std::span<const std::byte>(zeros).first(k));
            at += k;
            n -= k;
        }
    };
    if (offset < whole_from) co_await write_zero_data(offset, std::min(whole_from, end) - offset);
    const uint64_t table_clusters = g.l2_entries();
    for (uint64_t c = whole_from / cs; c < whole_to / cs;) {
        uint64_t n = std::min(whole_to / cs - c, table_clusters - c % table_clusters);
        std::vector<uint64_t> need_data;
        {
            auto meta = co_await meta_mutex_.lock();
            check_writable();
            need_data = co_await zero_in_table(c, n, discard);
        }
        for (uint64_t d : need_data) co_await write_zero_data(d * cs, std::min(cs, size() - d * cs));
        c += n;
    }
    if (whole_to < end && whole_to >= whole_from && end > std::max(offset, whole_to))
        co_await write_zero_data(std::max(offset, whole_to), end - std::max(offset, whole_to));
}

}  // namespace qcowfs::qcow2
