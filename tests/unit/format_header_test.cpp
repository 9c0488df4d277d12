// Unit tests for the qcow2 header, extensions and backing name: round-trips and hostile images.
#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <string>

#include "test_errors.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"

using namespace qcowfs;
using namespace qcowfs::format;

using qcowfs::test::thrown_errno;

namespace {

constexpr uint64_t kFileSize = 0x100000;

Header v3_header() {
    Header h;
    h.cluster_bits = 16;
    h.size = uint64_t{1} << 30;
    h.l1_size = 2;
    h.l1_table_offset = 0x30000;
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    return h;
}

ImageMetadata v3_metadata() {
    ImageMetadata m;
    m.header = v3_header();
    return m;
}

std::vector<std::byte> image_of(const ImageMetadata& m) { return serialize_metadata(m); }

int parse_errno(const std::vector<std::byte>& c0, std::string* what = nullptr, uint64_t file_size = kFileSize) {
    return thrown_errno([&] { parse_metadata(c0, file_size); }, what);
}

void check_same_header(const Header& a, const Header& b) {
    CHECK(a.version == b.version);
    CHECK(a.cluster_bits == b.cluster_bits);
    CHECK(a.size == b.size);
    CHECK(a.crypt_method == b.crypt_method);
    CHECK(a.l1_size == b.l1_size);
    CHECK(a.l1_table_offset == b.l1_table_offset);
    CHECK(a.refcount_table_offset == b.refcount_table_offset);
    CHECK(a.refcount_table_clusters == b.refcount_table_clusters);
    CHECK(a.nb_snapshots == b.nb_snapshots);
    CHECK(a.snapshots_offset == b.snapshots_offset);
    CHECK(a.incompatible_features == b.incompatible_features);
    CHECK(a.compatible_features == b.compatible_features);
    CHECK(a.autoclear_features == b.autoclear_features);
    CHECK(a.refcount_order == b.refcount_order);
    CHECK(a.compression_type == b.compression_type);
}

}  // namespace

TEST_CASE("big-endian helpers") {
    std::byte b[8];
    store_be64(b, 0x0102030405060708ULL);
    CHECK(std::to_integer<int>(b[0]) == 1);
    CHECK(std::to_integer<int>(b[7]) == 8);
    CHECK(load_be64(b) == 0x0102030405060708ULL);
    CHECK(load_be32(b + 4) == 0x05060708u);
    CHECK(load_be16(b + 6) == 0x0708u);
    store_be16(b, 0xfffe);
    CHECK(load_be16(b) == 0xfffe);
    store_be32(b, 0x514649fb);
    CHECK(has_qcow2_magic(std::span<const std::byte>(b, 4)));
    CHECK_FALSE(has_qcow2_magic(std::span<const std::byte>(b, 3)));
}

TEST_CASE("v3 metadata round-trips with every extension and a backing file") {
    ImageMetadata m = v3_metadata();
    m.header.incompatible_features = kIncompatCompressionType | kIncompatDirty;
    m.header.compression_type = CompressionType::zstd;
    m.header.compatible_features = kCompatLazyRefcounts;
    m.header.autoclear_features = kAutoclearBitmaps;
    m.header.refcount_order = 3;
    m.header.nb_snapshots = 2;
    m.header.snapshots_offset = 0x50000;
    m.backing_file = "base image.qcow2";
    m.extensions.backing_format = "qcow2";
    m.extensions.bitmaps = BitmapsExtension{3, 0x300, 0x60000};
    m.extensions.feature_names = {{0, 0, "dirty bit"}, {1, 0, "lazy refcounts"}, {2, 1, std::string(46, 'x')}};
    m.extensions.unknown = {{0x12345678, {std::byte{1}, std::byte{2}, std::byte{3}}}};

    std::vector<std::byte> c0 = serialize_metadata(m);
    REQUIRE(c0.size() == 65536);
    ImageMetadata p = parse_metadata(c0, kFileSize);
    check_same_header(p.header, m.header);
    CHECK(p.header.header_length == 112);  // grown to hold the compression type byte
    CHECK(p.header.dirty());
    CHECK(p.backing_file == m.backing_file);
    CHECK(p.header.backing_file_size == m.backing_file.size());
    CHECK(p.extensions.backing_format == "qcow2");
    REQUIRE(p.extensions.bitmaps.has_value());
    CHECK(p.extensions.bitmaps->nb_bitmaps == 3);
    CHECK(p.extensions.bitmaps->bitmap_directory_size == 0x300);
    CHECK(p.extensions.bitmaps->bitmap_directory_offset == 0x60000);
    REQUIRE(p.extensions.feature_names.size() == 3);
    CHECK(p.extensions.feature_names[1].type == 1);
    CHECK(p.extensions.feature_names[1].name == "lazy refcounts");
    CHECK(p.extensions.feature_names[2].name == std::string(46, 'x'));
    REQUIRE(p.extensions.unknown.size() == 1);
    CHECK(p.extensions.unknown[0].type == 0x12345678);
    CHECK(p.extensions.unknown[0].data == m.extensions.unknown[0].data);
    CHECK(serialize_metadata(p) == c0);
}

