// Unit tests for the internal snapshot table: round-trips and hostile tables.
#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <string>

#include "test_errors.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/snapshot.hpp"

using namespace qcowfs;
using namespace qcowfs::format;

using qcowfs::test::thrown_errno;

namespace {

constexpr uint64_t kFileSize = 0x200000;

Header header_with(uint32_t nb_snapshots) {
    Header h;
    h.cluster_bits = 16;
    h.size = uint64_t{1} << 30;
    h.nb_snapshots = nb_snapshots;
    return h;
}

std::vector<Snapshot> two_snapshots() {
    Snapshot a;
    a.l1_table_offset = 0x80000;
    a.l1_size = 2;
    a.id = "1";
    a.name = "before upgrade";
    a.date_sec = 1700000000;
    a.date_nsec = 123456789;
    a.vm_clock_nsec = 987654321012ULL;
    a.vm_state_size = uint64_t{5} << 32;  // needs the 64-bit field
    a.disk_size = uint64_t{1} << 29;
    Snapshot b;
    b.l1_table_offset = 0x90000;
    b.l1_size = 4;
    b.id = "22";
    b.name = "after";
    b.disk_size = uint64_t{1} << 30;
    b.extra_data.assign(24, std::byte{0});
    b.extra_data[23] = std::byte{0x2a};  // icount, kept verbatim
    return {a, b};
}

}  // namespace

TEST_CASE("snapshot table round-trips") {
    std::vector<Snapshot> in = two_snapshots();
    std::vector<std::byte> table = serialize_snapshot_table(in, 3);
    CHECK(table.size() == (40 + 16 + 1 + 14 + 1) + (40 + 24 + 2 + 5));  // no padding after the last entry
    Header h = header_with(2);
    CHECK(snapshot_table_bytes_needed(table, h) == table.size());
    std::vector<Snapshot> out = parse_snapshot_table(table, h, kFileSize);
    REQUIRE(out.size() == 2);
    for (size_t i = 0; i < 2; ++i) {
        CAPTURE(i);
        CHECK(out[i].l1_table_offset == in[i].l1_table_offset);
        CHECK(out[i].l1_size == in[i].l1_size);
        CHECK(out[i].id == in[i].id);
        CHECK(out[i].name == in[i].name);
        CHECK(out[i].date_sec == in[i].date_sec);
        CHECK(out[i].date_nsec == in[i].date_nsec);
        CHECK(out[i].vm_clock_nsec == in[i].vm_clock_nsec);
        CHECK(out[i].vm_state_size == in[i].vm_state_size);
        CHECK(out[i].disk_size == in[i].disk_size);
    }
    CHECK(out[0].extra_data.size() == 16);
    REQUIRE(out[1].extra_data.size() == 24);
    CHECK(std::to_integer<int>(out[1].extra_data[23]) == 0x2a);
    CHECK(serialize_snapshot_table(out, 3) == table);
    // A caller may pass more than the table: only nb_snapshots entries are read.
    table.resize(table.size() + 100, std::byte{0xff});
    CHECK(parse_snapshot_table(table, h, kFileSize).size() == 2);
    CHECK(snapshot_table_bytes_needed(table, h) == table.size() - 100);
}

TEST_CASE("entries without extra data fall back to the header's size and the 32-bit VM state size") {
    std::vector<std::byte> t(48);
    store_be64(t.data(), 0x80000);
    store_be32(t.data() + 8, 2);
    store_be16(t.data() + 12, 1);
    store_be16(t.data() + 14, 3);
    store_be32(t.data() + 32, 4096);
    std::memcpy(t.data() + 40, "1old", 4);
    std::vector<Snapshot> s = parse_snapshot_table(t, header_with(1), kFileSize);
    REQUIRE(s.size() == 1);
    CHECK(s[0].id == "1");
    CHECK(s[0].name == "old");
    CHECK(s[0].vm_state_size == 4096);
    CHECK(s[0].disk_size == uint64_t{1} << 30);
    CHECK(s[0].extra_data.empty());
}

TEST_CASE("no snapshots: empty table") {
    CHECK(parse_snapshot_table({}, header_with(0), kFileSize).empty());
    CHECK(snapshot_table_bytes_needed({}, header_with(0)) == 0);
    CHECK(serialize_snapshot_table({}, 3).empty());
}

