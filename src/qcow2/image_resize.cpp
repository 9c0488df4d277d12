// Resizing the active disk: growing (and moving) the L1 table, releasing clusters past a new end.
#include <algorithm>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

Task<void> Image::grow_l1(uint64_t entries, uint64_t new_size) {
    // Rule 3 for the table itself: every L2 table the in-memory L1 points at must be on disk
    // before a new L1 copy that points at them is made current.
    co_await flush_locked();
    const uint64_t cs = geometry_.cluster_size();
    uint64_t bytes = entries * 8;
    if (bytes > format::kMaxL1Bytes) fail(EFBIG, "the L1 table would exceed " + std::to_string(format::kMaxL1Bytes) + " bytes");
    uint64_t clusters = (bytes + cs - 1) / cs;
    const HostOffset table = co_await allocate_clusters(clusters);
    file_end_ = std::max(file_end_, (table + clusters * cs).value);
    std::vector<std::byte> raw(clusters * cs);
    for (size_t i = 0; i < l1_.size(); ++i) format::store_be64(raw.data() + 8 * i, l1_[i]);
    co_await file_->write_at(table.value, raw);
    co_await refcounts_->flush();  // its refcount, then the table itself is synced below
    co_await file_->flush();
    const HostOffset old{meta_.header.l1_table_offset};
    uint64_t old_clusters = (uint64_t{meta_.header.l1_size} * 8 + cs - 1) / cs;
    meta_.header.l1_table_offset = table.value;
    meta_.header.l1_size = static_cast<uint32_t>(entries);
    l1_.resize(entries, 0);
    dirty_l1_.clear();  // all of them are in the new table
    // One header write points at the new table and sets the size it was grown for (not earlier:
    // a refcount table move above rewrites the header too, and must not show the new size
    // with the old L1 table).
    meta_.header.size = new_size;
    co_await write_header();
    refresh_metadata_map();  // the new table lies where nothing was
    // The header no longer points at the old table: nothing references it.
    if (old_clusters) co_await refcounts_->update(geometry_.host_cluster(old), old_clusters, -1);
}

Task<void> Image::release_beyond(uint64_t new_size) {
    const ClusterGeometry& g = geometry_;
    const uint32_t cb = g.cluster_bits;
    const uint64_t cs = g.cluster_size();
    const uint64_t table_clusters = g.l2_entries();
    uint64_t first = (new_size + cs - 1) / cs;  // first cluster wholly beyond the end
    uint64_t last = (size() + cs - 1) / cs;
    for (uint64_t c = first; c < last;) {
        uint64_t l1_index = c / table_clusters;
        uint64_t n = std::min(last - c, table_clusters - c % table_clusters);
        if (l1_index >= l1_.size()) break;
        const HostOffset l2{l1_[l1_index] & format::kL1OffsetMask};
        if (!l2) {
            c += n;
            continue;
        }
        if (c % table_clusters == 0) {
            // The whole table is beyond the end: drop it with everything it maps.
            format::L1Entry e = format::decode_l1(l1_[l1_index], cb);
            if (e.copied) {
                for (uint64_t i = 0; i < table_clusters; ++i) {
                    auto [raw, bitmap] = co_await load_l2_entry(l2, i);
                    format::L2Entry le = co_await decode_l2_checked(raw, bitmap, (l1_index * table_clusters + i) << cb);
                    if (data_file_) continue;
                    if (has_host(le)) free_later(g.host_cluster(le.host()), 1);
                    else if (le.compressed) {
                        auto [cf, cn] = compressed_clusters(le);
                        free_later(cf, cn);
                    }
                }
            }
            // A table shared with a snapshot is impossible here (shrinking needs no snapshots),
            // but if only its refcount says so, releasing the table alone is still right.
            free_later(g.host_cluster(l2), 1);
            metadata_map_.remove_l2(g.host_cluster(l2).value);
            l1_[l1_index] = 0;
            dirty_l1_.insert(l1_index);
            c += n;
            continue;
        }
        // Past the new end nothing shows through: the clusters become unallocated (v2 too, which
        // has no zero flag), so that a later grow finds nothing stale there.
        co_await zero_in_table(c, n, true, true);
        c += n;
    }
}

Task<void> Image::resize(uint64_t new_size) {
    check_writable();
    const uint64_t old_size = size();
    if (new_size == old_size) co_return;
    if (new_size < old_size && !snapshots_.empty())
        fail(ENOTSUP, "cannot shrink an image that has internal snapshots");
    const uint64_t cs = geometry_.cluster_size();
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
        // Every consistent bitmap follows the new size, disabled ones too: in use until close.
        if (bitmaps_) co_await bitmaps_->mark_in_use(*file_, true);
    }
    uint64_t lo = std::min(old_size, new_size) / cs * cs;
    auto guard = co_await range_lock_->lock(lo, UINT64_MAX - lo, cache::RangeLock::Mode::exclusive);
    if (new_size < old_size) {
        auto flush_guard = co_await flush_mutex_.lock();
        auto meta = co_await meta_mutex_.lock();
        co_await release_beyond(new_size);
        co_await flush_locked();
        meta_.header.size = new_size;
        co_await write_header();
        if (bitmaps_) bitmaps_->resize(new_size);  // bits past the end go, as QEMU truncates them
        co_return;
    }
    {
        auto flush_guard = co_await flush_mutex_.lock();
        auto meta = co_await meta_mutex_.lock();
        uint64_t entries = geometry_.l1_entries_for(new_size);
        if (entries > l1_.size()) {
            co_await grow_l1(std::max<uint64_t>(entries, l1_.size() + l1_.size() / 4), new_size);
        } else {
            meta_.header.size = new_size;
            co_await write_header();
        }
        // The bitmaps grow with clear bits: a grow alone changes no data (QEMU marks nothing).
        if (bitmaps_) bitmaps_->resize(new_size);
    }
    // The new part must read as zeros: the rest of the old last cluster may hold bytes from
    // before an earlier shrink, and a longer backing file would show through. Whole clusters, so
    // that no stale byte stays behind in the last one.
    uint64_t shown = std::max((old_size + cs - 1) / cs * cs, backing_ ? backing_->size() : 0);
    uint64_t zero_to = std::min(new_size, (shown + cs - 1) / cs * cs);
    if (zero_to > old_size) co_await zero_locked(old_size, zero_to - old_size, false);
    // Beyond that, unallocated reads as zeros: L2 tables still mapped there (left by another
    // writer's shrink) lose their entries.
    co_await unmap_from(zero_to);
}

Task<void> Image::unmap_from(uint64_t from) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint64_t table_clusters = g.l2_entries();
    const uint64_t last = (size() + cs - 1) / cs;
    for (uint64_t c = (from + cs - 1) / cs; c < last;) {
        uint64_t l1_index = c / table_clusters;
        uint64_t n = std::min(last - c, table_clusters - c % table_clusters);
        if (l1_index >= l1_.size()) break;
        if (l1_[l1_index] & format::kL1OffsetMask) {
            auto meta = co_await meta_mutex_.lock();
            check_writable();
            co_await zero_in_table(c, n, true, true);
        }
        c += n;
    }
}

}  // namespace qcowfs::qcow2