TEST_CASE("v2 metadata round-trips; extensions start at byte 72") {
    ImageMetadata m = v3_metadata();
    m.header.version = 2;
    m.header.header_length = 72;
    m.backing_file = "/images/base.raw";
    m.extensions.backing_format = "raw";
    std::vector<std::byte> c0 = serialize_metadata(m);
    CHECK(load_be32(c0.data() + 72) == kExtBackingFormat);
    ImageMetadata p = parse_metadata(c0, kFileSize);
    check_same_header(p.header, m.header);
    CHECK(p.header.header_length == 72);
    CHECK(p.header.refcount_order == 4);
    CHECK(p.backing_file == m.backing_file);
    CHECK(p.extensions.backing_format == "raw");
}

TEST_CASE("external data file, LUKS crypto header and extended L2 are parsed") {
    ImageMetadata m = v3_metadata();
    m.header.incompatible_features = kIncompatDataFile | kIncompatExtendedL2;
    m.header.autoclear_features = kAutoclearDataFileRaw;
    m.header.crypt_method = 2;
    m.header.l1_size = 4;  // 16-byte L2 entries: half the coverage per L2 table
    m.extensions.data_file = "disk.raw";
    m.extensions.unknown = {{kExtCrypto, std::vector<std::byte>(16, std::byte{7})}};
    ImageMetadata p = parse_metadata(serialize_metadata(m), kFileSize);
    CHECK(p.header.has_external_data_file());
    CHECK(p.header.data_file_raw());
    CHECK(p.header.extended_l2());
    CHECK(p.header.geometry().l2_entries() == 4096);
    CHECK(p.extensions.data_file == "disk.raw");
    CHECK(p.extensions.has_crypto_header);
    REQUIRE(p.extensions.unknown.size() == 1);
    CHECK(p.extensions.unknown[0].data == m.extensions.unknown[0].data);
}

TEST_CASE("cluster sizes 512 B to 2 MiB parse") {
    for (uint32_t bits = 9; bits <= 21; ++bits) {
        CAPTURE(bits);
        ImageMetadata m = v3_metadata();
        m.header.cluster_bits = bits;
        uint64_t cs = uint64_t{1} << bits;
        m.header.refcount_table_offset = cs;
        m.header.l1_table_offset = 2 * cs;
        m.header.l1_size = static_cast<uint32_t>(m.header.geometry().l1_entries_for(m.header.size));
        std::vector<std::byte> c0 = serialize_metadata(m);
        CHECK(c0.size() == cs);
        Header h = parse_metadata(c0, 2 * cs + uint64_t{m.header.l1_size} * 8).header;
        CHECK(h.cluster_size() == cs);
        CHECK(h.l1_size == m.header.l1_size);
    }
}

