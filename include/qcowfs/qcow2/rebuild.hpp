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

/// What a reference count may cost: the memory for counters and the metadata it may read.
struct ScanLimits {
    /// Counters (8 bytes per host cluster) are kept for at most this many bytes' worth of
    /// clusters at a time; a file with more referenced clusters is counted in several passes
    /// over the metadata, one window of host clusters per pass.
    uint64_t counter_bytes = 32u << 20;
    /// Metadata read over all passes (L1 tables, L2 tables; each read counts at least 4 KiB), at
    /// most. Beyond it the count stops with std::system_error(ECANCELED): the work is
    /// proportional to the image's metadata, which a hostile image makes as large as it likes.
    uint64_t scan_bytes = uint64_t{1} << 30;
};

/// Counts the references to every host cluster of `file`, as rebuild_refcounts() describes
/// below; the refcount table and blocks are not counted. Calls `window(first, counts)` for
/// consecutive windows of host clusters from cluster 0 up to the last referenced one, each at
/// most limits.counter_bytes / 8 clusters (a multiple of `align` clusters), counts[i] being the
/// references to cluster first + i; `last` is true for the last window (the callee may then take
/// the vector's content). Throws as rebuild_refcounts() does for inconsistent metadata
/// (before any window is reported for the first pass's problems); ECANCELED past
/// limits.scan_bytes. Writes nothing. Returns the last referenced cluster.
Task<uint64_t> count_references(io::File& file, const format::ImageMetadata& meta,
                                const std::vector<format::Snapshot>& snapshots, const ScanLimits& limits,
                                uint64_t align,
                                const std::function<Task<void>(uint64_t first, std::vector<uint64_t>& counts, bool last)>& window);

Task<RebuildResult> rebuild_refcounts(io::File& file, const format::ImageMetadata& meta,
                                      const std::vector<format::Snapshot>& snapshots,
                                      std::function<Task<void>(uint64_t table_offset, uint32_t table_clusters)> point_header_at,
                                      const ScanLimits& limits = {});

}  // namespace qcowfs::qcow2
