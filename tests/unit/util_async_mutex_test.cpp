// AsyncMutex: one holder at a time across suspension points; every waiter eventually runs.
#include <doctest/doctest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <string>
#include <vector>

#include "qcowfs/util/async_mutex.hpp"

using namespace qcowfs;

TEST_CASE("AsyncMutex keeps critical sections that wait from interleaving") {
    asio::io_context io;
    AsyncMutex mutex;
    int inside = 0, max_inside = 0, done = 0;
    for (int i = 0; i < 20; ++i) {
        asio::co_spawn(io, [&, i]() -> Task<void> {
            auto guard = co_await mutex.lock();
            max_inside = std::max(max_inside, ++inside);
            asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::microseconds(50 * (i % 3)));
            co_await t.async_wait(asio::use_awaitable);  // suspends while holding the mutex
            --inside;
            ++done;
        }, asio::detached);
    }
    io.run();
    CHECK(max_inside == 1);
    CHECK(done == 20);
    CHECK_FALSE(mutex.locked());
}

TEST_CASE("AsyncMutex wakes the waiters in arrival order, one per unlock") {
    asio::io_context io;
    AsyncMutex mutex;
    constexpr int kWaiters = 50;
    std::vector<int> order;
    asio::co_spawn(io, [&]() -> Task<void> {
        auto guard = co_await mutex.lock();
        // Everyone else queues behind this holder while it waits.
        for (int i = 0; i < kWaiters; ++i) {
            asio::co_spawn(io, [&, i]() -> Task<void> {
                auto g = co_await mutex.lock();
                order.push_back(i);
            }, asio::detached);
        }
        asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(1));
        co_await t.async_wait(asio::use_awaitable);
    }, asio::detached);
    const size_t handlers = io.run();
    REQUIRE(order.size() == kWaiters);
    for (int i = 0; i < kWaiters; ++i) CHECK(order[i] == i);
    // Starting the coroutines and the timer take a few handlers each; a wake-up of every waiter
    // at every unlock would take kWaiters * (kWaiters + 1) / 2 more.
    CHECK(handlers < 4 * kWaiters);
    CHECK_FALSE(mutex.locked());
}

TEST_CASE("AsyncMutex is free after an unlock: a coroutine asking before the woken waiter runs takes it") {
    // A mutex handed to a waiter still being woken (on another worker, in the daemon) would stay
    // held for the whole wake-up, and every coroutine asking meanwhile would queue: a convoy.
    asio::io_context io;
    AsyncMutex mutex;
    std::vector<std::string> order;
    asio::co_spawn(io, [&]() -> Task<void> {
        {
            auto guard = co_await mutex.lock();
            asio::co_spawn(io, [&]() -> Task<void> {
                auto g = co_await mutex.lock();
                order.push_back("waiter");
            }, asio::detached);
            asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(1));
            co_await t.async_wait(asio::use_awaitable);  // the waiter queues meanwhile
        }
        CHECK_FALSE(mutex.locked());
        auto again = co_await mutex.lock();  // before the woken waiter has run
        order.push_back("holder again");
        asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(1));
        co_await t.async_wait(asio::use_awaitable);  // the waiter, woken, finds it taken
    }, asio::detached);
    io.run();
    REQUIRE(order.size() == 2);
    CHECK(order[0] == "holder again");
    CHECK(order[1] == "waiter");
    CHECK_FALSE(mutex.locked());
}
