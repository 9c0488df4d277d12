// L1, L2 (standard and extended) and refcount entry layouts: decode and encode (pure, no I/O).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "qcowfs/format/types.hpp"

namespace qcowfs::format {

inline constexpr uint64_t kOflagCopied = uint64_t{1} << 63;
inline constexpr uint64_t kOflagCompressed = uint64_t{1} << 62;
inline constexpr uint64_t kOflagZero = uint64_t{1} << 0;
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ULL;
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ULL;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffULL;
inline constexpr uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ULL;
/// The subcluster bitmap of an extended L2 entry: one "allocated" bit per subcluster (bits 0-31),
/// then one "reads as zeros" bit per subcluster (bits 32-63).
inline constexpr uint64_t kSubclusterAllocBits = 0x00000000ffffffffULL;
inline constexpr uint64_t kSubclusterZeroBits = 0xffffffff00000000ULL;

/// A decoded L1 entry.
struct L1Entry {
    uint64_t l2_offset = 0;  // 0: no L2 table
    bool copied = false;
    /// The L2 table's host offset (0: none).
    HostOffset l2_table() const { return HostOffset{l2_offset}; }
};
/// Decodes a raw (host-endian) L1 entry. Throws std::system_error(EIO) if reserved bits are set or
/// the L2 offset is not aligned to `cluster_bits`.
L1Entry decode_l1(uint64_t raw, uint32_t cluster_bits);
uint64_t encode_l1(L1Entry e);

/// What one subcluster (or whole cluster, without extended L2) of the guest disk maps to.
enum class SubclusterType {
    unallocated_plain,  // no host cluster: read from backing file, or zeros
    unallocated_alloc,  // extended L2: host cluster exists, this subcluster not allocated: backing/zeros
    zero_plain,         // reads as zeros, no host cluster
    zero_alloc,         // reads as zeros, host cluster kept (preallocated)
    normal,             // data at host_offset (+ subcluster offset)
    compressed,         // whole cluster compressed at host_offset, compressed_size bytes
};

/// A decoded L2 entry (standard, or the first half of an extended one plus its bitmap).
struct L2Entry {
    uint64_t raw = 0;      // first 64 bits
    uint64_t bitmap = 0;   // extended L2 only: bits 0-31 allocated, 32-63 reads-as-zero
    bool compressed = false;
    bool copied = false;
    bool zero_flag = false;        // standard L2 only (bit 0)
    uint64_t host_offset = 0;      // cluster offset (standard) or byte offset (compressed); 0 if none
    uint64_t compressed_size = 0;  // bytes to read for a compressed cluster (from host_offset)
    /// host_offset as a typed offset: the data cluster, or the compressed bytes' first byte.
    HostOffset host() const { return HostOffset{host_offset}; }
};

/// Decodes an L2 entry. `bitmap` is ignored (must be 0) without extended L2.
/// Throws std::system_error(EIO) for reserved bits set, a host offset not aligned to the cluster,
/// or an extended bitmap with a subcluster both allocated and zero, or allocated bits on a
/// cluster without a host offset, or a non-zero bitmap on a compressed cluster.
/// `external_data_file`: the image has one, so a standard entry with offset 0 and COPIED set maps
/// host offset 0 (then host_offset is 0 and copied is true); without it that entry is EIO, as are
/// compressed clusters with it.
L2Entry decode_l2(uint64_t raw, uint64_t bitmap, const ClusterGeometry& g, uint32_t version,
                  bool external_data_file = false);

/// The type of subcluster `sc` (0 without extended L2) of a decoded entry.
SubclusterType subcluster_type(const L2Entry& e, uint32_t sc, const ClusterGeometry& g);

/// Encodes a standard cluster descriptor (host_offset, copied, zero flag).
uint64_t encode_l2_standard(uint64_t host_offset, bool copied, bool zero_flag);
/// Encodes a compressed cluster descriptor: host_offset may be unaligned; `size` bytes are used
/// from it (the descriptor stores the number of 512-byte sectors touched beyond the first).
uint64_t encode_l2_compressed(uint64_t host_offset, uint64_t size, uint32_t cluster_bits);

/// Reads entry `index` of a refcount block with entries of 2^refcount_order bits (order 0..6;
/// sub-byte widths are packed least-significant bits first, wider ones big-endian).
uint64_t get_refcount(std::span<const std::byte> block, uint32_t refcount_order, uint64_t index);
/// Writes entry `index`; `value` must not exceed max_refcount(refcount_order).
void set_refcount(std::span<std::byte> block, uint32_t refcount_order, uint64_t index, uint64_t value);
uint64_t max_refcount(uint32_t refcount_order);
/// Entries in one refcount block of a cluster of 2^cluster_bits bytes.
uint64_t refcount_block_entries(uint32_t cluster_bits, uint32_t refcount_order);

}  // namespace qcowfs::format
