// MetadataMap: which host clusters hold metadata, answered in O(log n) for any cluster range.
#include <doctest/doctest.h>

#include "qcowfs/qcow2/overlap.hpp"

using namespace qcowfs::qcow2;

TEST_CASE("MetadataMap finds fixed areas, L2 tables and honours the ignore mask") {
    MetadataMap m;
    CHECK(!m.set_fixed({{0, 1, kMetaHeader, "the image header"},
                        {10, 14, kMetaActiveL1, "the L1 table"},
                        {20, 21, kMetaSnapshotTable, "the snapshot table"},
                        {30, 40, kMetaSnapshotL1, "snapshot 1's L1 table"}}));
    m.set_l2({50, 17, 50, 60});
    CHECK(m.l2_tables() == std::vector<uint64_t>{17, 50, 60});
    CHECK(m.find(0, 1, 0, nullptr) == "the image header");
    CHECK(m.find(9, 1, 0, nullptr) == std::nullopt);
    CHECK(m.find(9, 2, 0, nullptr) == "the L1 table");
    CHECK(m.find(13, 1, 0, nullptr) == "the L1 table");
    CHECK(m.find(14, 3, 0, nullptr) == std::nullopt);
    CHECK(m.find(14, 4, 0, nullptr) == "an L2 table");
    CHECK(m.find(17, 1, kMetaActiveL2, nullptr) == std::nullopt);
    CHECK(m.find(12, 1, kMetaActiveL1, nullptr) == std::nullopt);
    CHECK(m.find(25, 100, kMetaSnapshotL1 | kMetaActiveL2, nullptr) == std::nullopt);
    CHECK(m.find(25, 100, kMetaActiveL2, nullptr) == "snapshot 1's L1 table");
    CHECK(m.find(UINT64_MAX - 1, 5, 0, nullptr) == std::nullopt);  // no overflow past the end
    m.add_l2(5);
    m.remove_l2(50);
    CHECK(m.find(5, 1, 0, nullptr) == "an L2 table");
    CHECK(m.find(50, 1, 0, nullptr) == std::nullopt);
    CHECK(m.is_l2(60));
}

TEST_CASE("MetadataMap refuses fixed areas that overlap each other") {
    MetadataMap m;
    auto overlap = m.set_fixed({{10, 14, kMetaActiveL1, "the L1 table"}, {13, 15, kMetaSnapshotTable, "the snapshot table"}});
    REQUIRE(overlap);
    CHECK(overlap->find("the L1 table") != std::string::npos);
    CHECK(overlap->find("the snapshot table") != std::string::npos);
}
