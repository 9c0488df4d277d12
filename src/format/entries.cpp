// Decodes and encodes L1, L2 (standard, compressed, extended) and refcount block entries.
#include "qcowfs/format/entries.hpp"

#include "detail.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"

namespace qcowfs::format {

namespace {

using detail::aligned;
using detail::hex;

constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feULL;  // bits 1-8 and 56-61
constexpr uint64_t kSectorSize = 512;
constexpr uint64_t kHostOffsetLimit = uint64_t{1} << 56;
constexpr uint32_t kMinExtendedL2ClusterBits = 14;

void check_cluster_bits(uint32_t cluster_bits) {
    if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits)
        fail(EINVAL, "invalid cluster_bits " + std::to_string(cluster_bits));
}

void check_geometry(const ClusterGeometry& g) {
    check_cluster_bits(g.cluster_bits);
    if (g.extended_l2 && g.cluster_bits < kMinExtendedL2ClusterBits)
        fail(EINVAL, "extended L2 entries need cluster_bits >= 14, got " + std::to_string(g.cluster_bits));
}

/// x in the spec: the compressed descriptor's host offset has x bits, the sector count 62 - x.
uint32_t compressed_offset_bits(uint32_t cluster_bits) { return 62 - (cluster_bits - 8); }

L2Entry decode_compressed(uint64_t raw, uint64_t bitmap, const ClusterGeometry& g, bool external_data_file) {
    if (external_data_file) corrupt("compressed L2 entry " + hex(raw) + " in an image with an external data file");
    if (raw & kOflagCopied) corrupt("compressed L2 entry " + hex(raw) + " has the COPIED bit set");
    if (bitmap != 0)
        corrupt("compressed L2 entry " + hex(raw) + " has a non-zero subcluster bitmap " + hex(bitmap));
    uint32_t x = compressed_offset_bits(g.cluster_bits);
    uint64_t descriptor = raw & ~(kOflagCopied | kOflagCompressed);
    L2Entry e{raw, 0, true, false, false, descriptor & ((uint64_t{1} << x) - 1), 0};
    if (e.host_offset >= kHostOffsetLimit)
        corrupt("compressed L2 entry " + hex(raw) + " has a host offset beyond 56 bits");
    if (e.host_offset < g.cluster_size())
        corrupt("compressed L2 entry " + hex(raw) + " points into the header cluster");
    uint64_t nb_sectors = descriptor >> x;
    e.compressed_size = (nb_sectors + 1) * kSectorSize - e.host_offset % kSectorSize;
    return e;
}

void check_bitmap(uint64_t raw, uint64_t bitmap, bool has_host) {
    uint64_t both = (bitmap >> 32) & bitmap & kSubclusterAllocBits;
    if (both)
        corrupt("extended L2 entry " + hex(raw) + " bitmap " + hex(bitmap) + " marks subclusters " + hex(both) +
                " both allocated and zero");
    if (!has_host && (bitmap & kSubclusterAllocBits))
        corrupt("extended L2 entry " + hex(raw) + " bitmap " + hex(bitmap) +
                " allocates subclusters without a host cluster");
}

L2Entry decode_standard(uint64_t raw, uint64_t bitmap, const ClusterGeometry& g, uint32_t version,
                        bool external_data_file) {
    // Bit 0 is the zero flag only in version 3 without extended L2; elsewhere it is reserved.
    uint64_t reserved = kL2StdReservedMask | (version < 3 || g.extended_l2 ? kOflagZero : 0);
    if (raw & reserved) corrupt("L2 entry " + hex(raw) + " has reserved bits " + hex(raw & reserved) + " set");
    L2Entry e{raw, bitmap, false, (raw & kOflagCopied) != 0, (raw & kOflagZero) != 0, raw & kL2OffsetMask, 0};
    if (!aligned(e.host_offset, g.cluster_bits))
        corrupt("L2 entry " + hex(raw) + " has host offset " + hex(e.host_offset) + " not aligned to the cluster");
    if (e.host_offset == 0 && e.copied && !external_data_file)
        corrupt("L2 entry " + hex(raw) + " has COPIED set without a host offset (only valid with a data file)");
    if (g.extended_l2) check_bitmap(raw, bitmap, e.host_offset != 0 || e.copied);
    return e;
}

}  // namespace

L1Entry decode_l1(uint64_t raw, uint32_t cluster_bits) {
    check_cluster_bits(cluster_bits);
    if (raw & kL1ReservedMask)
        corrupt("L1 entry " + hex(raw) + " has reserved bits " + hex(raw & kL1ReservedMask) + " set");
    L1Entry e{raw & kL1OffsetMask, (raw & kOflagCopied) != 0};
    if (!aligned(e.l2_offset, cluster_bits))
        corrupt("L1 entry " + hex(raw) + " has L2 table offset " + hex(e.l2_offset) + " not aligned to the cluster");
    return e;
}

uint64_t encode_l1(L1Entry e) {
    if (e.l2_offset & ~kL1OffsetMask) fail(EINVAL, "L2 table offset " + hex(e.l2_offset) + " cannot be encoded");
    return e.l2_offset | (e.copied ? kOflagCopied : 0);
}

L2Entry decode_l2(uint64_t raw, uint64_t bitmap, const ClusterGeometry& g, uint32_t version, bool external_data_file) {
    check_geometry(g);
    if (!g.extended_l2) bitmap = 0;
    if (raw & kOflagCompressed) return decode_compressed(raw, bitmap, g, external_data_file);
    return decode_standard(raw, bitmap, g, version, external_data_file);
}

