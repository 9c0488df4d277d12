// decode and encode over real pipes: tables before and after their data, small memory, bad streams.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qcowfs/codec/compression.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/header.hpp"
#include "stream/decoder.hpp"
#include "stream/encoder.hpp"
#include "stream/sysio.hpp"
#include "test_errors.hpp"

using namespace qcowfs;
using namespace qcowfs::stream;

namespace {

constexpr uint32_t kBits = 12;  // 4 KiB clusters: one L2 table maps 2 MiB
constexpr uint64_t kCs = uint64_t{1} << kBits;
constexpr uint64_t kSize = 5 * (uint64_t{1} << 20);

struct Write {
    std::vector<std::byte> data;  // one cluster
    bool compressed = false;
};

struct Built {
    std::vector<std::byte> image;
    std::vector<std::byte> raw;  // what decode must produce
    std::map<uint64_t, uint64_t> host;  // guest cluster -> host offset (normal clusters)
    uint64_t l1 = 0;
};

/// A v3 image: header, an empty refcount table (decode does not read refcounts), then the parts
/// named in `order` ("data", "l2", "l1") one after another.
Built build(const std::map<uint64_t, Write>& writes, const std::vector<std::string>& order) {
    ClusterGeometry g{kBits, false};
    Built b;
    b.raw.assign(kSize, std::byte{0});
    uint64_t next = 2 * kCs;
    auto alloc = [&](uint64_t n) {
        uint64_t r = next;
        next += n * kCs;
        return r;
    };
    std::map<uint64_t, uint64_t> l2_at;
    std::map<uint64_t, std::pair<uint64_t, std::vector<std::byte>>> comp;  // guest -> (offset, bytes)
    uint64_t l1_entries = g.l1_entries_for(kSize);
    for (const auto& part : order) {
        if (part == "data") {
            for (auto& [c, w] : writes)
                if (!w.compressed) b.host[c] = alloc(1);
            uint64_t at = next;
            for (auto& [c, w] : writes) {
                if (!w.compressed) continue;
                std::vector<std::byte> out(kCs);
                auto n = codec::compress_cluster(format::CompressionType::zlib, w.data, out);
                REQUIRE(n);
                out.resize(*n);
                comp[c] = {at, out};
                at += *n;
            }
            next = (at + kCs - 1) / kCs * kCs;
        } else if (part == "l2") {
            for (auto& [c, w] : writes)
                if (!l2_at.count(c / g.l2_entries())) l2_at[c / g.l2_entries()] = alloc(1);
        } else {
            b.l1 = alloc((l1_entries * 8 + kCs - 1) / kCs);
        }
    }
    b.image.assign(next, std::byte{0});
    format::ImageMetadata m;
    m.header.cluster_bits = kBits;
    m.header.size = kSize;
    m.header.l1_size = static_cast<uint32_t>(l1_entries);
    m.header.l1_table_offset = b.l1;
    m.header.refcount_table_offset = kCs;
    m.header.refcount_table_clusters = 1;
    auto c0 = format::serialize_metadata(m);
    std::memcpy(b.image.data(), c0.data(), std::min<size_t>(c0.size(), kCs));
    for (auto [i, off] : l2_at) format::store_be64(b.image.data() + b.l1 + i * 8, format::encode_l1({off, true}));
    for (auto& [c, w] : writes) {
        uint64_t entry_at = l2_at[c / g.l2_entries()] + (c % g.l2_entries()) * 8;
        if (w.compressed) {
            auto& [off, bytes] = comp[c];
            std::memcpy(b.image.data() + off, bytes.data(), bytes.size());
            format::store_be64(b.image.data() + entry_at, format::encode_l2_compressed(off, bytes.size(), kBits));
        } else {
            std::memcpy(b.image.data() + b.host[c], w.data.data(), kCs);
            format::store_be64(b.image.data() + entry_at, format::encode_l2_standard(b.host[c], true, false));
        }
        std::memcpy(b.raw.data() + c * kCs, w.data.data(), kCs);
    }
    return b;
}

std::map<uint64_t, Write> sample_writes() {
    std::mt19937 rnd(3);
    std::map<uint64_t, Write> w;
    for (uint64_t c : {0, 1, 7, 100, 511, 512, 513, 900, 1279}) {
        Write x;
        x.data.resize(kCs);
        for (auto& byte : x.data) byte = std::byte(static_cast<unsigned char>(rnd()));
        w[c] = x;
    }
    for (uint64_t c : {2, 3, 600, 1000}) {
        Write x;
        x.data.assign(kCs, std::byte{0});
        std::string text = "compressed cluster " + std::to_string(c) + " ";
        for (size_t i = 0; i < kCs / 2; ++i) x.data[i] = std::byte(static_cast<unsigned char>(text[i % text.size()]));
        x.compressed = true;
        w[c] = x;
    }
    return w;
}

/// Feeds `image` through a pipe into decode() and returns what it wrote to a temporary file.
std::vector<std::byte> run_decode(const std::vector<std::byte>& image, bool positioned, uint64_t memory,
                                  DecodeStats* stats = nullptr) {
    ::signal(SIGPIPE, SIG_IGN);
    int p[2];
    REQUIRE(::pipe(p) == 0);
    std::thread writer([&] {
        try {
            write_all(p[1], image, "the test pipe");
        } catch (...) {
        }
        ::close(p[1]);
    });
    int out = open_temp_file(default_temp_dir(), "test");
    DecodeOptions o;
    o.memory = memory;
    o.threads = 2;
    struct Cleanup {
        int r, out;
        std::thread& w;
        ~Cleanup() {
            ::close(r);  // unblocks the writer if decode stopped early
            w.join();
            ::close(out);
        }
    } cleanup{p[0], out, writer};
    DecodeStats s = decode(p[0], out, positioned, o);
    if (stats) *stats = s;
    std::vector<std::byte> got(fd_size(out));
    if (!got.empty()) pread_all(out, got, 0, "the test output");
    return got;
}

std::string decode_error(const std::vector<std::byte>& image) {
    return test::thrown_message([&] { run_decode(image, true, 1 << 20); });
}

}  // namespace

