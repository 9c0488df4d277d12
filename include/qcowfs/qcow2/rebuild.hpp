// Refcount rebuild: recount every host cluster's references and write a fresh refcount structure.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "qcowfs/format/header.hpp"
#include "qcowfs/format/snapshot.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::io {
class File;
}

namespace qcowfs::qcow2 {

struct RebuildResult {
    uint64_t table_offset = 0;     // host offset of the new refcount table
    uint32_t table_clusters = 0;   // its size in clusters
    uint64_t clusters_in_use = 0;  // clusters with a non-zero refcount, the new structure included
};

/// The number of references to every host cluster of `file` (index: cluster), counted as
/// rebuild_refcounts() describes below; the refcount table and blocks are not counted. Throws
/// as rebuild_refcounts() does for inconsistent metadata; writes nothing.
Task<std::vector<uint64_t>> count_references(io::File& file, const format::ImageMetadata& meta,
                                             const std::vector<format::Snapshot>& snapshots);

/// Recomputes the refcount of every host cluster of `file` from everything that references it —
/// cluster 0 (header, extensions, backing name), the active L1 table and every snapshot's L1
/// table, each L2 table once per L1 entry pointing at it, data clusters once per L2 entry
/// (standard, extended with host cluster incl. preallocated zero, compressed: every cluster the
/// compressed bytes touch), the snapshot table, snapshot extra data if any, the bitmap directory,
/// bitmap tables and bitmap data clusters — and writes a fresh refcount table and blocks after
/// the last used cluster. Data clusters of an external data file are not counted (they live in
/// the other file). Order: new blocks and table written and synced (File::flush), then
/// `point_header_at(offset, clusters)` which must rewrite the header's refcount_table_offset /
/// refcount_table_clusters and sync; the old refcount table and blocks are then free.
/// Throws std::system_error: EIO naming the problem if metadata is inconsistent (an entry
/// pointing beyond the end of the file or into cluster 0, a refcount overflowing the width),
/// the I/O error otherwise.
///
/// Used when an image with the dirty bit set is opened for writing, before its first write. The
/// old refcount table and blocks are never written: the new structure goes after both them and
/// the last referenced cluster, so a crash at any point leaves the image as it was (dirty) or
/// pointing at the complete new structure. Nothing is written when the counting fails.
/// Memory: 8 bytes per host cluster of the file, one L2 table (a cluster) at a time, the largest
/// L1 table, the new refcount table (at most format::kMaxRefcountTableBytes).
/// `snapshots` must be the image's parsed snapshot table (header.nb_snapshots entries).
/// A LUKS header's clusters (crypto header extension) are counted as well.
Task<RebuildResult> rebuild_refcounts(io::File& file, const format::ImageMetadata& meta,
                                      const std::vector<format::Snapshot>& snapshots,
                                      std::function<Task<void>(uint64_t table_offset, uint32_t table_clusters)> point_header_at);

}  // namespace qcowfs::qcow2