SubclusterType subcluster_type(const L2Entry& e, uint32_t sc, const ClusterGeometry& g) {
    if (sc >= g.subclusters_per_cluster())
        fail(EINVAL, "subcluster index " + std::to_string(sc) + " out of range");
    if (e.compressed) return SubclusterType::compressed;
    bool has_host = e.host_offset != 0 || e.copied;
    if (!g.extended_l2) {
        if (e.zero_flag) return has_host ? SubclusterType::zero_alloc : SubclusterType::zero_plain;
        return has_host ? SubclusterType::normal : SubclusterType::unallocated_plain;
    }
    uint64_t bit = uint64_t{1} << sc;
    if (e.bitmap & bit) {
        if (!has_host)
            corrupt("extended L2 entry " + hex(e.raw) + " allocates subcluster " + std::to_string(sc) +
                    " without a host cluster");
        return SubclusterType::normal;
    }
    if ((e.bitmap >> 32) & bit) return has_host ? SubclusterType::zero_alloc : SubclusterType::zero_plain;
    return has_host ? SubclusterType::unallocated_alloc : SubclusterType::unallocated_plain;
}

uint64_t encode_l2_standard(uint64_t host_offset, bool copied, bool zero_flag) {
    if (host_offset & ~kL2OffsetMask) fail(EINVAL, "host offset " + hex(host_offset) + " cannot be encoded");
    return host_offset | (copied ? kOflagCopied : 0) | (zero_flag ? kOflagZero : 0);
}

uint64_t encode_l2_compressed(uint64_t host_offset, uint64_t size, uint32_t cluster_bits) {
    check_cluster_bits(cluster_bits);
    uint32_t x = compressed_offset_bits(cluster_bits);
    if (host_offset >= kHostOffsetLimit || host_offset >> x)
        fail(EINVAL, "compressed cluster offset " + hex(host_offset) + " cannot be encoded");
    uint64_t max_sectors = uint64_t{1} << (cluster_bits - 8);  // the sector count field has cluster_bits - 8 bits
    if (size == 0 || size > max_sectors * kSectorSize)
        fail(EINVAL, "compressed cluster size " + std::to_string(size) + " cannot be encoded");
    uint64_t nb_sectors = (host_offset % kSectorSize + size + kSectorSize - 1) / kSectorSize - 1;
    if (nb_sectors >= max_sectors)
        fail(EINVAL, "compressed cluster of " + std::to_string(size) + " bytes at " + hex(host_offset) +
                         " spans too many sectors");
    return kOflagCompressed | nb_sectors << x | host_offset;
}

namespace {

void check_refcount_order(uint32_t refcount_order) {
    if (refcount_order > 6) fail(EINVAL, "invalid refcount_order " + std::to_string(refcount_order));
}

void check_refcount_index(size_t block_bytes, uint32_t refcount_order, uint64_t index) {
    check_refcount_order(refcount_order);
    uint64_t entries = (uint64_t{block_bytes} * 8) >> refcount_order;
    if (index >= entries)
        fail(EINVAL, "refcount index " + std::to_string(index) + " outside a block of " + std::to_string(entries) +
                         " entries");
}

}  // namespace

uint64_t get_refcount(std::span<const std::byte> block, uint32_t refcount_order, uint64_t index) {
    check_refcount_index(block.size(), refcount_order, index);
    if (refcount_order < 3) {
        uint32_t shift = static_cast<uint32_t>(index & ((8u >> refcount_order) - 1)) << refcount_order;
        uint64_t byte = std::to_integer<uint64_t>(block[index >> (3 - refcount_order)]);
        return (byte >> shift) & max_refcount(refcount_order);
    }
    const std::byte* p = block.data() + (index << (refcount_order - 3));
    switch (refcount_order) {
        case 3: return std::to_integer<uint64_t>(p[0]);
        case 4: return load_be16(p);
        case 5: return load_be32(p);
        default: return load_be64(p);
    }
}

void set_refcount(std::span<std::byte> block, uint32_t refcount_order, uint64_t index, uint64_t value) {
    check_refcount_index(block.size(), refcount_order, index);
    if (value > max_refcount(refcount_order))
        fail(EINVAL, "refcount " + std::to_string(value) + " exceeds the maximum of " +
                         std::to_string(max_refcount(refcount_order)));
    if (refcount_order < 3) {
        uint32_t shift = static_cast<uint32_t>(index & ((8u >> refcount_order) - 1)) << refcount_order;
        std::byte& b = block[index >> (3 - refcount_order)];
        uint64_t mask = max_refcount(refcount_order) << shift;
        b = static_cast<std::byte>((std::to_integer<uint64_t>(b) & ~mask) | value << shift);
        return;
    }
    std::byte* p = block.data() + (index << (refcount_order - 3));
    switch (refcount_order) {
        case 3: p[0] = static_cast<std::byte>(value); break;
        case 4: store_be16(p, static_cast<uint16_t>(value)); break;
        case 5: store_be32(p, static_cast<uint32_t>(value)); break;
        default: store_be64(p, value); break;
    }
}

uint64_t max_refcount(uint32_t refcount_order) {
    check_refcount_order(refcount_order);
    uint32_t bits = 1u << refcount_order;
    return bits == 64 ? UINT64_MAX : (uint64_t{1} << bits) - 1;
}

uint64_t refcount_block_entries(uint32_t cluster_bits, uint32_t refcount_order) {
    check_cluster_bits(cluster_bits);
    check_refcount_order(refcount_order);
    return uint64_t{1} << (cluster_bits + 3 - refcount_order);
}

}  // namespace qcowfs::format
