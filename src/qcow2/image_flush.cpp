// Flushing an image: every metadata change reaches the disk in dependency order (rules 1-4), then close.
#include <algorithm>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

Task<void> Image::flush_locked() {
    // Rule 1: data before the L2 entries pointing at it. Data in the image file is synced by the
    // refcount flush below (it always syncs); an external data file is synced here.
    if (data_file_) co_await data_file_->flush();
    // Rule 2: refcount increases (new clusters) on disk before any table that uses them. With
    // no metadata change at all (overwrites in place) one sync of the data is the whole flush.
    if (refcounts_->dirty())
        co_await refcounts_->flush();
    else
        co_await file_->flush();
    // Rule 3: L2 tables (new ones, and changed entries) on disk before L1 entries point at them.
    auto frees = std::move(pending_free_);
    pending_free_.clear();
    try {
        if (l2_cache_->dirty_slices()) {
            co_await l2_cache_->flush();
            co_await file_->flush();
        }
        if (!dirty_l1_.empty()) {
            // Changed L1 entries, a run of adjacent ones per write.
            std::vector<uint64_t> dirty(dirty_l1_.begin(), dirty_l1_.end());
            for (size_t i = 0; i < dirty.size();) {
                size_t j = i + 1;
                while (j < dirty.size() && dirty[j] == dirty[j - 1] + 1) ++j;
                std::vector<std::byte> raw(8 * (j - i));
                for (size_t k = i; k < j; ++k) format::store_be64(raw.data() + 8 * (k - i), l1_[dirty[k]]);
                co_await file_->write_at(meta_.header.l1_table_offset + 8 * dirty[i], raw);
                i = j;
            }
            co_await file_->flush();
            dirty_l1_.clear();
        }
    } catch (...) {
        pending_free_.insert(pending_free_.begin(), frees.begin(), frees.end());
        throw;
    }
    // Rule 4: nothing on disk points at these clusters any more; their refcounts may drop (and
    // reach the disk with the next flush).
    for (auto [first, count] : frees) co_await refcounts_->update(first, count, -1);
}

Task<void> Image::flush() {
    if (!prepared_ || !refcounts_) co_return;  // nothing was ever written
    auto flush_guard = co_await flush_mutex_.lock();
    auto meta = co_await meta_mutex_.lock();
    co_await flush_locked();
}

Task<void> Image::close() {
    // Copies started by reads finish first (they may be the only writes this image gets).
    copy_on_read_ = false;
    co_await copies_done();
    if (!prepared_ || !refcounts_) co_return;
    {
        auto flush_guard = co_await flush_mutex_.lock();
        auto meta = co_await meta_mutex_.lock();
        co_await flush_locked();
        co_await refcounts_->flush();  // the refcount decreases of the flush above
        // The bitmaps last: consistent again only once all the data they describe is durable.
        if (read_only_reason_.empty()) co_await store_bitmaps();
        if (clear_dirty_bit_ && read_only_reason_.empty()) {
            meta_.header.incompatible_features &= ~format::kIncompatDirty;
            co_await write_header();
            clear_dirty_bit_ = false;
        }
        if (read_only_reason_.empty()) read_only_reason_ = "the image is closed";
    }
}

}  // namespace qcowfs::qcow2