TEST_CASE("fixed header rejections") {
    std::vector<std::byte> good = image_of(v3_metadata());
    std::string what;
    auto patched32 = [&](size_t at, uint32_t v) {
        std::vector<std::byte> c = good;
        store_be32(c.data() + at, v);
        return c;
    };
    auto patched64 = [&](size_t at, uint64_t v) {
        std::vector<std::byte> c = good;
        store_be64(c.data() + at, v);
        return c;
    };
    CHECK(parse_errno(good) == 0);

    SUBCASE("truncated") {
        CHECK(thrown_errno([&] { parse_header(std::span(good).first(71), kFileSize); }) == EIO);
        CHECK(thrown_errno([&] { parse_header(std::span(good).first(100), kFileSize); }) == EIO);
        CHECK(thrown_errno([&] { parse_header(std::span(good).first(104), kFileSize); }) == 0);
    }
    SUBCASE("bad magic") {
        CHECK(parse_errno(patched32(0, 0x514649fa), &what) == EIO);
        CHECK(what.find("magic") != std::string::npos);
    }
    SUBCASE("version 1 is unsupported, 0 and 4 are invalid") {
        CHECK(parse_errno(patched32(4, 1)) == ENOTSUP);
        CHECK(parse_errno(patched32(4, 0)) == EIO);
        CHECK(parse_errno(patched32(4, 4), &what) == EIO);
        CHECK(what.find("version 4") != std::string::npos);
    }
    SUBCASE("cluster_bits") {
        CHECK(parse_errno(patched32(20, 8), &what) == EIO);
        CHECK(what.find("cluster_bits 8") != std::string::npos);
        CHECK(parse_errno(patched32(20, 22)) == EIO);
        CHECK(parse_errno(patched32(20, 64)) == EIO);
    }
    SUBCASE("refcount_order") {
        CHECK(parse_errno(patched32(96, 7), &what) == EIO);
        CHECK(what.find("refcount_order 7") != std::string::npos);
        CHECK(parse_errno(patched32(96, 6)) == 0);
        CHECK(parse_errno(patched32(96, 0)) == 0);
    }
    SUBCASE("header_length") {
        CHECK(parse_errno(patched32(100, 96)) == EIO);
        CHECK(parse_errno(patched32(100, 108)) == EIO);
        CHECK(parse_errno(patched32(100, 0x20000)) == EIO);
        CHECK(parse_errno(patched32(100, 112)) == 0);
    }
    SUBCASE("unknown incompatible features are ENOTSUP naming the bits") {
        CHECK(parse_errno(patched64(72, uint64_t{1} << 5 | uint64_t{1} << 40), &what) == ENOTSUP);
        CHECK(what.find("5,40") != std::string::npos);
        CHECK(parse_errno(patched64(80, ~uint64_t{0})) == 0);  // unknown compatible bits are fine
    }
    SUBCASE("compression type consistency") {
        std::vector<std::byte> c = patched32(100, 112);
        c[104] = std::byte{1};
        CHECK(parse_errno(c) == EIO);  // zstd without the feature bit
        store_be64(c.data() + 72, kIncompatCompressionType);
        CHECK(parse_errno(c) == 0);
        c[104] = std::byte{0};
        CHECK(parse_errno(c) == EIO);  // feature bit with zlib
        c[104] = std::byte{9};
        CHECK(parse_errno(c) == ENOTSUP);
        CHECK(parse_errno(patched64(72, kIncompatCompressionType)) == EIO);  // field absent
    }
    SUBCASE("crypt_method") {
        CHECK(parse_errno(patched32(32, 3)) == EIO);
        CHECK(parse_errno(patched32(32, 1)) == 0);  // AES: reported, not an error
        CHECK(parse_errno(patched32(32, 2)) == EIO);  // LUKS needs its header extension
    }
    SUBCASE("extended L2 needs 16 KiB clusters") {
        ImageMetadata m = v3_metadata();
        m.header.incompatible_features = kIncompatExtendedL2;
        m.header.cluster_bits = 13;
        m.header.l1_size = 64;
        CHECK(parse_errno(serialize_metadata(m)) == EIO);
    }
    SUBCASE("feature bit combinations") {
        CHECK(parse_errno(patched64(88, kAutoclearDataFileRaw)) == EIO);
        std::vector<std::byte> c = patched64(72, kIncompatDataFile);
        store_be32(c.data() + 60, 1);
        store_be64(c.data() + 64, 0x50000);
        CHECK(parse_errno(c) == EIO);  // internal snapshots with a data file
    }
}

