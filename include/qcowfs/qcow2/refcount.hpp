// Refcounts of one image file's host clusters: the refcount table and blocks, and the cluster allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "qcowfs/cache/slice_cache.hpp"
#include "qcowfs/format/header.hpp"
#include "qcowfs/format/refcount_layout.hpp"
#include "qcowfs/format/types.hpp"
#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/async_mutex.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::io {
class File;
}

namespace qcowfs::qcow2 {

/// EIO from Refcounts: clusters its refcounts call free hold metadata (placement_check said so),
/// so the image is inconsistent. Its reason is placement_problem().
class PlacementConflict : public std::system_error {
public:
    explicit PlacementConflict(const std::string& reason)
        : std::system_error(std::error_code(EIO, std::generic_category()), reason) {}
};

/// The refcount of every host cluster of one image file, and the allocator built on it.
///
/// The refcount table is kept whole in memory (at most 8 MiB, format::kMaxRefcountTableBytes);
/// refcount blocks go through a SliceCache. Changes stay in memory until flush() or until the
/// table has to move; their write order is:
///   1. refcount blocks (new ones, and changed entries of existing ones), then File::flush;
///   2. refcount table entries that point at new blocks, then File::flush;
/// so a table entry never points at a block that is not on disk. An L2 cache makes its entries
/// wait for all of this with `l2_cache.depends_on(refcounts.table_cache())`.
///
/// Used under the image's lock only. update(), allocate() and flush() are serialized among
/// themselves (an operation that waits for I/O holds the others back), so two allocations never
/// see the same free cluster.
///
/// Refcount decreases are written by the next flush() like increases: a caller that frees a
/// cluster still referenced by an L2 entry on disk must get that L2 change on disk first (rule 4
/// of docs/architecture.md).
class Refcounts {
public:
    /// Uses the header's cluster_bits, refcount_order, refcount_table_offset and
    /// refcount_table_clusters. `cache_bytes` bounds the memory for clean refcount block slices.
    Refcounts(io::File& file, const format::Header& header, size_t cache_bytes);

    /// Reads and validates the refcount table: inside the file and at most 8 MiB; every entry
    /// with reserved bits 0-8 clear and either 0 or a cluster-aligned block inside the file.
    /// Throws std::system_error(EIO) naming the problem, or the read's error.
    Task<void> load();

    /// Refcount of host cluster `cluster` (0 beyond the table or in an unallocated block).
    /// May read a refcount block. Throws the read's error, or EIO for a block cut short by EOF.
    Task<uint64_t> get(HostCluster cluster);

    /// Adds `delta` to the refcount of clusters [first_cluster, first_cluster + count). All of
    /// them are checked first: if one would drop below 0 or exceed max_refcount(refcount_order),
    /// throws std::system_error(EIO) naming that cluster and changes nothing. Increases in ranges
    /// without a refcount block allocate the block (and may grow the refcount table, which moves
    /// it: see on_table_moved); those never use a cluster of the range. Reaching 0 makes a
    /// cluster a candidate for allocate() again. Waits for block reads and, when the table grows,
    /// for writes and flushes. On an I/O error part of the range may have been changed.
    Task<void> update(HostCluster first_cluster, uint64_t count, int64_t delta);

    /// Finds `count` contiguous free clusters (refcount 0, never cluster 0), lowest first from the
    /// free-cluster hint, so clusters freed inside the file are reused before the file grows; sets
    /// their refcount to 1 and returns the first. The clusters may lie beyond
    /// the end of the file: the caller writes them. Waits and fails as update(); EINVAL for
    /// count 0.
    Task<HostCluster> allocate(uint64_t count);

    /// Writes dirty refcount blocks, then (if any entry changed) the refcount table, then
    /// File::flush(): see the write order above. Throws the write's or flush's error (what was
    /// not written stays dirty).
    Task<void> flush();

    /// Called when the refcount table has moved (it grew): the new table and its blocks are written
    /// and flushed; the callee must point the header's refcount_table_offset and
    /// refcount_table_clusters at it and flush before returning. Only then are the old table's
    /// clusters freed. If it throws, the in-memory state keeps the old table (the new one is
    /// leaked) and the error propagates. Required for the table to grow: without it, a growth
    /// fails with EIO before anything is written.
    std::function<Task<void>(uint64_t offset, uint32_t clusters)> on_table_moved;

    /// The cache an L2 cache must depend on: flushing it writes the refcount blocks, syncs, then
    /// writes the refcount table entries.
    cache::SliceCache& table_cache() { return *table_cache_; }

