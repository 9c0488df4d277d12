// Unit tests for L1/L2/refcount entry decoding and encoding, including hostile entries.
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <vector>

#include "test_errors.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"

using namespace qcowfs;
using namespace qcowfs::format;

using qcowfs::test::thrown_errno;

namespace {

const ClusterGeometry kStd{16, false};
const ClusterGeometry kExt{16, true};

}  // namespace

TEST_CASE("L1 entries") {
    L1Entry e = decode_l1(encode_l1({0x123450000, true}), 16);
    CHECK(e.l2_offset == 0x123450000);
    CHECK(e.copied);
    CHECK(decode_l1(0, 16).l2_offset == 0);
    CHECK(encode_l1({0x200, false}) == 0x200);
    CHECK(thrown_errno([] { decode_l1(0x10001, 16); }) == EIO);                      // reserved bit 0
    CHECK(thrown_errno([] { decode_l1(uint64_t{1} << 56 | 0x10000, 16); }) == EIO);  // reserved bit 56
    CHECK(thrown_errno([] { decode_l1(0x10200, 16); }) == EIO);                      // unaligned
    CHECK(thrown_errno([] { decode_l1(0x10200, 9); }) == 0);
    CHECK(thrown_errno([] { decode_l1(0, 40); }) == EINVAL);
    CHECK(thrown_errno([] { encode_l1({0x100, false}); }) == EINVAL);
}

TEST_CASE("standard L2 entries") {
    L2Entry e = decode_l2(encode_l2_standard(0x50000, true, false), 0, kStd, 3);
    CHECK(e.host_offset == 0x50000);
    CHECK(e.copied);
    CHECK_FALSE(e.compressed);
    CHECK(subcluster_type(e, 0, kStd) == SubclusterType::normal);
    CHECK(subcluster_type(decode_l2(0, 0, kStd, 3), 0, kStd) == SubclusterType::unallocated_plain);
    CHECK(subcluster_type(decode_l2(kOflagZero, 0, kStd, 3), 0, kStd) == SubclusterType::zero_plain);
    CHECK(subcluster_type(decode_l2(0x50000 | kOflagZero, 0, kStd, 3), 0, kStd) == SubclusterType::zero_alloc);
    CHECK(decode_l2(0x50000, 0xffff, kStd, 3).bitmap == 0);  // the bitmap is ignored without extended L2

    SUBCASE("the zero flag is reserved in version 2") {
        CHECK(thrown_errno([] { decode_l2(kOflagZero, 0, kStd, 2); }) == EIO);
        CHECK(subcluster_type(decode_l2(0x50000, 0, kStd, 2), 0, kStd) == SubclusterType::normal);
    }
    SUBCASE("reserved bits and alignment") {
        for (uint64_t bit : {1, 8, 56, 61}) {
            CAPTURE(bit);
            CHECK(thrown_errno([&] { decode_l2(0x50000 | uint64_t{1} << bit, 0, kStd, 3); }) == EIO);
        }
        CHECK(thrown_errno([] { decode_l2(0x50200, 0, kStd, 3); }) == EIO);
        CHECK(thrown_errno([] { decode_l2(0x50200, 0, ClusterGeometry{9, false}, 3); }) == 0);
        CHECK(thrown_errno([] { encode_l2_standard(0x50001, false, false); }) == EINVAL);
    }
    SUBCASE("offset 0 with COPIED is only valid with an external data file") {
        CHECK(thrown_errno([] { decode_l2(kOflagCopied, 0, kStd, 3); }) == EIO);
        L2Entry d = decode_l2(kOflagCopied, 0, kStd, 3, true);
        CHECK(d.host_offset == 0);
        CHECK(subcluster_type(d, 0, kStd) == SubclusterType::normal);
        CHECK(subcluster_type(decode_l2(kOflagCopied | kOflagZero, 0, kStd, 3, true), 0, kStd) ==
              SubclusterType::zero_alloc);
    }
    SUBCASE("subcluster index out of range") {
        CHECK(thrown_errno([&] { subcluster_type(e, 1, kStd); }) == EINVAL);
    }
}

