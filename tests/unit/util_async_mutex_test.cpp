// AsyncMutex: one holder at a time across suspension points; every waiter eventually runs.
#include <doctest/doctest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>

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
