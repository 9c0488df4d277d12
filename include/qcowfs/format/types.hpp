// Strong offset types and cluster geometry shared by every layer: keeps guest and host addresses apart.
#pragma once

#include <compare>
#include <cstdint>

namespace qcowfs {

/// a / b rounded up (b > 0).
inline constexpr uint64_t div_ceil(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/// A byte offset in the virtual disk that the guest (the exposed raw file) sees.
struct GuestOffset {
    uint64_t value = 0;
    auto operator<=>(const GuestOffset&) const = default;
};

/// A byte offset in a host file (the image file or its external data file).
struct HostOffset {
    uint64_t value = 0;
    auto operator<=>(const HostOffset&) const = default;
};

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
};

}  // namespace qcowfs
