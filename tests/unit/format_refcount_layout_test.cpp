// The size of a self-describing refcount structure: the least solution, checked by brute force.
#include <doctest/doctest.h>

#include <algorithm>

#include "qcowfs/format/refcount_layout.hpp"
#include "qcowfs/format/types.hpp"

using namespace qcowfs;

namespace {

/// True if `blocks` new blocks and `table_clusters` table clusters at `start` describe themselves.
bool describes_itself(uint64_t start, uint64_t other, uint64_t min_entries, uint64_t per_table_cluster,
                      uint64_t block_entries, uint64_t blocks, uint64_t table_clusters) {
    if (blocks + table_clusters == 0) return false;
    const uint64_t last_range = (start + blocks + table_clusters - 1) / block_entries;
    const uint64_t own = last_range - start / block_entries + 1;
    return blocks >= other + own && table_clusters * per_table_cluster >= std::max(min_entries, last_range + 1);
}

}  // namespace

TEST_CASE("refcount_layout: the smallest structure that describes itself") {
    // 512-byte clusters: 64 table entries per cluster; refcount widths give 4096 .. 64 entries per block.
    const uint32_t cluster_bits = 9;
    const uint64_t per_table_cluster = 64;
    for (uint64_t block_entries : {uint64_t{64}, uint64_t{256}, uint64_t{4096}}) {
        for (uint64_t start : {uint64_t{1}, uint64_t{63}, uint64_t{64}, uint64_t{1000}, uint64_t{4095}, uint64_t{70000}}) {
            for (uint64_t other : {uint64_t{0}, uint64_t{3}}) {
                for (uint64_t min_entries : {uint64_t{0}, uint64_t{65}, uint64_t{5000}}) {
                    CAPTURE(block_entries);
                    CAPTURE(start);
                    CAPTURE(other);
                    CAPTURE(min_entries);
                    auto l = format::refcount_layout(start, other, min_entries, cluster_bits, block_entries);
                    CHECK(l.first_range == start / block_entries);
                    CHECK(l.last_range == (start + l.blocks + l.table_clusters - 1) / block_entries);
                    CHECK(l.blocks == other + (l.last_range - l.first_range + 1));
                    CHECK(describes_itself(start, other, min_entries, per_table_cluster, block_entries, l.blocks,
                                           l.table_clusters));
                    // Nothing smaller does: fewer blocks with the same table, or a smaller table.
                    CHECK(!describes_itself(start, other, min_entries, per_table_cluster, block_entries, l.blocks - 1,
                                            l.table_clusters));
                    if (l.table_clusters > 0)
                        CHECK(!describes_itself(start, other, min_entries, per_table_cluster, block_entries, l.blocks,
                                                l.table_clusters - 1));
                }
            }
        }
    }
}

TEST_CASE("refcount_layout: a grown table at a block boundary needs ceil(table / (entries - 1)) blocks") {
    // The closed form grow_table used before: nb * E >= nb + tc.
    const uint64_t block_entries = 256;
    for (uint64_t r0 : {uint64_t{1}, uint64_t{7}, uint64_t{300}}) {
        for (uint64_t min_entries : {uint64_t{1}, uint64_t{100}, uint64_t{20000}, uint64_t{100000}}) {
            auto l = format::refcount_layout(r0 * block_entries, 0, min_entries, 9, block_entries);
            CHECK(l.blocks == div_ceil(l.table_clusters, block_entries - 1));
            CHECK(l.table_clusters == div_ceil(std::max(min_entries, r0 + l.blocks), 64));
        }
    }
}