TEST_CASE("decode: tables before or after their data, any memory bound, positioned or sequential") {
    auto writes = sample_writes();
    std::vector<std::vector<std::string>> orders = {
        {"l1", "l2", "data"}, {"data", "l2", "l1"}, {"l1", "data", "l2"}, {"l2", "data", "l1"}, {"data", "l1", "l2"}};
    for (const auto& order : orders) {
        Built b = build(writes, order);
        for (uint64_t memory : {uint64_t{0}, uint64_t{3} * kCs, uint64_t{256} << 20}) {
            for (bool positioned : {true, false}) {
                CAPTURE(order[0] + "," + order[1] + "," + order[2]);
                CAPTURE(memory);
                CAPTURE(positioned);
                DecodeStats st;
                auto got = run_decode(b.image, positioned, memory, &st);
                CHECK(got.size() == b.raw.size());
                CHECK(got == b.raw);
                CHECK(st.peak_memory <= memory);
                CHECK(st.compressed_clusters == 4);
                if (order[0] == "data" && memory == 0) CHECK(st.peak_spill > 0);
                // Tables first: nothing is retained for want of a table. (Sequential output still
                // holds clusters that arrive before lower guest offsets: the compressed ones are last.)
                if (order[0] == "l1" && order[1] == "l2" && positioned) CHECK(st.peak_spill == 0);
            }
        }
    }
}

TEST_CASE("decode: a table whose data has all passed, unallocated after its last data cluster") {
    // Parsing the table resolves its data clusters from the retained store one by one; the last
    // one lets sequential output run to the table's end (the rest is unallocated) while the parse
    // is still walking the table's later entries: the table must stay until the walk is done.
    std::mt19937 rnd(5);
    std::map<uint64_t, Write> writes;
    for (uint64_t c : {0, 1, 600, 700}) {
        Write x;
        x.data.resize(kCs);
        for (auto& byte : x.data) byte = std::byte(static_cast<unsigned char>(rnd()));
        writes[c] = x;
    }
    for (const auto& order : std::vector<std::vector<std::string>>{{"l1", "data", "l2"}, {"data", "l2", "l1"}}) {
        Built b = build(writes, order);
        for (bool positioned : {false, true}) {
            CAPTURE(order[0] + "," + order[1] + "," + order[2]);
            CAPTURE(positioned);
            CHECK(run_decode(b.image, positioned, 256 << 20) == b.raw);
        }
    }
}

