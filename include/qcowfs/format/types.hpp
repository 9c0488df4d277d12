// Strong offset types and cluster geometry shared by every layer: keeps guest and host addresses apart.
#pragma once

#include <compare>
#include <cstdint>
#include <utility>

namespace qcowfs {

/// a / b rounded up (b > 0).
inline constexpr uint64_t div_ceil(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/// A 64-bit position in one address space (`Space` is a tag type): offsets and cluster indexes
/// of the guest and of the host stay apart, and carry their own arithmetic.
template <class Space>
struct Position {
    uint64_t value = 0;
    auto operator<=>(const Position&) const = default;
    Position operator+(uint64_t n) const { return Position{value + n}; }
    /// How far this lies past `o` (o <= *this).
    uint64_t operator-(Position o) const { return value - o.value; }
    /// 0 means "none" for host offsets in L1 and L2 entries.
    explicit operator bool() const { return value != 0; }
};

/// A byte offset in the virtual disk that the guest (the exposed raw file) sees.
using GuestOffset = Position<struct GuestOffsetSpace>;
/// A byte offset in a host file (the image file or its external data file).
using HostOffset = Position<struct HostOffsetSpace>;
/// The index of a guest cluster (its first byte >> cluster_bits).
using GuestCluster = Position<struct GuestClusterSpace>;
/// The index of a host cluster (its first byte >> cluster_bits): what refcounts count.
using HostCluster = Position<struct HostClusterSpace>;

/// Where byte `byte` of a table read in slices of `slice_bytes` lies: the first byte of its
/// slice, and its offset inside the slice.
struct SlicePosition {
    uint64_t slice_start = 0;
    uint64_t in_slice = 0;
};
inline SlicePosition slice_of(uint64_t byte, uint64_t slice_bytes) {
    return SlicePosition{byte / slice_bytes * slice_bytes, byte % slice_bytes};
}

/// Sizes derived from cluster_bits and the L2 entry width; all shifts in one place.
struct ClusterGeometry {
    uint32_t cluster_bits = 16;
    bool extended_l2 = false;

    uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
    uint64_t cluster_mask() const { return cluster_size() - 1; }
    /// Bytes per L2 entry: 8 for standard entries, 16 for extended ones.
    uint32_t l2_entry_size() const { return extended_l2 ? 16 : 8; }
    /// Entries in one L2 table (one cluster).
    uint64_t l2_entries() const { return cluster_size() / l2_entry_size(); }
    /// Guest bytes one L2 table maps.
    uint64_t l2_coverage() const { return cluster_size() * l2_entries(); }
    /// Subclusters per cluster: 32 with extended L2 entries, else 1.
    uint32_t subclusters_per_cluster() const { return extended_l2 ? 32 : 1; }
    uint32_t subcluster_bits() const { return extended_l2 ? cluster_bits - 5 : cluster_bits; }
    uint64_t subcluster_size() const { return uint64_t{1} << subcluster_bits(); }

    uint64_t cluster_index(GuestOffset g) const { return g.value >> cluster_bits; }
    uint64_t offset_in_cluster(uint64_t off) const { return off & cluster_mask(); }
    uint64_t l1_index(GuestOffset g) const { return cluster_index(g) / l2_entries(); }
    uint64_t l2_index(GuestOffset g) const { return cluster_index(g) % l2_entries(); }
    uint32_t subcluster_index(GuestOffset g) const {
        return static_cast<uint32_t>(offset_in_cluster(g.value) >> subcluster_bits());
    }
    /// Number of L1 entries needed to map a virtual disk of `size` bytes.
    uint64_t l1_entries_for(uint64_t size) const {
        uint64_t bytes_per_l2 = cluster_size() * l2_entries();
        return size / bytes_per_l2 + (size % bytes_per_l2 != 0);
    }

    GuestCluster guest_cluster(GuestOffset g) const { return GuestCluster{g.value >> cluster_bits}; }
    GuestOffset offset_of(GuestCluster c) const { return GuestOffset{c.value << cluster_bits}; }
    HostCluster host_cluster(HostOffset h) const { return HostCluster{h.value >> cluster_bits}; }
    HostOffset offset_of(HostCluster c) const { return HostOffset{c.value << cluster_bits}; }
    /// The host clusters [first, end) that `bytes` bytes at `h` touch (none for 0 bytes).
    std::pair<HostCluster, HostCluster> clusters_spanned(HostOffset h, uint64_t bytes) const {
        return {host_cluster(h), bytes ? host_cluster(h + (bytes - 1)) + 1 : host_cluster(h)};
    }
    /// Bytes from `g` to the end of its cluster.
    uint64_t remaining_in_cluster(GuestOffset g) const { return cluster_size() - offset_in_cluster(g.value); }
    /// Bytes from `g` to the end of the guest range its L2 table maps.
    uint64_t remaining_in_l2_table(GuestOffset g) const { return l2_coverage() - g.value % l2_coverage(); }
    /// Byte offset of `g`'s entry inside its L2 table.
    uint64_t l2_entry_byte(GuestOffset g) const { return l2_index(g) * l2_entry_size(); }
};

}  // namespace qcowfs
