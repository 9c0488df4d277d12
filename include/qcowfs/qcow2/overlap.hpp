// Where an image file's metadata lies: the check before any host cluster is written or handed out.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qcowfs::qcow2 {

class Refcounts;

/// Kinds of metadata, as a mask of what a check may ignore (the structure being written itself).
enum MetadataKind : uint32_t {
    kMetaHeader = 1u << 0,
    kMetaActiveL1 = 1u << 1,
    kMetaRefcountTable = 1u << 2,
    kMetaRefcountBlock = 1u << 3,
    kMetaActiveL2 = 1u << 4,
    kMetaSnapshotTable = 1u << 5,
    kMetaSnapshotL1 = 1u << 6,
    kMetaBitmapDirectory = 1u << 7,
    kMetaBitmapTable = 1u << 8,
};

/// The metadata of one writable image file, in host clusters, for an overlap check in
/// O(log n) time per check, whatever the image's size (QEMU's qcow2_pre_write_overlap_check):
/// fixed areas (header, active L1, refcount table, snapshot table, snapshot L1 tables, bitmap
/// directory and tables) in a sorted list, active L2 tables in a sorted vector (8 bytes per
/// table, as many as the in-memory L1 table has entries), refcount blocks asked of Refcounts.
/// Used under the image's lock only.
class MetadataMap {
public:
    struct Area {
        uint64_t first = 0;  // first host cluster
        uint64_t end = 0;    // one past the last
        MetadataKind kind = kMetaHeader;
        std::string what;
    };

    /// Replaces the fixed areas. Returns a description of two areas that overlap each other
    /// (the image is then inconsistent and must not be written), or nullopt.
    std::optional<std::string> set_fixed(std::vector<Area> areas);
    /// Replaces the active L2 tables (sorted here: O(n log n) for a whole L1 table).
    void set_l2(std::vector<uint64_t> clusters);
    /// One table more or less: O(n) moves in the worst case, cheap at the end where new tables go.
    void add_l2(uint64_t cluster);
    void remove_l2(uint64_t cluster);
    bool is_l2(uint64_t cluster) const;
    const std::vector<Area>& fixed() const { return fixed_; }
    const std::vector<uint64_t>& l2_tables() const { return l2_; }
    /// The first metadata structure, not of a kind in `ignore`, that lies in host clusters
    /// [first, first + count), named ("the L1 table", "a refcount block", ...); nullopt if none.
    std::optional<std::string> find(uint64_t first, uint64_t count, uint32_t ignore, const Refcounts* refcounts) const;

private:
    std::vector<Area> fixed_;    // sorted by first, pairwise disjoint
    std::vector<uint64_t> l2_;   // sorted host cluster indexes of active L2 tables
};

}  // namespace qcowfs::qcow2
