// A one-shot event that coroutines on one strand can await: the engine's only wait primitive.
#pragma once

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "qcowfs/util/task.hpp"

namespace qcowfs {

/// Waiters park on a timer that never expires; set() cancels it, which resumes every waiter.
/// Not thread-safe: create, wait and set from the same strand (each image runs on its own).
class AsyncEvent {
public:
    explicit AsyncEvent(const Executor& ex) : timer_(ex, asio::steady_timer::time_point::max()) {}

    /// Returns once set() has been called (at once if it already was).
    Task<void> wait() {
        while (!set_) co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    void set() {
        set_ = true;
        timer_.cancel();
    }
    bool is_set() const { return set_; }

private:
    asio::steady_timer timer_;
    bool set_ = false;
};

}  // namespace qcowfs
