// libFuzzer target: L1, L2 (standard, compressed, extended) and refcount entry codecs over raw
// values and arbitrary geometry, with decode -> encode -> decode round trips.
//
// The first bytes choose the geometry (cluster_bits, extended L2, version, external data file,
// refcount order); the rest are entries. Out-of-range geometry must be refused with EINVAL, bad
// entries with EIO, and never anything else.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <vector>

#include "fuzz_support.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/header.hpp"

using namespace qcowfs;
using namespace qcowfs::format;
using fuzz::expect_errno;

namespace {

void l1_entry(uint64_t raw, uint32_t cluster_bits) {
    L1Entry e;
    try {
        e = decode_l1(raw, cluster_bits);
    } catch (const std::system_error& ex) {
        expect_errno(ex, {EIO, EINVAL}, "decode_l1");
        return;
    }
    FUZZ_EXPECT(cluster_bits >= kMinClusterBits && cluster_bits <= kMaxClusterBits, "decode_l1 accepted cluster_bits");
    FUZZ_EXPECT(e.l2_offset % (uint64_t{1} << cluster_bits) == 0, "decoded L2 table offset not aligned");
    FUZZ_EXPECT(encode_l1(e) == raw, "L1 entry " + hex(raw) + " does not encode back");
}

void l2_entry(uint64_t raw, uint64_t bitmap, const ClusterGeometry& g, uint32_t version, bool data_file) {
    L2Entry e;
    try {
        e = decode_l2(raw, bitmap, g, version, data_file);
    } catch (const std::system_error& ex) {
        expect_errno(ex, {EIO, EINVAL}, "decode_l2");
        return;
    }
    for (uint32_t sc = 0; sc < g.subclusters_per_cluster(); ++sc) {
        try {
            SubclusterType t = subcluster_type(e, sc, g);
            if (t == SubclusterType::normal) FUZZ_EXPECT(e.host_offset != 0 || e.copied, "normal subcluster without host");
        } catch (const std::system_error& ex) {
            fuzz::violated("subcluster_type of decoded entry " + hex(raw) + "/" + hex(bitmap) + ": " + ex.what());
        }
    }
    if (e.compressed) {
        FUZZ_EXPECT(e.host_offset >= g.cluster_size(), "compressed cluster accepted inside the header cluster");
        FUZZ_EXPECT(e.compressed_size > 0, "compressed cluster of 0 bytes");
        uint64_t back = encode_l2_compressed(e.host_offset, e.compressed_size, g.cluster_bits);
        FUZZ_EXPECT(back == raw, "compressed entry " + hex(raw) + " encodes back as " + hex(back));
    } else {
        FUZZ_EXPECT(e.host_offset % g.cluster_size() == 0, "decoded host offset not aligned");
        FUZZ_EXPECT(encode_l2_standard(e.host_offset, e.copied, e.zero_flag) == raw, "L2 entry does not encode back");
    }
}

/// encode_l2_compressed -> decode_l2 keeps the offset and covers at least the bytes asked for.
void compressed_encode(uint64_t host, uint64_t size, const ClusterGeometry& g) {
    uint64_t raw;
    try {
        raw = encode_l2_compressed(host, size, g.cluster_bits);
    } catch (const std::system_error& ex) {
        expect_errno(ex, {EINVAL}, "encode_l2_compressed");
        return;
    }
    if (host < g.cluster_size()) return;  // encodable, but decode refuses the header cluster
    L2Entry e;
    try {
        e = decode_l2(raw, 0, ClusterGeometry{g.cluster_bits, false}, 3, false);
    } catch (const std::system_error& ex) {
        fuzz::violated("encoded compressed entry " + hex(raw) + " does not decode: " + ex.what());
    }
    FUZZ_EXPECT(e.compressed && e.host_offset == host, "compressed entry lost its offset");
    FUZZ_EXPECT(e.compressed_size >= size && e.compressed_size < size + 512, "compressed entry covers the wrong size");
}

void refcounts(std::vector<std::byte> block, uint32_t order, FuzzedDataProvider& in) {
    uint64_t max;
    try {
        max = max_refcount(order);
    } catch (const std::system_error& ex) {
        expect_errno(ex, {EINVAL}, "max_refcount");
        return;
    }
    const uint64_t entries = (uint64_t{block.size()} * 8) >> order;
    const std::vector<std::byte> before = block;
    for (int n = 0; n < 64 && in.remaining_bytes() > 0; ++n) {
        uint64_t index = in.ConsumeIntegralInRange<uint64_t>(0, entries + 1);
        uint64_t value = in.ConsumeIntegral<uint64_t>() & (max << 1 | 1);  // now and then one bit too wide
        try {
            uint64_t old = get_refcount(block, order, index);
            set_refcount(block, order, index, value);
            FUZZ_EXPECT(value <= max, "set_refcount accepted a value above the maximum");
            FUZZ_EXPECT(get_refcount(block, order, index) == value, "refcount does not read back");
            set_refcount(block, order, index, old);
            FUZZ_EXPECT(block == before, "restoring a refcount did not restore the block");
        } catch (const std::system_error& ex) {
            expect_errno(ex, {EINVAL}, "refcount access");
            FUZZ_EXPECT(index >= entries || value > max, "refcount access refused in range: " + std::string(ex.what()));
        }
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    FuzzedDataProvider in(data, size);
    const uint32_t cluster_bits = in.ConsumeIntegralInRange<uint32_t>(kMinClusterBits - 1, kMaxClusterBits + 1);
    const bool extended = in.ConsumeBool();
    const uint32_t version = in.ConsumeBool() ? 3 : 2;
    const bool data_file = in.ConsumeBool();
    const uint32_t order = in.ConsumeIntegralInRange<uint32_t>(0, 7);
    const ClusterGeometry g{cluster_bits, extended};

    std::vector<std::byte> block(in.ConsumeIntegralInRange<size_t>(0, 4096));
    for (auto& b : block) b = std::byte{in.ConsumeIntegral<uint8_t>()};
    refcounts(block, order, in);

    while (in.remaining_bytes() >= 8) {
        uint64_t raw = in.ConsumeIntegral<uint64_t>();
        uint64_t bitmap = extended ? in.ConsumeIntegral<uint64_t>() : 0;
        l1_entry(raw, cluster_bits);
        l2_entry(raw, bitmap, g, version, data_file);
        compressed_encode(raw >> in.ConsumeIntegralInRange<int>(0, 63), bitmap & 0x3fffff, g);
    }
    return 0;
}