TEST_CASE("table location rejections") {
    std::vector<std::byte> good = image_of(v3_metadata());
    std::string what;
    auto patched32 = [&](size_t at, uint32_t v) {
        std::vector<std::byte> c = good;
        store_be32(c.data() + at, v);
        return c;
    };
    auto patched64 = [&](size_t at, uint64_t v) {
        std::vector<std::byte> c = good;
        store_be64(c.data() + at, v);
        return c;
    };
    SUBCASE("L1 table") {
        CHECK(parse_errno(patched64(40, 0x30200), &what) == EIO);
        CHECK(what.find("0x30200") != std::string::npos);
        CHECK(parse_errno(patched64(40, kFileSize), &what) == EIO);
        CHECK(what.find("beyond the end") != std::string::npos);
        CHECK(parse_errno(patched64(40, ~uint64_t{0xffff})) == EIO);  // offset + length overflows
        CHECK(parse_errno(patched64(40, 0)) == EIO);
        CHECK(parse_errno(patched32(36, 1), &what) == EIO);
        CHECK(what.find("too small") != std::string::npos);
        CHECK(parse_errno(patched64(24, uint64_t{1} << 62)) == EIO);  // size needs a huge L1
        CHECK(parse_errno(patched32(36, 0x400001), &what) == EIO);
        CHECK(what.find("32 MiB") != std::string::npos);
        CHECK(parse_errno(patched32(36, 0x400000), &what, 0x30000 + 0x2000000) == 0);
    }
    SUBCASE("empty disk with no L1 table") {
        std::vector<std::byte> c = patched64(24, 0);
        store_be32(c.data() + 36, 0);
        CHECK(parse_errno(c) == 0);
    }
    SUBCASE("refcount table") {
        CHECK(parse_errno(patched64(48, 0x10100)) == EIO);
        CHECK(parse_errno(patched64(48, 0)) == EIO);
        CHECK(parse_errno(patched64(48, kFileSize)) == EIO);
        CHECK(parse_errno(patched32(56, 0)) == EIO);
        CHECK(parse_errno(patched32(56, 129)) == EIO);  // > 8 MiB
    }
    SUBCASE("snapshot table") {
        std::vector<std::byte> c = patched32(60, 1);
        CHECK(parse_errno(c) == EIO);  // at offset 0
        store_be64(c.data() + 64, 0x50000);
        CHECK(parse_errno(c) == 0);
        store_be64(c.data() + 64, 0x50001);
        CHECK(parse_errno(c) == EIO);
        store_be64(c.data() + 64, kFileSize);
        CHECK(parse_errno(c) == EIO);
        CHECK(parse_errno(patched32(60, kMaxSnapshots + 1)) == EIO);
    }
}

