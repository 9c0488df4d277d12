// Unit tests for the zlib and zstd cluster codecs: round-trips with sector padding, corrupt input.
#include <doctest/doctest.h>

#include <functional>
#include <random>
#include <vector>

#include "test_errors.hpp"
#include "qcowfs/codec/compression.hpp"
#include "qcowfs/format/error.hpp"

using namespace qcowfs;
using qcowfs::format::CompressionType;

using qcowfs::test::thrown_errno;

namespace {

/// Compressible but not trivial: runs of text with a varying counter.
std::vector<std::byte> cluster_data(size_t size) {
    std::vector<std::byte> v(size);
    for (size_t i = 0; i < size; ++i) v[i] = static_cast<std::byte>("qcow2 cluster "[i % 14] + (i / 4096) % 7);
    return v;
}

std::vector<std::byte> noise_bytes(size_t size, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::byte> v(size);
    for (auto& b : v) b = static_cast<std::byte>(rng());
    return v;
}

/// The compressed bytes of `data`, followed by `padding` garbage bytes as sector padding would add.
std::vector<std::byte> compressed(CompressionType type, const std::vector<std::byte>& data, size_t padding) {
    std::vector<std::byte> out(data.size());
    std::optional<size_t> n = codec::compress_cluster(type, data, out);
    REQUIRE(n.has_value());
    CHECK(*n < data.size());
    out.resize(*n);
    std::vector<std::byte> pad = noise_bytes(padding, padding);
    out.insert(out.end(), pad.begin(), pad.end());
    return out;
}

const CompressionType kTypes[] = {CompressionType::zlib, CompressionType::zstd};

}  // namespace

TEST_CASE("compress then decompress round-trips, ignoring trailing padding") {
    for (CompressionType type : kTypes) {
        for (size_t size : {size_t{512}, size_t{65536}, size_t{2} << 20}) {
            for (size_t padding : {size_t{0}, size_t{1}, size_t{511}, size_t{4096}}) {
                CAPTURE(static_cast<int>(type));
                CAPTURE(size);
                CAPTURE(padding);
                std::vector<std::byte> data = cluster_data(size);
                std::vector<std::byte> in = compressed(type, data, padding);
                std::vector<std::byte> out(size);
                codec::decompress_cluster(type, in, out);
                CHECK(out == data);
            }
        }
    }
}

TEST_CASE("all-zero clusters compress well; the codec is reusable across calls") {
    for (CompressionType type : kTypes) {
        std::vector<std::byte> zeros(65536);
        std::vector<std::byte> in = compressed(type, zeros, 300);
        CHECK(in.size() < 400 + 300);
        for (int i = 0; i < 3; ++i) {
            std::vector<std::byte> out(65536, std::byte{1});
            codec::decompress_cluster(type, in, out);
            CHECK(out == zeros);
        }
    }
}

TEST_CASE("incompressible data is left uncompressed") {
    for (CompressionType type : kTypes) {
        std::vector<std::byte> data = noise_bytes(65536, 7);
        std::vector<std::byte> out(data.size());
        CHECK_FALSE(codec::compress_cluster(type, data, out).has_value());
        CHECK_FALSE(codec::compress_cluster(type, {}, out).has_value());
    }
}

TEST_CASE("corrupt or short compressed data is EIO") {
    for (CompressionType type : kTypes) {
        CAPTURE(static_cast<int>(type));
        std::vector<std::byte> data = cluster_data(65536);
        std::vector<std::byte> good = compressed(type, data, 0);
        std::vector<std::byte> out(65536);

        SUBCASE("truncated input") {  // the last bytes may only end the stream: cut well before
            for (size_t keep : {size_t{0}, size_t{1}, good.size() / 2, good.size() - 16}) {
                CAPTURE(keep);
                std::span<const std::byte> in(good.data(), keep);
                CHECK(thrown_errno([&] { codec::decompress_cluster(type, in, out); }) == EIO);
            }
        }
        SUBCASE("garbage input") {
            std::vector<std::byte> junk = noise_bytes(4096, 99);
            CHECK(thrown_errno([&] { codec::decompress_cluster(type, junk, out); }) == EIO);
            std::vector<std::byte> ones(4096, std::byte{0xff});
            CHECK(thrown_errno([&] { codec::decompress_cluster(type, ones, out); }) == EIO);
        }
        SUBCASE("flipped bytes") {
            std::vector<std::byte> bad = good;
            for (size_t i = 0; i < bad.size(); i += 7) bad[i] ^= std::byte{0x5a};
            int e = thrown_errno([&] { codec::decompress_cluster(type, bad, out); });
            CHECK((e == EIO || (e == 0 && out != data)));
        }
        SUBCASE("data of a smaller cluster does not fill a larger one") {
            std::vector<std::byte> small = compressed(type, cluster_data(4096), 512);
            CHECK(thrown_errno([&] { codec::decompress_cluster(type, small, out); }) == EIO);
        }
        SUBCASE("data of a larger cluster fills a smaller one") {
            std::vector<std::byte> part(4096);
            codec::decompress_cluster(type, good, part);
            CHECK(std::equal(part.begin(), part.end(), data.begin()));
        }
    }
}

TEST_CASE("unknown compression type is ENOTSUP") {
    std::vector<std::byte> in(16), out(512);
    auto bogus = static_cast<CompressionType>(7);
    CHECK(thrown_errno([&] { codec::decompress_cluster(bogus, in, out); }) == ENOTSUP);
    CHECK(thrown_errno([&] { codec::compress_cluster(bogus, out, in); }) == ENOTSUP);
}
