// Refcount table and blocks of one image file, and the cluster allocator that uses them.
#include "qcowfs/qcow2/refcount.hpp"

#include <algorithm>
#include <boost/asio/this_coro.hpp>
#include <cstdio>
#include <string>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/refcount_layout.hpp"
#include "qcowfs/io/file.hpp"

namespace qcowfs::qcow2 {

Refcounts::Refcounts(io::File& file, const format::Header& header, size_t cache_bytes)
    : file_(file),
      cluster_bits_(header.cluster_bits),
      refcount_order_(header.refcount_order),
      block_entries_(format::refcount_block_entries(header.cluster_bits, header.refcount_order)),
      table_offset_(header.refcount_table_offset),
      table_clusters_(header.refcount_table_clusters) {
    size_t slice = std::min<uint64_t>(cluster_size(), 4096);
    slice_entries_ = (uint64_t{slice} * 8) >> refcount_order_;
    blocks_ = std::make_unique<cache::SliceCache>(file, slice, cache_bytes);
    table_cache_ = std::make_unique<cache::SliceCache>(file, slice, 16 * slice);
    // Ordering rule: a table entry reaches the disk only after the block it points at.
    table_cache_->depends_on(*blocks_);
}

Task<void> Refcounts::load() {
    const uint64_t cs = cluster_size();
    const uint64_t file_size = file_.size();
    format::check_refcount_table(table_offset_, table_clusters_, cluster_bits_, file_size);
    const uint64_t bytes = uint64_t{table_clusters_} << cluster_bits_;

    std::vector<std::byte> raw(bytes);
    if (co_await file_.read_at(table_offset_, raw) != bytes)
        corrupt("refcount table at " + hex(table_offset_) + " lies beyond the end of " + file_.name());
    std::vector<uint64_t> table(bytes / 8);
    for (size_t i = 0; i < table.size(); ++i) {
        uint64_t entry = format::load_be64(raw.data() + 8 * i);
        uint64_t offset = entry & format::kRefcountTableOffsetMask;
        if (entry != offset)
            corrupt("refcount table entry " + std::to_string(i) + " has reserved bits set (" + hex(entry) + ")");
        if (offset % cs != 0)
            corrupt("refcount table entry " + std::to_string(i) + ": refcount block offset " + hex(offset) +
                    " is not cluster aligned");
        if (offset != 0 && (offset > file_size || cs > file_size - offset))
            corrupt("refcount table entry " + std::to_string(i) + ": refcount block at " + hex(offset) +
                    " lies beyond the end of " + file_.name() + " (" + std::to_string(file_size) + " bytes)");
        table[i] = offset;
    }
    table_ = std::move(table);
    block_index_.clear();
    hint_ = 1;
}

Task<uint64_t> Refcounts::refcount_of(uint64_t cluster_index) {
    uint64_t block = block_offset(cluster_index / block_entries_);
    if (block == 0) co_return 0;
    uint64_t i = cluster_index % block_entries_;
    auto slice = co_await blocks_->get(block + i / slice_entries_ * blocks_->slice_bytes());
    co_return format::get_refcount(slice->bytes, refcount_order_, i % slice_entries_);
}

Task<void> Refcounts::set_refcount(uint64_t cluster_index, uint64_t value) {
    uint64_t block = block_offset(cluster_index / block_entries_);
    uint64_t i = cluster_index % block_entries_;
    auto slice = co_await blocks_->get_for_write(block + i / slice_entries_ * blocks_->slice_bytes());
    format::set_refcount(slice->bytes, refcount_order_, i % slice_entries_, value);
}

Task<uint64_t> Refcounts::get(HostCluster cluster) { co_return co_await refcount_of(cluster.value); }

Task<void> Refcounts::update(HostCluster first_cluster, uint64_t count, int64_t delta) {
    auto guard = co_await mutex_.lock();
    co_await update_locked(first_cluster.value, count, delta);
}

Task<void> Refcounts::update_locked(uint64_t first, uint64_t count, int64_t delta) {
    if (count == 0 || delta == 0) co_return;
    if (first + count < first) fail(EINVAL, "cluster range overflows");
    const uint64_t end = first + count;
    const uint64_t max = format::max_refcount(refcount_order_);
    const uint64_t magnitude = delta < 0 ? uint64_t(-(delta + 1)) + 1 : uint64_t(delta);
    const size_t slice_bytes = blocks_->slice_bytes();
    auto bad = [&](uint64_t cluster, uint64_t value) {
        corrupt("refcount of cluster " + std::to_string(cluster) + " (host offset " + hex(cluster << cluster_bits_) +
                ") is " + std::to_string(value) + ": adding " + std::to_string(delta) +
                (delta < 0 ? " would drop it below 0" : " would exceed the maximum of " + std::to_string(max)));
    };

    // 1. Check every cluster before changing any.
    for (uint64_t c = first; c < end;) {
        uint64_t ti = c / block_entries_, i = c % block_entries_;
        uint64_t block = block_offset(ti);
        if (block == 0) {
            if (delta < 0 || magnitude > max) bad(c, 0);
            c += std::min(end - c, block_entries_ - i);
            continue;
        }
        auto slice = co_await blocks_->get(block + i / slice_entries_ * slice_bytes);
        uint64_t idx = i % slice_entries_, n = std::min(end - c, slice_entries_ - idx);
        for (uint64_t k = 0; k < n; ++k) {
            uint64_t v = format::get_refcount(slice->bytes, refcount_order_, idx + k);
            if (delta < 0 ? v < magnitude : magnitude > max || v > max - magnitude) bad(c + k, v);
        }
        c += n;
    }

    // 2. Increases need a block for every part of the range; blocks never go inside the range.
    if (delta > 0)
        for (uint64_t ti = first / block_entries_; ti <= (end - 1) / block_entries_; ++ti)
            if (block_offset(ti) == 0) co_await allocate_block(ti, Range{first, end});

    // 3. Apply, one slice at a time (get_for_write and the changes with no co_await between).
    for (uint64_t c = first; c < end;) {
        uint64_t ti = c / block_entries_, i = c % block_entries_;
        auto slice = co_await blocks_->get_for_write(block_offset(ti) + i / slice_entries_ * slice_bytes);
        uint64_t idx = i % slice_entries_, n = std::min(end - c, slice_entries_ - idx);
        for (uint64_t k = 0; k < n; ++k) {
            uint64_t v = format::get_refcount(slice->bytes, refcount_order_, idx + k);
            v = delta < 0 ? v - magnitude : v + magnitude;
            format::set_refcount(slice->bytes, refcount_order_, idx + k, v);
            if (v == 0) hint_ = std::min(hint_, std::max<uint64_t>(c + k, 1));
        }
        c += n;
    }
}

Task<HostCluster> Refcounts::allocate(uint64_t count) {
    if (count == 0) fail(EINVAL, "cannot allocate 0 clusters");
    auto guard = co_await mutex_.lock();
    uint64_t first_free = 0;
    uint64_t first = co_await find_free(count, Range{}, &first_free);
    check_placement(first, count, "new clusters");
    // Nothing below first_free is free; if the run starts there, nothing below its end is either.
    uint64_t old_hint = hint_;
    hint_ = first_free == first ? first + count : first_free;
    try {
        co_await update_locked(first, count, 1);
    } catch (...) {
        hint_ = std::min(hint_, old_hint);
        throw;
    }
    co_return HostCluster{first};
}

Task<uint64_t> Refcounts::find_free(uint64_t count, Range exclude, uint64_t* first_free_seen) {
    const size_t slice_bytes = blocks_->slice_bytes();
    uint64_t c = std::max<uint64_t>(hint_, 1);
    uint64_t run_start = c, run = 0;
    bool seen = false;
    auto saw_free = [&](uint64_t cluster) {
        if (!seen && first_free_seen) *first_free_seen = cluster;
        seen = true;
    };
    while (run < count) {
        if (exclude.contains(c)) {
            c = run_start = exclude.end;
            run = 0;
            continue;
        }
        uint64_t stop = exclude.first > c ? exclude.first : UINT64_MAX;  // next excluded cluster
        uint64_t ti = c / block_entries_, i = c % block_entries_;
        uint64_t block = block_offset(ti);
        if (block == 0) {  // no block: every cluster it would describe is free
            uint64_t n = std::min(block_entries_ - i, stop - c);
            saw_free(c);
            run += n;
            c += n;
            continue;
        }
        auto slice = co_await blocks_->get(block + i / slice_entries_ * slice_bytes);
        uint64_t idx = i % slice_entries_, n = std::min(slice_entries_ - idx, stop - c);
        for (uint64_t k = 0; k < n && run < count; ++k, ++c) {
            if (format::get_refcount(slice->bytes, refcount_order_, idx + k) == 0) {
                saw_free(c);
                ++run;
            } else {
                run = 0;
                run_start = c + 1;
            }
        }
    }
    co_return run_start;
}

Task<void> Refcounts::allocate_block(uint64_t table_index, Range exclude) {
    for (;;) {
        if (table_index >= table_.size()) co_await grow_table(table_index + 1, exclude);
        if (table_[table_index] != 0) co_return;  // the growth made it
        // Every cluster this block would describe is free: put it in the first one allowed, so it
        // describes itself.
        uint64_t first = table_index * block_entries_;
        uint64_t b = std::max<uint64_t>(first, 1);
        if (exclude.contains(b)) b = exclude.end;
        if (b < first + block_entries_) {
            co_await create_block(table_index, b);
            co_return;
        }
        // The whole range is excluded: use a free cluster whose refcount an existing block holds.
        uint64_t x = co_await find_free(1, exclude, nullptr);
        if (block_offset(x / block_entries_) != 0) {
            co_await create_block(table_index, x);
            co_return;
        }
        co_await allocate_block(x / block_entries_, exclude);  // describes itself, then retry
    }
}

Task<void> Refcounts::create_block(uint64_t table_index, uint64_t cluster_index) {
    const bool self = cluster_index / block_entries_ == table_index;
    check_placement(cluster_index, 1, "a new refcount block");
    // Its space first (the block is written at the next flush): a full host file system fails
    // this allocation, before anything changed.
    co_await file_.reserve(cluster_index << cluster_bits_, cluster_size());
    // An existing block's entry first: the only step that can fail (reading it).
    if (!self) co_await set_refcount(cluster_index, 1);
    uint64_t offset = cluster_index << cluster_bits_;
    for (uint64_t s = 0; s < cluster_size(); s += blocks_->slice_bytes()) co_await blocks_->create(offset + s);
    table_[table_index] = offset;
    block_index_.clear();
    if (self) co_await set_refcount(cluster_index, 1);  // a dirty slice just created: no I/O
    co_await store_table_entry(table_index);
}

Task<void> Refcounts::store_table_entry(uint64_t table_index) {
    // The slice is rebuilt from table_ (the truth), so it never needs reading.
    const size_t slice_bytes = table_cache_->slice_bytes();
    uint64_t start = table_index * 8 / slice_bytes * slice_bytes;
    auto slice = co_await table_cache_->create(table_offset_ + start);
    for (size_t k = 0; k < slice_bytes / 8; ++k) format::store_be64(slice->bytes.data() + 8 * k, table_[start / 8 + k]);
}

format::RefcountLayout Refcounts::grown_table_layout(uint64_t min_entries, Range exclude) const {
    const uint64_t old_entries = table_.size();
    // As QEMU does it: at the first region the old table cannot describe (nothing there is in
    // use), the new blocks followed by the new table; the blocks describe themselves and the
    // table. A region that meets `exclude` is skipped.
    uint64_t r0 = old_entries;
    for (;;) {
        format::RefcountLayout l = format::refcount_layout(r0 * block_entries_, 0, std::max(min_entries, old_entries + old_entries / 2),
                                                           cluster_bits_, block_entries_);
        if (l.table_clusters * cluster_size() > format::kMaxRefcountTableBytes)
            fail(ENOSPC, "the refcount table would exceed the 8 MiB limit");
        Range area{r0 * block_entries_, r0 * block_entries_ + l.blocks + l.table_clusters};
        if (area.first < exclude.end && exclude.first < area.end) {
            r0 = div_ceil(exclude.end, block_entries_);
            continue;
        }
        return l;
    }
}

Task<std::vector<uint64_t>> Refcounts::create_grown_table(const format::RefcountLayout& l) {
    const uint64_t cs = cluster_size();
    const uint64_t area = l.first_range * block_entries_;
    const uint64_t new_offset = (area + l.blocks) << cluster_bits_;
    const size_t slice_bytes = blocks_->slice_bytes();
    std::vector<uint64_t> table(l.table_clusters * cs / 8, 0);
    std::copy(table_.begin(), table_.end(), table.begin());
    for (uint64_t k = 0; k < l.blocks; ++k) {
        table[l.first_range + k] = (area + k) << cluster_bits_;
        for (uint64_t s = 0; s < cs; s += slice_bytes) co_await blocks_->create(table[l.first_range + k] + s);
    }
    for (uint64_t x = area; x < area + l.blocks + l.table_clusters; ++x) {
        uint64_t i = x % block_entries_;
        auto slice = co_await blocks_->get_for_write(table[x / block_entries_] + i / slice_entries_ * slice_bytes);
        format::set_refcount(slice->bytes, refcount_order_, i % slice_entries_, 1);
    }
    for (uint64_t s = 0; s < l.table_clusters * cs; s += slice_bytes) {
        auto slice = co_await table_cache_->create(new_offset + s);
        for (size_t k = 0; k < slice_bytes / 8; ++k) format::store_be64(slice->bytes.data() + 8 * k, table[s / 8 + k]);
    }
    co_return table;
}

Task<void> Refcounts::grow_table(uint64_t min_entries, Range exclude) {
    if (!on_table_moved) corrupt("the refcount table is full and cannot move (no header updater)");
    const format::RefcountLayout l = grown_table_layout(min_entries, exclude);
    const uint64_t area = l.first_range * block_entries_;
    check_placement(area, l.blocks + l.table_clusters, "a new refcount table");
    std::vector<uint64_t> table = co_await create_grown_table(l);

    // Ordering: new blocks (and every pending change) written, synced; then the new table written,
    // synced; then the header points at it; only then is the old table freed.
    const uint64_t new_offset = (area + l.blocks) << cluster_bits_;
    co_await table_cache_->sync();
    co_await on_table_moved(new_offset, static_cast<uint32_t>(l.table_clusters));
    uint64_t old_first = table_offset_ >> cluster_bits_;
    uint64_t old_clusters = table_clusters_;
    table_ = std::move(table);
    block_index_.clear();
    table_offset_ = new_offset;
    table_clusters_ = static_cast<uint32_t>(l.table_clusters);
    co_await update_locked(old_first, old_clusters, -1);
}

Task<std::optional<std::pair<uint64_t, uint64_t>>> Refcounts::find_undercounted(uint64_t first,
                                                                                 std::vector<uint64_t>& references,
                                                                                 bool last) {
    const uint64_t end = first + references.size();
    auto add = [&](uint64_t cluster) {
        if (cluster >= first && cluster < end) ++references[cluster - first];
    };
    for (uint64_t c = 0; c < table_clusters_; ++c) add((table_offset_ >> cluster_bits_) + c);
    for (uint64_t block : table_)
        if (block) add(block >> cluster_bits_);
    const size_t slice_bytes = blocks_->slice_bytes();
    for (uint64_t c = first; c < end;) {
        uint64_t i = c % slice_entries_;
        uint64_t n = std::min<uint64_t>(slice_entries_ - i, end - c);
        auto from = references.begin() + static_cast<ptrdiff_t>(c - first);
        if (std::all_of(from, from + static_cast<ptrdiff_t>(n), [](uint64_t r) { return r == 0; })) {
            c += n;
            continue;
        }
        uint64_t block = block_offset(c / block_entries_);
        std::shared_ptr<const cache::Slice> slice;
        if (block) slice = co_await blocks_->get(block + (c % block_entries_) / slice_entries_ * slice_bytes);
        for (uint64_t k = 0; k < n; ++k) {
            uint64_t have = slice ? format::get_refcount(slice->bytes, refcount_order_, i + k) : 0;
            if (have < references[c - first + k]) co_return std::make_pair(c + k, have);
        }
        c += n;
    }
    if (!last) co_return std::nullopt;
    // Refcount metadata past the last window: its own entries must count it too, or the
    // allocator would see those clusters as free.
    std::vector<uint64_t> beyond;
    for (uint64_t c = 0; c < table_clusters_; ++c)
        if ((table_offset_ >> cluster_bits_) + c >= end) beyond.push_back((table_offset_ >> cluster_bits_) + c);
    for (uint64_t block : table_)
        if (block && (block >> cluster_bits_) >= end) beyond.push_back(block >> cluster_bits_);
    std::sort(beyond.begin(), beyond.end());
    for (size_t i = 0; i < beyond.size();) {
        size_t j = i;
        while (j < beyond.size() && beyond[j] == beyond[i]) ++j;
        const uint64_t have = co_await refcount_of(beyond[i]);
        if (have < j - i) co_return std::make_pair(beyond[i], have);
        i = j;
    }
    co_return std::nullopt;
}

const std::vector<uint64_t>& Refcounts::block_index() const {
    if (block_index_.empty()) {
        // Rebuilt after the table changed (rare); a write checks every cluster it touches.
        block_index_.push_back(0);  // never empty once built
        for (uint64_t b : table_)
            if (b) block_index_.push_back(b >> cluster_bits_);
        std::sort(block_index_.begin(), block_index_.end());
    }
    return block_index_;
}

bool Refcounts::holds_refcount_metadata(uint64_t first, uint64_t end) const {
    uint64_t table_first = table_offset_ >> cluster_bits_;
    if (first < table_first + table_clusters_ && table_first < end) return true;
    const auto& blocks = block_index();
    auto it = std::lower_bound(blocks.begin(), blocks.end(), std::max<uint64_t>(first, 1));
    return it != blocks.end() && *it < end;
}

std::vector<uint64_t> Refcounts::refcount_metadata_in(uint64_t first, uint64_t end) const {
    std::vector<uint64_t> out;
    const uint64_t table_first = table_offset_ >> cluster_bits_;
    for (uint64_t c = std::max(first, table_first); c < std::min(end, table_first + table_clusters_); ++c) out.push_back(c);
    const auto& blocks = block_index();
    for (auto it = std::lower_bound(blocks.begin(), blocks.end(), std::max<uint64_t>(first, 1));
         it != blocks.end() && *it < end; ++it)
        out.push_back(*it);
    std::sort(out.begin(), out.end());
    return out;
}

void Refcounts::check_placement(uint64_t first, uint64_t count, const char* use) {
    if (!placement_check) return;
    if (auto what = placement_check(first, count)) {
        placement_problem_ = std::string(use) + " at " + hex(first << cluster_bits_) + " (" + std::to_string(count) +
                             " clusters, refcount 0) would overwrite " + *what;
        throw PlacementConflict(placement_problem_);
    }
}

Task<void> Refcounts::flush() {
    auto guard = co_await mutex_.lock();
    co_await table_cache_->sync();
}

}  // namespace qcowfs::qcow2