TEST_CASE("extension and backing name rejections") {
    ImageMetadata m = v3_metadata();
    m.backing_file = "base.qcow2";
    m.extensions.backing_format = "qcow2";
    std::vector<std::byte> good = serialize_metadata(m);
    const size_t ext = 104;  // the first extension (backing format)
    std::string what;

    SUBCASE("extension length past the cluster") {
        std::vector<std::byte> c = good;
        store_be64(c.data() + 8, 0);  // no backing file: the area ends at the cluster end
        store_be32(c.data() + ext + 4, 65536);
        CHECK(parse_errno(c, &what) == EIO);
        CHECK(what.find("length 65536") != std::string::npos);
        store_be32(c.data() + ext + 4, 0xffffffff);
        CHECK(parse_errno(c) == EIO);
    }
    SUBCASE("extension running into the backing file name") {
        std::vector<std::byte> c = good;
        store_be32(c.data() + ext + 4, 64);
        CHECK(parse_errno(c) == EIO);
    }
    SUBCASE("extensions past the bytes passed") {
        CHECK(thrown_errno([&] { parse_metadata(std::span(good).first(110), kFileSize); }) == EIO);
        CHECK(thrown_errno([&] { parse_metadata(std::span(good).first(200), kFileSize); }) == 0);
    }
    SUBCASE("backing name too long or outside cluster 0") {
        std::vector<std::byte> c = good;
        store_be32(c.data() + 16, 1024);
        CHECK(parse_errno(c, &what) == EIO);
        CHECK(what.find("1024") != std::string::npos);
        c = good;
        store_be64(c.data() + 8, 65536 - 4);
        CHECK(parse_errno(c) == EIO);
        store_be64(c.data() + 8, 64);  // inside the fixed header
        CHECK(parse_errno(c) == EIO);
        ImageMetadata long_name = m;
        long_name.backing_file = std::string(1024, 'a');
        CHECK(thrown_errno([&] { serialize_metadata(long_name); }) == EINVAL);
        long_name.backing_file = std::string(1023, 'a');
        CHECK(parse_metadata(serialize_metadata(long_name), kFileSize).backing_file.size() == 1023);
    }
    SUBCASE("NUL in the backing name") {
        std::vector<std::byte> c = good;
        c[load_be64(c.data() + 8) + 2] = std::byte{0};
        CHECK(parse_errno(c) == EIO);
    }
    SUBCASE("duplicate extension") {
        ImageMetadata d = m;
        d.extensions.unknown = {{kExtBackingFormat, {std::byte{'r'}, std::byte{'a'}, std::byte{'w'}}}};
        CHECK(parse_errno(serialize_metadata(d), &what) == EIO);
        CHECK(what.find("duplicate") != std::string::npos);
    }
    SUBCASE("bad fixed-size extensions") {
        ImageMetadata d = v3_metadata();
        d.extensions.unknown = {{kExtBitmaps, std::vector<std::byte>(16)}};
        CHECK(parse_errno(serialize_metadata(d)) == EIO);
        d.extensions.unknown = {{kExtFeatureNames, std::vector<std::byte>(50)}};
        CHECK(parse_errno(serialize_metadata(d)) == EIO);
        d.extensions.unknown = {{kExtCrypto, std::vector<std::byte>(16)}};
        CHECK(parse_errno(serialize_metadata(d)) == EIO);  // crypto header without LUKS
        d.extensions.unknown.clear();
        d.header.autoclear_features = kAutoclearBitmaps;
        d.extensions.bitmaps = BitmapsExtension{0, 0, 0x60000};
        CHECK(parse_errno(serialize_metadata(d)) == EIO);
        d.extensions.bitmaps = BitmapsExtension{1, 0, 0x60100};
        CHECK(parse_errno(serialize_metadata(d)) == EIO);
        d.header.autoclear_features = 0;  // inconsistent bitmaps are ignored, not rejected
        CHECK(parse_errno(serialize_metadata(d)) == 0);
    }
    SUBCASE("data file name without the data file bit; raw data file with a backing file") {
        ImageMetadata d = v3_metadata();
        d.extensions.data_file = "x.raw";
        CHECK(parse_errno(serialize_metadata(d)) == EIO);
        d.header.incompatible_features = kIncompatDataFile;
        CHECK(parse_errno(serialize_metadata(d)) == 0);
        d.header.autoclear_features = kAutoclearDataFileRaw;
        d.backing_file = "base";
        CHECK(parse_errno(serialize_metadata(d)) == EIO);
    }
}

TEST_CASE("serialize_metadata refuses what cannot be represented") {
    ImageMetadata m = v3_metadata();
    m.header.version = 2;
    m.header.refcount_order = 3;
    CHECK(thrown_errno([&] { serialize_metadata(m); }) == EINVAL);
    m.header.refcount_order = 4;
    m.header.incompatible_features = kIncompatExtendedL2;
    CHECK(thrown_errno([&] { serialize_metadata(m); }) == EINVAL);
    m = v3_metadata();
    m.header.header_length = 100;
    CHECK(thrown_errno([&] { serialize_metadata(m); }) == EINVAL);
    m = v3_metadata();
    m.header.cluster_bits = 9;
    m.extensions.unknown = {{0x1234, std::vector<std::byte>(512)}};
    CHECK(thrown_errno([&] { serialize_metadata(m); }) == EINVAL);
    m = v3_metadata();
    m.extensions.unknown = {{kExtEnd, {}}};
    CHECK(thrown_errno([&] { serialize_metadata(m); }) == EINVAL);
}

