// A gate that counts running requests and lets shutdown wait for the last one, woken, not polling.
#pragma once

#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdint>

#include "qcowfs/util/task.hpp"

namespace qcowfs::fs {

/// Every coroutine the file system starts enters the gate and leaves it when it ends, on any
/// thread. wait_empty() parks its caller on a timer of the gate's strand; the leave() that empties
/// the gate while someone waits posts a wake-up to that strand (like Seastar's gate, whose close()
/// returns once the last request has left).
///
/// Ordering: leave() decrements and then reads `waiting_`; wait_empty() sets `waiting_` and then
/// reads the count (both sequentially consistent), so either the waiter sees the gate empty or
/// the last leave() sees the waiter. The wake-up runs on the strand after the waiter has parked
/// (parking is one step of the strand), or finds it gone and does nothing.
class Gate {
public:
    explicit Gate(Executor strand) : strand_(std::move(strand)) {}
    Gate(const Gate&) = delete;
    Gate& operator=(const Gate&) = delete;

    void enter() { ++count_; }
    void leave() {
        if (--count_ == 0 && waiting_) asio::post(strand_, [this] {
            if (timer_) timer_->cancel();
        });
    }
    /// How many are inside now.
    int64_t count() const { return count_; }

    /// On the gate's strand, one waiter at a time: returns true once nobody is inside (at once if
    /// nobody is), false if that has not happened within `limit`.
    Task<bool> wait_empty(std::chrono::steady_clock::duration limit) {
        asio::steady_timer timer(strand_, limit);
        timer_ = &timer;
        waiting_ = true;
        while (count_ > 0) {
            auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
            if (!ec) break;  // the limit passed; a cancel is a wake-up: look again
        }
        waiting_ = false;
        timer_ = nullptr;
        co_return count_ == 0;
    }

private:
    Executor strand_;
    std::atomic<int64_t> count_{0};
    std::atomic<bool> waiting_{false};
    asio::steady_timer* timer_ = nullptr;  // the waiter's, while one waits; strand only
};

}  // namespace qcowfs::fs