TEST_CASE("compressed descriptors for every cluster size") {
    for (uint32_t bits = 9; bits <= 21; ++bits) {
        CAPTURE(bits);
        ClusterGeometry g{bits, false};
        uint64_t cs = g.cluster_size();
        uint32_t x = 62 - (bits - 8);
        uint64_t max_offset = (uint64_t{1} << std::min(x, 56u)) - 1;
        for (uint64_t off : {cs, cs + 1, cs + 511, 3 * cs + 700, max_offset - 4 * cs}) {
            for (uint64_t size : {uint64_t{1}, uint64_t{512}, cs / 2 + 3, cs, 2 * cs - off % 512}) {
                CAPTURE(off);
                CAPTURE(size);
                uint64_t raw = encode_l2_compressed(off, size, bits);
                CHECK((raw & kOflagCompressed) != 0);
                CHECK((raw & kOflagCopied) == 0);
                L2Entry e = decode_l2(raw, 0, g, 3);
                CHECK(e.compressed);
                CHECK(e.host_offset == off);
                uint64_t nb_sectors = (raw & ~(kOflagCompressed | kOflagCopied)) >> x;
                CHECK(e.compressed_size == (nb_sectors + 1) * 512 - off % 512);
                CHECK(e.compressed_size >= size);
                CHECK(e.compressed_size < size + 512);
                CHECK(subcluster_type(e, 0, g) == SubclusterType::compressed);
            }
        }
        // The sector count field has bits - 8 bits: the largest value spans 2^(bits-8) sectors.
        uint64_t all_sectors = kOflagCompressed | ((uint64_t{1} << (bits - 8)) - 1) << x | cs;
        CHECK(decode_l2(all_sectors, 0, g, 3).compressed_size == 2 * cs);
        CHECK(thrown_errno([&] { encode_l2_compressed(cs + 1, 2 * cs, bits); }) == EINVAL);
        CHECK(thrown_errno([&] { encode_l2_compressed(cs, 0, bits); }) == EINVAL);
        CHECK(thrown_errno([&] { encode_l2_compressed(max_offset + 1, 512, bits); }) == EINVAL);
    }
}

TEST_CASE("hostile compressed descriptors") {
    uint64_t raw = encode_l2_compressed(0x50000, 1000, 16);
    CHECK(thrown_errno([&] { decode_l2(raw | kOflagCopied, 0, kStd, 3); }) == EIO);
    CHECK(thrown_errno([&] { decode_l2(raw, 1, kExt, 3); }) == EIO);
    CHECK(thrown_errno([&] { decode_l2(raw, 0, kExt, 3); }) == 0);
    CHECK(thrown_errno([&] { decode_l2(raw, 0, kStd, 3, true); }) == EIO);  // not with a data file
    CHECK(thrown_errno([&] { decode_l2(kOflagCompressed | 0x100, 0, kStd, 3); }) == EIO);  // in cluster 0
    // 512-byte clusters: the offset field has 61 bits, those above 55 must be zero.
    const ClusterGeometry tiny{9, false};
    CHECK(thrown_errno([&] { decode_l2(kOflagCompressed | uint64_t{1} << 58, 0, tiny, 3); }) == EIO);
}