TEST_CASE("the fixed header rewrite keeps every byte it does not own") {
    // Cluster 0 as another writer left it: a pre-1.0 v2 image with its backing name at offset 72
    // (no extensions, no end marker), and a v3 image whose extension area fills cluster 0 and
    // whose backing name sits away from the extensions.
    SUBCASE("pre-1.0 v2: name at 72") {
        ImageMetadata m;
        m.header = v3_header();
        m.header.version = 2;
        m.header.refcount_order = 4;
        m.header.header_length = kV2HeaderLength;
        std::vector<std::byte> c0(m.header.cluster_size());
        const std::string name = "/images/base.qcow2";
        m.header.backing_file_offset = 72;
        m.header.backing_file_size = static_cast<uint32_t>(name.size());
        std::memcpy(c0.data() + 72, name.data(), name.size());
        auto fixed = serialize_fixed_header(m.header);
        REQUIRE(fixed.size() == 72);
        std::copy(fixed.begin(), fixed.end(), c0.begin());
        ImageMetadata back = parse_metadata(c0, kFileSize);
        CHECK(back.backing_file == name);
        CHECK(back.header.backing_file_offset == 72);
        // A change of a field the writer owns keeps the name where it is.
        back.header.size *= 2;
        back.header.l1_size *= 2;
        auto again = serialize_fixed_header(back.header);
        std::copy(again.begin(), again.end(), c0.begin());
        ImageMetadata third = parse_metadata(c0, kFileSize);
        CHECK(third.backing_file == name);
        CHECK(third.header.size == back.header.size);
    }
    SUBCASE("v3: extensions fill cluster 0, compression type and long header untouched") {
        Header h = v3_header();
        h.cluster_bits = 9;
        h.l1_table_offset = 0x600;
        h.refcount_table_offset = 0x200;
        h.size = 1 << 20;
        h.l1_size = 32;
        h.header_length = 112;
        h.incompatible_features = kIncompatCompressionType;
        h.compression_type = CompressionType::zstd;
        std::vector<std::byte> c0(512, std::byte{0});
        auto first = serialize_fixed_header(h);
        std::copy(first.begin(), first.end(), c0.begin());
        c0[104] = std::byte{1};                       // zstd
        c0[108] = std::byte{0x42};                    // a field past 104 this version does not know
        const uint32_t len = 512 - 112 - 8;
        store_be32(c0.data() + 112, 0x7e57da7a);
        store_be32(c0.data() + 116, len);
        std::memset(c0.data() + 120, 0x5a, len);
        ImageMetadata m = parse_metadata(c0, kFileSize);
        REQUIRE(m.extensions.unknown.size() == 1);
        // Re-serializing the whole cluster cannot add the end marker: that is why writers rewrite
        // the fixed part only.
        CHECK(thrown_errno([&] { serialize_metadata(m); }) == EINVAL);
        m.header.incompatible_features |= kIncompatDirty;
        auto fixed = serialize_fixed_header(m.header);
        REQUIRE(fixed.size() == kV3MinHeaderLength);
        std::vector<std::byte> after = c0;
        std::copy(fixed.begin(), fixed.end(), after.begin());
        CHECK(std::equal(after.begin() + 104, after.end(), c0.begin() + 104));
        ImageMetadata back = parse_metadata(after, kFileSize);
        CHECK(back.header.dirty());
        CHECK(back.header.compression_type == CompressionType::zstd);
        CHECK(back.extensions.unknown.size() == 1);
    }
}

TEST_CASE("check_refcount_table: present, within 8 MiB, aligned, not at 0, inside the file") {
    auto check = [](uint64_t offset, uint32_t clusters, uint64_t file_size = kFileSize) {
        std::string what;
        int e = thrown_errno([&] { check_refcount_table(offset, clusters, 16, file_size); }, &what);
        return e == 0 ? std::string("ok") : what;
    };
    CHECK(check(0x10000, 1) == "ok");
    CHECK(check(0x10000, 0).find("no refcount table") != std::string::npos);
    CHECK(check(0x10000, 129).find("8 MiB") != std::string::npos);
    CHECK(check(0, 1).find("invalid refcount table offset") != std::string::npos);
    CHECK(check(0x10200, 1).find("invalid refcount table offset") != std::string::npos);
    CHECK(check(0xf0000, 2).find("lies beyond the end of the file (1048576 bytes)") != std::string::npos);
}
