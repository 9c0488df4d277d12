// OrderedPool: results come back in submission order, errors surface, in-flight work is bounded.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "stream/ordered_pool.hpp"

using namespace qcowfs::stream;

namespace {
std::atomic<int> g_running{0}, g_max_running{0};

struct SleepBatch : Batch {
    int id;
    int ms;
    bool throw_it = false;
    SleepBatch(int i, int m) : id(i), ms(m) {}
    void run() override {
        int now = ++g_running;
        int prev = g_max_running.load();
        while (now > prev && !g_max_running.compare_exchange_weak(prev, now)) {
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        --g_running;
        if (throw_it) throw std::runtime_error("batch " + std::to_string(id) + " failed");
    }
};
}  // namespace

TEST_CASE("ordered pool hands batches back in submission order") {
    OrderedPool pool(4, 3);
    std::vector<int> order;
    auto done = [&](Batch& b) { order.push_back(static_cast<SleepBatch&>(b).id); };
    for (int i = 0; i < 12; ++i) {
        // early batches are the slow ones: they finish last but must come out first
        pool.submit(std::make_unique<SleepBatch>(i, i % 3 == 0 ? 30 : 1), done);
        CHECK(pool.outstanding() <= 3);
        pool.poll(done);
    }
    pool.drain(done);
    REQUIRE(order.size() == 12);
    for (int i = 0; i < 12; ++i) CHECK(order[i] == i);
}

TEST_CASE("ordered pool runs batches in parallel and rethrows a batch's error in order") {
    g_max_running = 0;
    OrderedPool pool(3, 6);
    std::vector<int> order;
    auto done = [&](Batch& b) { order.push_back(static_cast<SleepBatch&>(b).id); };
    for (int i = 0; i < 6; ++i) {
        auto b = std::make_unique<SleepBatch>(i, 40);
        b->throw_it = i == 4;
        pool.submit(std::move(b), done);
    }
    CHECK_THROWS_WITH(pool.drain(done), "batch 4 failed");
    CHECK(order == std::vector<int>{0, 1, 2, 3});
    CHECK(g_max_running.load() >= 2);
}
