// fs::Gate: shutdown's wait ends when the last request leaves (woken, not polling), or at its limit.
#include <doctest/doctest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <chrono>
#include <optional>
#include <thread>

#include "qcowfs/fs/gate.hpp"

using namespace qcowfs;
using namespace std::chrono_literals;

namespace {

/// Waits on `gate` from its strand; the result and when it came.
struct Waiter {
    std::optional<bool> result;
    std::chrono::steady_clock::time_point done;
    void start(const asio::strand<asio::io_context::executor_type>& strand, fs::Gate& gate,
               std::chrono::steady_clock::duration limit) {
        asio::co_spawn(
            strand,
            [this, &gate, limit]() -> Task<void> {
                result = co_await gate.wait_empty(limit);
                done = std::chrono::steady_clock::now();
            },
            asio::detached);
    }
};

}  // namespace

TEST_CASE("Gate: an empty gate is passed at once") {
    asio::io_context io;
    auto strand = asio::make_strand(io);
    fs::Gate gate(strand);
    Waiter w;
    w.start(strand, gate, 10s);
    io.run();
    CHECK(w.result == true);
}

TEST_CASE("Gate: the wait ends when the last request leaves, without polling") {
    asio::io_context io;
    auto strand = asio::make_strand(io);
    fs::Gate gate(strand);
    gate.enter();
    gate.enter();
    Waiter w;
    w.start(strand, gate, 10s);
    asio::steady_timer first(io, 20ms), last(io, 300ms);
    std::chrono::steady_clock::time_point left;
    first.async_wait([&](auto) { gate.leave(); });
    last.async_wait([&](auto) {
        left = std::chrono::steady_clock::now();
        gate.leave();
    });
    // A poll every few milliseconds would run a handler each time for 300 ms; woken by the last
    // leave, the whole test runs a handful.
    const size_t handlers = io.run();
    CHECK(w.result == true);
    CHECK(w.done >= left);
    CHECK(w.done - left < 200ms);
    CHECK(handlers < 20);
    CHECK(gate.count() == 0);
}

TEST_CASE("Gate: leaving from other threads wakes the waiter on its strand") {
    asio::io_context io;
    auto strand = asio::make_strand(io);
    fs::Gate gate(strand);
    constexpr int kRequests = 200;
    for (int i = 0; i < kRequests; ++i) gate.enter();
    Waiter w;
    w.start(strand, gate, 10s);
    auto work = asio::make_work_guard(io);
    std::thread runner([&] { io.run(); });
    std::vector<std::thread> leavers;
    for (int t = 0; t < 4; ++t)
        leavers.emplace_back([&] {
            for (int i = 0; i < kRequests / 4; ++i) {
                std::this_thread::sleep_for(100us);
                gate.leave();
            }
        });
    for (auto& t : leavers) t.join();
    work.reset();
    runner.join();
    CHECK(w.result == true);
    CHECK(gate.count() == 0);
}

TEST_CASE("Gate: a request that never leaves ends the wait at its limit") {
    asio::io_context io;
    auto strand = asio::make_strand(io);
    fs::Gate gate(strand);
    gate.enter();
    Waiter w;
    auto start = std::chrono::steady_clock::now();
    w.start(strand, gate, 50ms);
    io.run();
    CHECK(w.result == false);
    CHECK(w.done - start >= 50ms);
    CHECK(gate.count() == 1);
}