    /// The first cluster of [first, first + references.size()) whose refcount is below its
    /// number of references (`references[i]` for cluster first + i, plus one for the refcount
    /// table and each refcount block, which this object knows), as (cluster, refcount); nullopt
    /// when every used cluster of the window is counted at least as often as it is used. Reads the
    /// refcount blocks of the window. `last`: no window follows, so the refcount table and blocks
    /// past this one (the tables name no cluster there) are checked as well.
    Task<std::optional<std::pair<uint64_t, uint64_t>>> find_undercounted(uint64_t first, std::vector<uint64_t>& references,
                                                                         bool last);

    /// True if a refcount change is not yet on disk.
    bool dirty() const { return blocks_->dirty_slices() || table_cache_->dirty_slices(); }

    /// True if host cluster `cluster_index` holds the refcount table or a refcount block.
    bool is_refcount_metadata(uint64_t cluster_index) const { return holds_refcount_metadata(cluster_index, cluster_index + 1); }
    /// True if a host cluster in [first, end) holds the refcount table or a refcount block
    /// (O(log blocks)).
    bool holds_refcount_metadata(uint64_t first, uint64_t end) const;
    /// The host clusters in [first, end) that hold the refcount table or a refcount block,
    /// ascending (O(log blocks + found)).
    std::vector<uint64_t> refcount_metadata_in(uint64_t first, uint64_t end) const;

    /// Asked before clusters are handed out or used for a new refcount block or table, with the
    /// cluster range: the metadata found there, or nullopt. When it names something, nothing is
    /// changed, placement_problem() says what, and the operation throws PlacementConflict (EIO)
    /// (refcounts that say "free" for a cluster in use: the image is inconsistent).
    std::function<std::optional<std::string>(uint64_t first_cluster, uint64_t count)> placement_check;
    /// The last problem placement_check reported (empty if none).
    const std::string& placement_problem() const { return placement_problem_; }

    uint64_t table_offset() const { return table_offset_; }
    uint32_t table_clusters() const { return table_clusters_; }
    uint64_t cluster_size() const { return uint64_t{1} << cluster_bits_; }
    /// Refcount entries per refcount block.
    uint64_t block_entries() const { return block_entries_; }

private:
    // Half-open range of clusters that a metadata allocation must not use.
    struct Range {
        uint64_t first = 0;
        uint64_t end = 0;
        bool contains(uint64_t c) const { return c >= first && c < end; }
    };

    uint64_t block_offset(uint64_t table_index) const {
        return table_index < table_.size() ? table_[table_index] : 0;
    }
    Task<uint64_t> refcount_of(uint64_t cluster_index);
    Task<void> set_refcount(uint64_t cluster_index, uint64_t value);
    Task<void> update_locked(uint64_t first, uint64_t count, int64_t delta);
    Task<uint64_t> find_free(uint64_t count, Range exclude, uint64_t* first_free_seen);
    Task<void> allocate_block(uint64_t table_index, Range exclude);
    Task<void> create_block(uint64_t table_index, uint64_t cluster_index);
    Task<void> store_table_entry(uint64_t table_index);
    /// Moves the refcount table to a larger one with at least `min_entries` entries, placed
    /// outside `exclude` (see the write order above; calls on_table_moved).
    Task<void> grow_table(uint64_t min_entries, Range exclude);
    /// Where grow_table puts the new blocks and table, and their sizes. ENOSPC past 8 MiB.
    format::RefcountLayout grown_table_layout(uint64_t min_entries, Range exclude) const;
    /// Creates the new blocks and table of layout `l` as dirty slices; returns the new table.
    Task<std::vector<uint64_t>> create_grown_table(const format::RefcountLayout& l);
    /// Runs placement_check on [first, first + count): throws PlacementConflict if it reports
    /// metadata there.
    void check_placement(uint64_t first, uint64_t count, const char* use);

    io::File& file_;
    uint32_t cluster_bits_;
    uint32_t refcount_order_;
    uint64_t block_entries_;   // refcount entries per block
    uint64_t slice_entries_;   // refcount entries per cache slice
    uint64_t table_offset_;
    uint32_t table_clusters_;
    std::vector<uint64_t> table_;  // block offsets (reserved bits stripped); covers whole clusters
    mutable std::vector<uint64_t> block_index_;  // sorted block cluster indexes; empty: rebuild
    /// block_index_, rebuilt first if the table changed (0 leads it: never empty once built).
    const std::vector<uint64_t>& block_index() const;
    std::unique_ptr<cache::SliceCache> blocks_;       // refcount block slices
    std::unique_ptr<cache::SliceCache> table_cache_;  // refcount table slices, written after blocks_
    std::string placement_problem_;
    uint64_t hint_ = 1;  // no free cluster lies below this one (clusters only, not exact)
    AsyncMutex mutex_;  // serializes update/allocate/flush
};

}  // namespace qcowfs::qcow2
