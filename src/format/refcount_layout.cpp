// Size of a new refcount structure that describes itself: the fixpoint of blocks and table size.
#include "qcowfs/format/refcount_layout.hpp"

#include <algorithm>

#include "qcowfs/format/types.hpp"

namespace qcowfs::format {

RefcountLayout refcount_layout(uint64_t start, uint64_t other_blocks, uint64_t min_entries, uint32_t cluster_bits,
                               uint64_t block_entries) {
    const uint64_t per_table_cluster = (uint64_t{1} << cluster_bits) / 8;
    RefcountLayout l;
    l.first_range = start / block_entries;
    // Both counts only grow from here to the least solution: more clusters reach further ranges,
    // more ranges need more blocks and table entries.
    l.blocks = other_blocks + 1;
    for (;;) {
        const uint64_t last_range = (start + l.blocks + l.table_clusters - 1) / block_entries;
        const uint64_t blocks = other_blocks + (last_range - l.first_range + 1);
        const uint64_t table_clusters = div_ceil(std::max(min_entries, last_range + 1), per_table_cluster);
        l.last_range = last_range;
        if (blocks == l.blocks && table_clusters == l.table_clusters) return l;
        l.blocks = blocks;
        l.table_clusters = table_clusters;
    }
}

}  // namespace qcowfs::format
