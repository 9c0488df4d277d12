// Size of a new refcount structure that describes itself (refcount blocks, then the table): pure.
#pragma once

#include <cstdint>

namespace qcowfs::format {

/// A refcount structure laid out from host cluster `start`: `blocks` refcount blocks in clusters
/// [start, start + blocks), then the refcount table in the next `table_clusters` clusters.
struct RefcountLayout {
    uint64_t blocks = 0;
    uint64_t table_clusters = 0;
    /// The refcount table indexes [first_range, last_range] that the structure's own clusters
    /// fall in: each gets one of the new blocks.
    uint64_t first_range = 0;
    uint64_t last_range = 0;
};

/// The smallest structure at `start` that describes itself, as QEMU and qemu-img check lay it
/// out: one new block for each refcount range its own clusters fall in, plus `other_blocks` for
/// ranges below start / block_entries (a rebuild gives every range in use a new block; a grown
/// table keeps its old blocks: 0); a table with an entry for every range up to last_range and at
/// least `min_entries` entries, in whole clusters. Each count depends on the other (more blocks
/// may need more table, which may need another block): the least solution of both.
RefcountLayout refcount_layout(uint64_t start, uint64_t other_blocks, uint64_t min_entries, uint32_t cluster_bits,
                               uint64_t block_entries);

}  // namespace qcowfs::format