namespace {

/// Host clusters: 0 header, 1 refcount table, 2 L1, 3 the L2 table for guest clusters 0-511,
/// 4-5 compressed data, 6 the L2 table for guest clusters 512-1023 (after the data it maps). The
/// data: A (guest 2, named by the first table), X (guest 600, named by the later one) in A's last
/// sector, then B (guest 3, first table) reaching into cluster 5.
struct MeetingImage {
    std::vector<std::byte> image, raw;
    uint64_t l2_late = 6 * kCs;
};

MeetingImage meeting_image() {
    auto cluster = [](uint32_t seed, size_t random_bytes) {
        std::mt19937 rnd(seed);
        std::vector<std::byte> d(kCs, std::byte{0});
        for (size_t i = 0; i < random_bytes; ++i) d[i] = std::byte(static_cast<unsigned char>(rnd()));
        return d;
    };
    auto compress = [](const std::vector<std::byte>& d) {
        std::vector<std::byte> out(kCs);
        auto n = codec::compress_cluster(format::CompressionType::zlib, d, out);
        REQUIRE(n);
        out.resize(*n);
        return out;
    };
    std::vector<std::byte> x_data(kCs, std::byte{'x'}), b_data = cluster(2, 3600), a_data;
    auto x = compress(x_data), b = compress(b_data);
    std::vector<std::byte> a;
    // A's size decides where X lands: take the first A after which X ends inside A's last sector.
    for (size_t k = 1000;; ++k) {
        a_data = cluster(1, k);
        a = compress(a_data);
        if (a.size() % 512 && a.size() % 512 + x.size() < 512) break;
    }
    const uint64_t data = 4 * kCs, xs = data + a.size(), bs = xs + x.size();
    REQUIRE(bs + b.size() > 5 * kCs + 512);  // B covers cluster 4 to its end
    MeetingImage m;
    m.image.assign(7 * kCs, std::byte{0});
    m.raw.assign(kSize, std::byte{0});
    format::ImageMetadata meta;
    meta.header.cluster_bits = kBits;
    meta.header.size = kSize;
    meta.header.l1_size = static_cast<uint32_t>(ClusterGeometry{kBits, false}.l1_entries_for(kSize));
    meta.header.l1_table_offset = 2 * kCs;
    meta.header.refcount_table_offset = kCs;
    meta.header.refcount_table_clusters = 1;
    auto c0 = format::serialize_metadata(meta);
    std::memcpy(m.image.data(), c0.data(), std::min<size_t>(c0.size(), kCs));
    format::store_be64(m.image.data() + 2 * kCs, format::encode_l1({3 * kCs, true}));
    format::store_be64(m.image.data() + 2 * kCs + 8, format::encode_l1({m.l2_late, true}));
    auto place = [&](uint64_t l2, uint64_t guest, uint64_t at, const std::vector<std::byte>& bytes,
                     const std::vector<std::byte>& plain) {
        std::memcpy(m.image.data() + at, bytes.data(), bytes.size());
        format::store_be64(m.image.data() + l2 + guest % 512 * 8, format::encode_l2_compressed(at, bytes.size(), kBits));
        std::memcpy(m.raw.data() + guest * kCs, plain.data(), kCs);
    };
    place(3 * kCs, 2, data, a, a_data);
    place(m.l2_late, 600, xs, x, x_data);
    place(3 * kCs, 3, bs, b, b_data);
    return m;
}

}  // namespace

TEST_CASE("decode: a compressed cluster named late may sit where two named ones meet") {
    MeetingImage m = meeting_image();
    for (bool positioned : {true, false}) {
        CAPTURE(positioned);
        DecodeStats st;
        CHECK(run_decode(m.image, positioned, 256 << 20, &st) == m.raw);
        // Cluster 4 is all named compressed data but for one sector: only cluster 5 is retained.
        if (positioned) CHECK(st.peak_memory == kCs);
    }
    SUBCASE("a later table naming such a cluster as data: mapped twice") {
        format::store_be64(m.image.data() + m.l2_late + 7 * 8, format::encode_l2_standard(4 * kCs, true, false));
        CHECK(decode_error(m.image).find("mapped twice") != std::string::npos);
    }
}

