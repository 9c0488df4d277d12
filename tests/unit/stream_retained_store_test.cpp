// RetainedStore: the memory budget, the spill file, slot reuse and exact contents.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "stream/retained_store.hpp"
#include "stream/sysio.hpp"

using namespace qcowfs::stream;

namespace {
std::vector<std::byte> blob(size_t n, int seed) {
    std::vector<std::byte> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = std::byte(static_cast<unsigned char>(i * 7 + seed));
    return b;
}
}  // namespace

TEST_CASE("retained store keeps the first blobs in memory and spills the rest") {
    RetainedStore s(4096, 2 * 4096, default_temp_dir());
    for (int k = 0; k < 5; ++k) s.put(k * 4096, blob(4096, k));
    CHECK(s.count() == 5);
    CHECK(s.memory_bytes() == 2 * 4096);
    CHECK(s.spilled_bytes() == 3 * 4096);
    for (int k = 0; k < 5; ++k) {
        std::vector<std::byte> part(100);
        s.read(k * 4096, 1000, part);
        auto want = blob(4096, k);
        CHECK(std::memcmp(part.data(), want.data() + 1000, 100) == 0);
    }
    std::vector<std::byte> out(4096);
    s.take(4 * 4096, out);
    CHECK(out == blob(4096, 4));
    CHECK_FALSE(s.contains(4 * 4096));
    CHECK(s.spilled_bytes() == 2 * 4096);
}

TEST_CASE("retained store reuses spill slots: the spill file holds at most the live blobs") {
    RetainedStore s(512, 0, default_temp_dir());
    std::vector<std::byte> out(512);
    for (int round = 0; round < 50; ++round) {
        for (int k = 0; k < 3; ++k) s.put(round * 10 + k, blob(512, round + k));
        for (int k = 0; k < 3; ++k) {
            s.take(round * 10 + k, out);
            CHECK(out == blob(512, round + k));
        }
    }
    CHECK(s.spill_file_bytes() == 3 * 512);
    CHECK(s.peak_memory_bytes() == 0);
}

TEST_CASE("retained store erase_if frees memory and slots") {
    RetainedStore s(1024, 1024, default_temp_dir());
    s.put(1, blob(1024, 1));
    s.put(2, blob(1024, 2));
    s.put(uint64_t{1} << 63 | 3, blob(1024, 3));
    s.erase_if([](uint64_t k) { return !(k >> 63); });
    CHECK(s.count() == 1);
    CHECK(s.memory_bytes() == 0);
    CHECK(s.spilled_bytes() == 1024);
    CHECK(s.peak_memory_bytes() == 1024);
}