TEST_CASE("snapshot_table_bytes_needed: a lower bound from any prefix, exact once the table is whole") {
    std::vector<std::byte> table = serialize_snapshot_table(two_snapshots(), 3);
    Header h = header_with(2);
    CHECK(snapshot_table_bytes_needed({}, h) == 2 * 40);  // nothing seen: two fixed parts
    // The first fixed part gives the first entry's size: it, padded, and the second fixed part.
    std::span<const std::byte> first40 = std::span(table).first(40);
    CHECK(snapshot_table_bytes_needed(first40, h) == 72 + 40);
    // Reading what it asks for, again and again, reaches the table's size and stops there.
    uint64_t have = 0, rounds = 0;
    for (uint64_t needed = 0; (needed = snapshot_table_bytes_needed(std::span(table).first(have), h)) > have; ++rounds)
        have = needed;
    CHECK(have == table.size());
    CHECK(rounds == 3);
    // An entry's extra data length is checked as soon as its fixed part is there.
    std::vector<std::byte> bad = table;
    store_be32(bad.data() + 36, 1025);
    CHECK(thrown_errno([&] { snapshot_table_bytes_needed(std::span(bad).first(40), h); }) == EIO);
    CHECK(thrown_errno([&] { snapshot_table_bytes_needed({}, header_with(kMaxSnapshots + 1)); }) == EIO);
}

TEST_CASE("hostile snapshot tables") {
    std::vector<std::byte> good = serialize_snapshot_table(two_snapshots(), 3);
    Header h = header_with(2);
    std::string what;
    auto parse_errno = [&](const std::vector<std::byte>& t) {
        return thrown_errno([&] { parse_snapshot_table(t, h, kFileSize); }, &what);
    };
    const size_t second = 72;  // offset of the second entry

    SUBCASE("truncated at every byte") {
        for (size_t n = 0; n < second + 40 + 24 + 7; ++n) {
            CAPTURE(n);
            std::vector<std::byte> t(good.begin(), good.begin() + static_cast<ptrdiff_t>(n));
            CHECK(parse_errno(t) == EIO);
            // A prefix of the table: more is needed, and never more than the table has.
            uint64_t needed = snapshot_table_bytes_needed(t, h);
            CHECK(needed > n);
            CHECK(needed <= good.size());
        }
        CHECK(what.find("entry 1 truncated") != std::string::npos);
    }
    SUBCASE("more entries announced than present") {
        h.nb_snapshots = 3;
        CHECK(parse_errno(good) == EIO);
        h.nb_snapshots = kMaxSnapshots + 1;
        CHECK(parse_errno(good) == EIO);
    }
    SUBCASE("huge id, name and extra data lengths") {
        std::vector<std::byte> t = good;
        store_be16(t.data() + second + 12, 0xffff);
        CHECK(parse_errno(t) == EIO);
        t = good;
        store_be16(t.data() + 14, 0xffff);
        CHECK(parse_errno(t) == EIO);
        t = good;
        store_be32(t.data() + 36, 0xffffffff);
        CHECK(parse_errno(t) == EIO);
        CHECK(what.find("extra data") != std::string::npos);
    }
    SUBCASE("bad L1 tables") {
        std::vector<std::byte> t = good;
        store_be64(t.data() + second, 0x90200);
        CHECK(parse_errno(t) == EIO);
        CHECK(what.find("entry 1") != std::string::npos);
        CHECK(what.find("0x90200") != std::string::npos);
        store_be64(t.data() + second, kFileSize);
        CHECK(parse_errno(t) == EIO);
        store_be64(t.data() + second, 0);
        CHECK(parse_errno(t) == EIO);
        t = good;
        store_be32(t.data() + 8, 0x400001);
        CHECK(parse_errno(t) == EIO);
        store_be32(t.data() + 8, 0);
        CHECK(parse_errno(t) == 0);
    }
    SUBCASE("serialize refuses oversized fields") {
        std::vector<Snapshot> s = two_snapshots();
        s[0].name.assign(65536, 'n');
        CHECK(thrown_errno([&] { serialize_snapshot_table(s, 3); }) == EINVAL);
        s = two_snapshots();
        s[1].extra_data.resize(1025);
        CHECK(thrown_errno([&] { serialize_snapshot_table(s, 3); }) == EINVAL);
    }
}