TEST_CASE("decode: bad streams name the offset and fail with EIO") {
    auto writes = sample_writes();
    Built b = build(writes, {"l1", "l2", "data"});
    ClusterGeometry g{kBits, false};
    uint64_t l2_0 = format::load_be64(b.image.data() + b.l1) & format::kL1OffsetMask;

    SUBCASE("a cluster mapped twice") {
        auto img = b.image;
        format::store_be64(img.data() + l2_0 + 100 * 8, format::encode_l2_standard(b.host[1], true, false));
        CHECK(decode_error(img).find("mapped twice") != std::string::npos);
    }
    SUBCASE("a data cluster past the end of the stream") {
        auto img = b.image;
        format::store_be64(img.data() + l2_0 + 7 * 8, format::encode_l2_standard(uint64_t{1} << 40, true, false));
        auto msg = decode_error(img);
        CHECK(msg.find("lies past the end of the stream") != std::string::npos);
        CHECK(msg.find("0x10000000000") != std::string::npos);
    }
    SUBCASE("a truncated stream") {
        auto img = b.image;
        img.resize(img.size() - kCs - 100);
        auto msg = decode_error(img);
        CAPTURE(msg);
        CHECK(msg.find("the stream ends at offset 0x") != std::string::npos);
    }
    SUBCASE("an L2 table in the header") {
        auto img = b.image;
        format::store_be64(img.data() + b.l1, format::encode_l1({0x200 * 0 + kCs * 0 + 0, true}) | 0);
        format::store_be64(img.data() + b.l1 + 8, format::encode_l1({b.l1, true}));
        CHECK(decode_error(img).find("overlaps the L1 table") != std::string::npos);
    }
    SUBCASE("a compressed cluster that does not decompress") {
        auto img = b.image;
        uint64_t e = format::load_be64(img.data() + l2_0 + 2 * 8);
        auto d = format::decode_l2(e, 0, g, 3);
        std::memset(img.data() + d.host_offset, 0xff, 32);
        CHECK(decode_error(img).find("does not decompress to a cluster") != std::string::npos);
    }
    SUBCASE("not a qcow2 image") {
        std::vector<std::byte> img(10000, std::byte{0x42});
        CHECK(test::thrown_errno([&] { run_decode(img, true, 0); }) == EIO);
        CHECK(decode_error(img).find("not a qcow2 image") != std::string::npos);
    }
}

TEST_CASE("encode into a pipe, decode from it: the raw disk comes back; with -c fewer bytes") {
    ::signal(SIGPIPE, SIG_IGN);
    std::mt19937 rnd(9);
    int raw = open_temp_file(default_temp_dir(), "raw");
    std::vector<std::byte> disk(3 * (1 << 20) + 1536, std::byte{0});
    for (int run = 0; run < 20; ++run) {
        size_t at = rnd() % disk.size(), n = std::min<size_t>(rnd() % 70000, disk.size() - at);
        bool text = run % 2;
        for (size_t i = 0; i < n; ++i) disk[at + i] = std::byte(static_cast<unsigned char>(text ? "qcow2 "[i % 6] : rnd()));
    }
    pwrite_all(raw, disk, 0, "raw");
    for (auto comp : {std::optional<format::CompressionType>{}, std::optional{format::CompressionType::zstd},
                      std::optional{format::CompressionType::zlib}}) {
        for (uint32_t bits : {9u, 16u}) {
            CAPTURE(bits);
            CAPTURE(comp.has_value());
            int p[2];
            REQUIRE(::pipe(p) == 0);
            EncodeOptions eo;
            eo.compression = comp;
            eo.cluster_bits = bits;
            EncodeStats es;
            std::thread enc([&] {
                try {
                    es = encode(raw, p[1], eo);
                } catch (...) {
                }
                ::close(p[1]);
            });
            int out = open_temp_file(default_temp_dir(), "out");
            DecodeOptions dopt;
            dopt.memory = 0;  // metadata first: nothing needs retaining
            DecodeStats ds = decode(p[0], out, true, dopt);
            enc.join();
            ::close(p[0]);
            std::vector<std::byte> got(fd_size(out));
            pread_all(out, got, 0, "out");
            ::close(out);
            auto want = disk;
            want.resize((disk.size() + 511) / 512 * 512, std::byte{0});
            CHECK(got == want);
            CHECK(ds.peak_spill == 0);
            CHECK(ds.stream_bytes == es.image_bytes);
            if (comp) CHECK(es.compressed_clusters > 0);
            if (comp) CHECK(es.image_bytes < disk.size());
        }
    }
    ::close(raw);
}

TEST_CASE("ClusterCompressor: the same bytes as compress_cluster, cluster after cluster") {
    for (auto type : {format::CompressionType::zlib, format::CompressionType::zstd}) {
        codec::ClusterCompressor c(type);
        for (int k = 0; k < 5; ++k) {
            std::vector<std::byte> in(65536);
            for (size_t i = 0; i < in.size(); ++i) in[i] = std::byte(static_cast<unsigned char>((i / (k + 3)) % 17));
            std::vector<std::byte> a(in.size()), b(in.size()), back(in.size());
            auto na = codec::compress_cluster(type, in, a);
            auto nb = c.compress(in, b);
            REQUIRE(na);
            REQUIRE(nb);
            CHECK(*na == *nb);
            CHECK(std::memcmp(a.data(), b.data(), *na) == 0);
            codec::decompress_cluster(type, std::span(b).first(*nb), back);
            CHECK(back == in);
        }
        std::vector<std::byte> noise(4096), out(4096);
        std::mt19937 rnd(1);
        for (auto& x : noise) x = std::byte(static_cast<unsigned char>(rnd()));
        CHECK_FALSE(c.compress(noise, out).has_value());
    }
}
