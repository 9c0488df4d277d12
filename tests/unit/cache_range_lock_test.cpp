// RangeLock: conflicting requests are ordered first-come first-served, others run concurrently.
#include <doctest/doctest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "qcowfs/cache/range_lock.hpp"

using namespace qcowfs;
using cache::RangeLock;
using Mode = RangeLock::Mode;

namespace {

/// Starts a coroutine that takes a lock, records the grant, and holds it until `release` is set.
struct Holder {
    bool granted = false;
    std::shared_ptr<AsyncEvent> release;
};

std::shared_ptr<Holder> take(asio::io_context& io, RangeLock& lock, uint64_t off, uint64_t len, Mode mode,
                             std::vector<std::string>* order = nullptr, std::string name = {}) {
    auto h = std::make_shared<Holder>();
    h->release = std::make_shared<AsyncEvent>(io.get_executor());
    asio::co_spawn(io, [&lock, h, off, len, mode, order, name]() -> Task<void> {
        auto guard = co_await lock.lock(off, len, mode);
        h->granted = true;
        if (order) order->push_back(name);
        co_await h->release->wait();
    }, asio::detached);
    return h;
}

void settle(asio::io_context& io) {
    io.restart();
    io.poll();
}

}  // namespace

TEST_CASE("disjoint ranges and overlapping shared locks are held at once") {
    asio::io_context io;
    RangeLock lock(io.get_executor());
    auto a = take(io, lock, 0, 4096, Mode::exclusive);
    auto b = take(io, lock, 4096, 4096, Mode::exclusive);  // adjacent, not overlapping
    auto c = take(io, lock, 10000, 100, Mode::shared);
    auto d = take(io, lock, 10050, 100, Mode::shared);
    settle(io);
    CHECK(a->granted);
    CHECK(b->granted);
    CHECK(c->granted);
    CHECK(d->granted);
    CHECK(lock.held() == 4);
    for (auto& h : {a, b, c, d}) h->release->set();
    settle(io);
    CHECK(lock.held() == 0);
}

TEST_CASE("an overlapping exclusive lock waits for the holder") {
    asio::io_context io;
    RangeLock lock(io.get_executor());
    auto a = take(io, lock, 0, 65536, Mode::exclusive);
    auto b = take(io, lock, 65535, 10, Mode::shared);
    settle(io);
    CHECK(a->granted);
    CHECK_FALSE(b->granted);
    CHECK(lock.waiting() == 1);
    a->release->set();
    settle(io);
    CHECK(b->granted);
    b->release->set();
    settle(io);
}

TEST_CASE("first come first served: a waiting writer is not overtaken by later readers") {
    asio::io_context io;
    RangeLock lock(io.get_executor());
    std::vector<std::string> order;
    auto r1 = take(io, lock, 0, 100, Mode::shared, &order, "r1");
    auto w = take(io, lock, 50, 100, Mode::exclusive, &order, "w");
    auto r2 = take(io, lock, 0, 60, Mode::shared, &order, "r2");     // overlaps w: waits behind it
    auto r3 = take(io, lock, 500, 10, Mode::exclusive, &order, "r3");  // conflicts with nobody
    settle(io);
    CHECK(order == std::vector<std::string>{"r1", "r3"});
    r1->release->set();
    settle(io);
    CHECK(order == std::vector<std::string>{"r1", "r3", "w"});
    CHECK_FALSE(r2->granted);
    w->release->set();
    settle(io);
    CHECK(order == std::vector<std::string>{"r1", "r3", "w", "r2"});
    r2->release->set();
    r3->release->set();
    settle(io);
    CHECK(lock.held() == 0);
    CHECK(lock.waiting() == 0);
}

TEST_CASE("a zero-length lock covers one byte; a lock to the end of the address space works") {
    asio::io_context io;
    RangeLock lock(io.get_executor());
    auto a = take(io, lock, 100, 0, Mode::exclusive);
    auto b = take(io, lock, 100, 0, Mode::exclusive);
    auto c = take(io, lock, UINT64_MAX - 10, UINT64_MAX, Mode::exclusive);
    settle(io);
    CHECK(a->granted);
    CHECK_FALSE(b->granted);
    CHECK(c->granted);
    a->release->set();
    c->release->set();
    settle(io);
    CHECK(b->granted);
    b->release->set();
    settle(io);
}

TEST_CASE("stress: conflicting locks are never held together and every request finishes") {
    asio::io_context io;
    RangeLock lock(io.get_executor());
    struct Live {
        uint64_t begin, end;
        Mode mode;
    };
    std::vector<Live> live;
    int violations = 0, finished = 0;
    std::mt19937 rng(12345);
    constexpr int kRequests = 400;
    for (int i = 0; i < kRequests; ++i) {
        uint64_t off = rng() % 20000, len = 1 + rng() % 3000;
        Mode mode = rng() % 3 == 0 ? Mode::exclusive : Mode::shared;
        int hold_us = static_cast<int>(rng() % 300);
        asio::co_spawn(io, [&, off, len, mode, hold_us]() -> Task<void> {
            auto guard = co_await lock.lock(off, len, mode);
            for (const auto& l : live)
                if (l.begin < off + len && off < l.end && (l.mode == Mode::exclusive || mode == Mode::exclusive))
                    ++violations;
            live.push_back({off, off + len, mode});
            asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::microseconds(hold_us));
            co_await t.async_wait(asio::use_awaitable);
            for (auto it = live.begin(); it != live.end(); ++it)
                if (it->begin == off && it->end == off + len && it->mode == mode) {
                    live.erase(it);
                    break;
                }
            ++finished;
        }, asio::detached);
    }
    io.run();
    CHECK(violations == 0);
    CHECK(finished == kRequests);
    CHECK(lock.held() == 0);
    CHECK(lock.waiting() == 0);
}