TEST_CASE("extended L2 subcluster types") {
    const uint64_t host = encode_l2_standard(0x70000, true, false);
    SUBCASE("allocated cluster") {
        uint64_t bitmap = 0x1 | 0x4 | uint64_t{0x2} << 32;  // sc0, sc2 allocated; sc1 zero
        L2Entry e = decode_l2(host, bitmap, kExt, 3);
        CHECK(e.bitmap == bitmap);
        CHECK(subcluster_type(e, 0, kExt) == SubclusterType::normal);
        CHECK(subcluster_type(e, 1, kExt) == SubclusterType::zero_alloc);
        CHECK(subcluster_type(e, 2, kExt) == SubclusterType::normal);
        CHECK(subcluster_type(e, 3, kExt) == SubclusterType::unallocated_alloc);
        CHECK(subcluster_type(e, 31, kExt) == SubclusterType::unallocated_alloc);
        CHECK(thrown_errno([&] { subcluster_type(e, 32, kExt); }) == EINVAL);
    }
    SUBCASE("unallocated cluster") {
        L2Entry e = decode_l2(0, uint64_t{0x80000000} << 32, kExt, 3);
        CHECK(subcluster_type(e, 31, kExt) == SubclusterType::zero_plain);
        CHECK(subcluster_type(e, 0, kExt) == SubclusterType::unallocated_plain);
    }
    SUBCASE("invalid bitmaps") {
        CHECK(thrown_errno([&] { decode_l2(host, 0x8 | uint64_t{0x8} << 32, kExt, 3); }) == EIO);  // both
        CHECK(thrown_errno([] { decode_l2(0, 0x1, kExt, 3); }) == EIO);  // allocated without a host cluster
        L2Entry d = decode_l2(kOflagCopied, 0x1, kExt, 3, true);  // host offset 0 in a data file
        CHECK(subcluster_type(d, 0, kExt) == SubclusterType::normal);
    }
    SUBCASE("bit 0 of the descriptor is reserved with extended L2") {
        CHECK(thrown_errno([&] { decode_l2(host | kOflagZero, 0, kExt, 3); }) == EIO);
        CHECK(thrown_errno([] { decode_l2(kOflagZero, 0, kExt, 3); }) == EIO);
    }
    SUBCASE("geometry") {
        CHECK(kExt.l2_entries() == 4096);
        CHECK(kExt.subcluster_size() == 2048);
        CHECK(thrown_errno([] { decode_l2(0, 0, ClusterGeometry{13, true}, 3); }) == EINVAL);
    }
}

TEST_CASE("refcount entries of every width") {
    std::mt19937_64 rng(42);
    for (uint32_t order = 0; order <= 6; ++order) {
        CAPTURE(order);
        const uint64_t max = max_refcount(order);
        CHECK(max == (order == 6 ? UINT64_MAX : (uint64_t{1} << (1u << order)) - 1));
        std::vector<std::byte> block(512);
        const uint64_t n = refcount_block_entries(9, order);
        CHECK(n == 4096u >> order);
        std::vector<uint64_t> expected(n);
        for (uint64_t i = 0; i < n; ++i) {
            expected[i] = rng() & max;
            set_refcount(block, order, i, expected[i]);
        }
        for (uint64_t i = 0; i < n; ++i) REQUIRE(get_refcount(block, order, i) == expected[i]);
        // Overwriting one entry with all-ones and then zero leaves its neighbours alone.
        for (uint64_t i : {uint64_t{0}, uint64_t{1}, n / 2 + 1, n - 1}) {
            set_refcount(block, order, i, max);
            CHECK(get_refcount(block, order, i) == max);
            set_refcount(block, order, i, 0);
            CHECK(get_refcount(block, order, i) == 0);
            if (i > 0) CHECK(get_refcount(block, order, i - 1) == expected[i - 1]);
            if (i + 1 < n) CHECK(get_refcount(block, order, i + 1) == expected[i + 1]);
            set_refcount(block, order, i, expected[i]);
        }
        CHECK(thrown_errno([&] { get_refcount(block, order, n); }) == EINVAL);
        CHECK(thrown_errno([&] { set_refcount(block, order, n, 0); }) == EINVAL);
        if (order < 6) CHECK(thrown_errno([&] { set_refcount(block, order, 0, max + 1); }) == EINVAL);
    }
    CHECK(thrown_errno([] { max_refcount(7); }) == EINVAL);
    CHECK(refcount_block_entries(16, 4) == 32768);
}

TEST_CASE("refcount layouts: sub-byte LSB first, wider big-endian") {
    std::vector<std::byte> block(16);
    set_refcount(block, 0, 0, 1);
    set_refcount(block, 0, 3, 1);
    CHECK(std::to_integer<int>(block[0]) == 0x09);
    set_refcount(block, 1, 5, 3);  // byte 1, bits 2-3
    CHECK(std::to_integer<int>(block[1]) == 0x0c);
    set_refcount(block, 2, 5, 0xa);  // byte 2, high nibble
    CHECK(std::to_integer<int>(block[2]) == 0xa0);
    set_refcount(block, 4, 2, 0x1234);
    CHECK(std::to_integer<int>(block[4]) == 0x12);
    CHECK(std::to_integer<int>(block[5]) == 0x34);
    set_refcount(block, 6, 1, 0x0102030405060708ULL);
    CHECK(std::to_integer<int>(block[8]) == 0x01);
    CHECK(std::to_integer<int>(block[15]) == 0x08);
}
